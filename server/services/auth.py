"""Accounts and tokens: register, login, bots, and the one check that every
HTTP request and Socket.IO connection goes through (``authenticate``)."""
import asyncio
import functools
import re
import time

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError

from server.data import push as push_data
from server.data import users as user_data
from server.errors import (Conflict, Forbidden, Invalid, NotFound,
                           PostboxError, Unauthorized)
from server.services.checks import check_shown_name, check_text
from server.services.context import now_ms
from server.services.serialize import user_dict

USERNAME_RE = re.compile(r'^[a-z0-9_.]{3,32}$')
_hasher = PasswordHasher()
# Verified when the username does not exist, so that a wrong username takes
# as long as a wrong password and timing does not reveal who has an account.
_DUMMY_HASH = _hasher.hash('not a real password')


def check_username(username) -> str:
    if not isinstance(username, str):
        raise Invalid('username must be a string')
    username = username.strip().lower()
    if not USERNAME_RE.match(username):
        raise Invalid('username: 3-32 characters of a-z, 0-9, _ and .')
    return username


# Longest password; one that is longer never matches (a stored one is
# at most this long), and only this much of it is ever hashed.
PASSWORD_MAX = 256


def check_password(password, name='password') -> str:
    return check_text(password, name, 8, PASSWORD_MAX)


async def _matches(ctx, password_hash, password) -> bool:
    """Whether ``password`` is the one hashed in ``password_hash``. The
    hash costs the same whatever the length: a longer one is hashed
    cut, and then refused."""
    ok = await _verify(ctx, password_hash, password[:PASSWORD_MAX])
    return ok and len(password) <= PASSWORD_MAX


def check_display_name(display_name, default) -> str:
    """The display name to store (surrounding spaces removed), or
    ``default`` when it is None. Raises Invalid for anything but 1-64
    characters, or for control, bidi-control and zero-width characters."""
    if display_name is None:
        return default
    return check_shown_name(display_name, 'display_name', 64)


def issue_token(ctx, user_id: int) -> str:
    """A signed HS256 JWT: ``sub`` is the user id, ``exp`` the expiry."""
    now = time.time()
    # ``iat`` keeps milliseconds so that a revocation (tokens_valid_after,
    # in ms) separates tokens issued in the same second before and after it.
    payload = {'sub': str(user_id), 'iat': round(now, 3),
               'exp': int(now) + ctx.config.token_ttl_seconds}
    return jwt.encode(payload, ctx.secret, algorithm='HS256')


async def _argon2(ctx, fn, *args):
    # Argon2 is slow on purpose (tens of ms): keep it off the event loop.
    async with ctx.argon2_slots:
        return await asyncio.get_running_loop().run_in_executor(
            None, fn, *args)


async def _hash(ctx, password):
    return await _argon2(ctx, _hasher.hash, password)


def _verify_sync(password_hash, password) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, InvalidHashError):
        return False


async def _verify(ctx, password_hash, password) -> bool:
    return await _argon2(ctx, _verify_sync, password_hash, password)


async def _failures_throttled(throttle, keys, check):
    """Await ``check()`` (a password check) with one try of ``throttle``
    spent on ``keys``; raises RateLimited first when they are used up.
    Every try is counted as a miss before the slow check (so concurrent
    guesses cannot all slip past the limit) and given back unless it was
    one: a right password, or an error of ours, costs nothing."""
    await throttle.take(*keys)
    try:
        result = await check()
    except Unauthorized:
        raise  # a miss: the try stays spent
    except BaseException:  # ours, not the guesser's (a cancel included)
        await throttle.give_back(*keys)
        raise
    await throttle.give_back(*keys)
    return result


def _create_user(username, display_name, password_hash, is_bot=False,
                 owner_id=None):
    if user_data.username_taken(username):
        raise Conflict('username is taken')
    user = user_data.create(username, display_name, password_hash, is_bot,
                            owner_id, now_ms())
    if user is None:  # another process took it just now
        raise Conflict('username is taken')
    return user_dict(user)


async def register(ctx, username, password, display_name=None,
                   ip=None) -> dict:
    """Create an account. Returns ``{user, token}``; raises Invalid,
    Conflict (username taken) or RateLimited (too many registrations from
    the client address ``ip``)."""
    username = check_username(username)
    password = check_password(password)
    display_name = check_display_name(display_name, username)
    # Every registration that gets as far as the hash counts, a taken
    # username included (the hash was paid for); only an error of ours
    # gives the try back.
    throttle = ctx.limits.registrations
    await throttle.take(ip)
    try:
        password_hash = await _hash(ctx, password)
        user = await ctx.store.write(_create_user, username, display_name,
                                     password_hash)
    except PostboxError:
        raise
    except BaseException:
        await throttle.give_back(ip)
        raise
    return {'user': user, 'token': issue_token(ctx, user['id'])}


async def login(ctx, username, password, ip=None) -> dict:
    """Check a username and password. Returns ``{user, token}``; raises
    Unauthorized for any mismatch (without saying which part was wrong),
    RateLimited after too many failures for the username or from ``ip``."""
    if not isinstance(username, str) or not isinstance(password, str):
        raise Invalid('username and password must be strings')
    username = username.strip().lower()[:64]
    return await _failures_throttled(
        ctx.limits.logins, (username, ip),
        lambda: _check_login(ctx, username, password))


async def _check_login(ctx, username, password) -> dict:
    user = await ctx.store.read(user_data.person, username)
    ok = await _matches(ctx, user.password_hash if user else _DUMMY_HASH,
                        password)
    if not user or not ok:
        raise Unauthorized('wrong username or password')
    return {'user': user_dict(user), 'token': issue_token(ctx, user.id)}


def _revoke(user_id, password_hash=None):
    """Revoke the tokens of ``user_id`` and of the bots they own (and set
    a new password hash if given). Logging out everywhere (no new
    password) also forgets the user's push subscriptions: every device is
    signed out, so none of them may show the user's messages any more
    (each subscribes again after its next sign-in). A password change
    keeps them: the device that changed it goes on with a fresh token and
    would never learn that its pushes stopped. Returns (revoked user ids,
    the time of the revocation in ms)."""
    at = now_ms()
    user_data.revoke_tokens([user_id], at, password_hash)
    if password_hash is None:
        push_data.remove_subscriptions_of(user_id)
    bots = user_data.bots_of(user_id)
    if bots:
        user_data.revoke_tokens(bots, at)
    return [user_id] + bots, at


async def _token_after(ctx, user_id, revoked_at) -> str:
    """A token for ``user_id`` that a revocation at ``revoked_at`` (ms)
    does not cover: revocation wins a tie, so wait out that millisecond."""
    while now_ms() <= revoked_at:
        await asyncio.sleep(0.001)
    return issue_token(ctx, user_id)


async def revoke_tokens(ctx, user_id) -> list:
    """Logout everywhere: every token issued so far to the user and to
    their bots stops working. Returns the ids of those users (the transport
    closes their live sockets)."""
    revoked, _ = await ctx.store.write(_revoke, user_id)
    return revoked


async def change_password(ctx, user_id, old_password, new_password,
                          ip=None) -> tuple:
    """Set a new password after checking the old one; every token issued
    before stops working, the user's bots' included. Returns ``({user,
    token}, revoked user ids)``: a fresh token, and the users whose live
    sockets must close (the user and their bots). Raises Invalid, Forbidden (a bot has no
    password), Unauthorized, or RateLimited: a wrong old password is a
    failed login of the user (the same throttle, so a stolen token cannot
    be used to guess the password either)."""
    if not isinstance(old_password, str):
        raise Invalid('old_password must be a string')
    new_password = check_password(new_password, 'new_password')
    current = await ctx.store.read(user_data.password_hash, user_id)
    if current is None:
        raise Forbidden('this account has no password')
    username = (await get_user(ctx, user_id))['username']

    async def check():
        if not await _matches(ctx, current, old_password):
            raise Unauthorized('wrong password')

    await _failures_throttled(ctx.limits.logins, (username, ip), check)
    revoked, at = await ctx.store.write(_revoke, user_id,
                                        await _hash(ctx, new_password))
    return {'user': await get_user(ctx, user_id),
            'token': await _token_after(ctx, user_id, at)}, revoked


async def refresh_token(ctx, user_id) -> dict:
    """A new token with a full lifetime for an authenticated user."""
    return {'token': issue_token(ctx, user_id)}


async def create_bot(ctx, owner_id, username, display_name=None) -> dict:
    """A bot account owned by ``owner_id``. Returns ``{user, token}``."""
    owner = await get_user(ctx, owner_id)
    if owner['is_bot']:
        raise Forbidden('bots cannot create bots')
    username = check_username(username)
    display_name = check_display_name(display_name, username)
    user = await ctx.store.write(_create_user, username, display_name, None,
                                 True, owner_id)
    return {'user': user, 'token': issue_token(ctx, user['id'])}


def _revoke_bot(bot_id):
    at = now_ms()
    user_data.revoke_tokens([bot_id], at)
    return at


async def rotate_bot_token(ctx, owner_id, username) -> tuple:
    """A new token for the bot ``username``, revoking its earlier ones.
    Only its owner may: raises NotFound (no such bot) or Forbidden (a bot
    of someone else). Returns ``({token}, bot id)``; the transport closes
    the bot's live sockets."""
    if not isinstance(username, str):
        raise NotFound('no such bot')
    bot = await ctx.store.read(user_data.bot_row,
                               username.strip().lower()[:64])
    if bot is None or not bot[1]:
        raise NotFound('no such bot')
    bot_id, _, bot_owner = bot
    if bot_owner != owner_id:
        raise Forbidden('only the owner of a bot can rotate its token')
    at = await ctx.store.write(_revoke_bot, bot_id)
    return {'token': await _token_after(ctx, bot_id, at)}, bot_id


@functools.lru_cache(maxsize=4096)
def _verified_claims(secret, token) -> tuple:
    """``(user id, iat in ms, exp)`` of a token whose signature checks out.
    Cached: an HTTP client sends the same token with every request, and
    PyJWT's decode cost about 110 us of the HTTP send path's CPU (the HMAC
    itself about 5). Only valid tokens are cached (an exception is not);
    expiry and revocation are checked by the caller on every use."""
    claims = jwt.decode(token, secret, algorithms=['HS256'],
                        options={'require': ['exp', 'sub', 'iat']})
    return (int(claims['sub']), round(float(claims['iat']) * 1000),
            float(claims['exp']))


async def authenticate(ctx, token) -> dict:
    """The login check shared by HTTP and Socket.IO: verify the JWT's
    signature and expiry and that the user exists and has not revoked it.
    Returns the public user dict; raises Unauthorized."""
    if not isinstance(token, str) or not token:
        raise Unauthorized('missing token')
    user_id, issued_ms, expires = _claims(ctx, token)
    if expires <= time.time() or not 0 < user_id < 2**63:
        # Expiry as jwt.decode checks it, on every use; an id no row can
        # have (only a holder of the secret could sign one).
        raise Unauthorized('invalid or expired token')
    user = await ctx.store.read(user_data.auth_row, user_id)
    if user is None or revoked(issued_ms, user.tokens_valid_after):
        raise Unauthorized('invalid or expired token')
    data = user_dict(user)
    ctx.users.put(user.id, data)
    return data


def token_times(ctx, token) -> tuple:
    """When ``token``, which ``authenticate`` accepted, was issued (ms:
    a revocation after that ends it) and expires (unix seconds): a
    socket's access ends then (server/transport/socket.py). Unauthorized
    if it no longer checks out."""
    _, issued_ms, expires = _claims(ctx, token)
    return issued_ms, expires


async def valid_after(ctx, user_ids) -> dict:
    """{user id: tokens_valid_after} of those of ``user_ids`` that
    exist."""
    return await ctx.store.read(user_data.valid_after, user_ids)


def revoked(issued_ms, valid_after) -> bool:
    """Whether a token issued at ``issued_ms`` is revoked by its user's
    ``tokens_valid_after`` (None: no such user). Revocation wins a tie: a
    token from the very millisecond of a logout is refused (the new token
    of that logout is issued after its commit)."""
    return valid_after is None or issued_ms <= valid_after


def _claims(ctx, token) -> tuple:
    """``_verified_claims`` of ``token``; Unauthorized if it does not
    check out."""
    try:
        return _verified_claims(ctx.secret, token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise Unauthorized('invalid or expired token') from None


async def get_user(ctx, user_id) -> dict:
    cached = ctx.users.get(user_id)
    if cached is not None:
        return cached
    user = await ctx.store.read(user_data.get, user_id)
    if user is None:
        raise Unauthorized('no such user')
    data = user_dict(user)
    ctx.users.put(user.id, data)
    return data
