"""Accounts and tokens: register, login, bots, and the one check that every
HTTP request and Socket.IO connection goes through (``authenticate``)."""
import asyncio
import re
import time

import jwt
import peewee
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError

from models import User
from server.errors import Conflict, Forbidden, Invalid, Unauthorized
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


def check_password(password) -> str:
    if not isinstance(password, str) or not 8 <= len(password) <= 256:
        raise Invalid('password: 8 to 256 characters')
    return password


def check_display_name(display_name, default) -> str:
    if display_name is None:
        return default
    if not isinstance(display_name, str):
        raise Invalid('display_name must be a string')
    display_name = display_name.strip()
    if not 1 <= len(display_name) <= 64:
        raise Invalid('display_name: 1 to 64 characters')
    return display_name


def issue_token(ctx, user_id: int) -> str:
    """A signed HS256 JWT: ``sub`` is the user id, ``exp`` the expiry."""
    now = time.time()
    # ``iat`` keeps milliseconds so that a revocation (tokens_valid_after,
    # in ms) separates tokens issued in the same second before and after it.
    payload = {'sub': str(user_id), 'iat': round(now, 3),
               'exp': int(now) + ctx.config.token_ttl_seconds}
    return jwt.encode(payload, ctx.secret, algorithm='HS256')


async def _hash(password):
    # Argon2 is slow on purpose (tens of ms): keep it off the event loop.
    return await asyncio.get_running_loop().run_in_executor(
        None, _hasher.hash, password)


async def _verify(password_hash, password) -> bool:
    def verify():
        try:
            return _hasher.verify(password_hash, password)
        except (VerifyMismatchError, InvalidHashError):
            return False
    return await asyncio.get_running_loop().run_in_executor(None, verify)


def _create_user(username, display_name, password_hash, is_bot=False,
                 owner_id=None):
    if User.select().where(User.username == username).exists():
        raise Conflict('username is taken')
    try:
        return user_dict(User.create(
            username=username, display_name=display_name,
            password_hash=password_hash, is_bot=is_bot, owner=owner_id,
            created_at=now_ms()))
    except peewee.IntegrityError:  # another process took it just now
        raise Conflict('username is taken') from None


async def register(ctx, username, password, display_name=None) -> dict:
    """Create an account. Returns ``{user, token}``; raises Invalid or
    Conflict (username taken)."""
    username = check_username(username)
    password = check_password(password)
    display_name = check_display_name(display_name, username)
    password_hash = await _hash(password)
    user = await ctx.store.write(_create_user, username, display_name,
                                 password_hash)
    return {'user': user, 'token': issue_token(ctx, user['id'])}


def _find_login(username):
    return (User.select().where(User.username == username,
                                User.is_bot == False)  # noqa: E712
            .first())


async def login(ctx, username, password, ip=None) -> dict:
    """Check a username and password. Returns ``{user, token}``; raises
    Unauthorized for any mismatch (without saying which part was wrong),
    RateLimited after too many failures for the username or from ``ip``."""
    if not isinstance(username, str) or not isinstance(password, str):
        raise Invalid('username and password must be strings')
    username = username.strip().lower()[:64]
    throttle = ctx.limits.logins if hasattr(ctx, 'limits') else None
    if throttle is None:
        return await _check_login(ctx, username, password)
    # Every try is counted as a miss before the slow check (so concurrent
    # guesses cannot all slip past the limit) and given back unless it was
    # one: a right password, or an error of ours, costs nothing.
    await throttle.take(username, ip)
    try:
        result = await _check_login(ctx, username, password)
    except Unauthorized:
        raise  # a miss: the try stays spent
    except BaseException:  # ours, not the guesser's (a cancel included)
        await throttle.give_back(username, ip)
        raise
    await throttle.give_back(username, ip)
    return result


async def _check_login(ctx, username, password) -> dict:
    user = await ctx.store.read(_find_login, username)
    ok = await _verify(user.password_hash if user else _DUMMY_HASH,
                       password[:256])
    if not user or not ok:
        raise Unauthorized('wrong username or password')
    return {'user': user_dict(user), 'token': issue_token(ctx, user.id)}


def _revoke(user_id, password_hash=None):
    changes = {User.tokens_valid_after: now_ms()}
    if password_hash is not None:
        changes[User.password_hash] = password_hash
    User.update(changes).where(User.id == user_id).execute()


async def revoke_tokens(ctx, user_id):
    """Logout everywhere: every token issued so far stops working (the
    transport also closes the user's live sockets)."""
    await ctx.store.write(_revoke, user_id)


def _password_hash(user_id):
    return User.select(User.password_hash).where(User.id == user_id).scalar()


async def change_password(ctx, user_id, old_password, new_password) -> dict:
    """Set a new password after checking the old one; every token issued
    before stops working. Returns ``{user, token}`` with a fresh token.
    Raises Invalid, Forbidden (a bot has no password) or Unauthorized."""
    if not isinstance(old_password, str):
        raise Invalid('old_password must be a string')
    new_password = check_password(new_password)
    current = await ctx.store.read(_password_hash, user_id)
    if current is None:
        raise Forbidden('this account has no password')
    if not await _verify(current, old_password[:256]):
        raise Unauthorized('wrong password')
    await ctx.store.write(_revoke, user_id, await _hash(new_password))
    return {'user': await get_user(ctx, user_id),
            'token': issue_token(ctx, user_id)}


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


def _load_auth(user_id):
    return (User.select(User.id, User.username, User.display_name,
                        User.is_bot, User.tokens_valid_after)
            .where(User.id == user_id).first())


async def authenticate(ctx, token) -> dict:
    """The login check shared by HTTP and Socket.IO: verify the JWT's
    signature and expiry and that the user exists and has not revoked it.
    Returns the public user dict; raises Unauthorized."""
    if not isinstance(token, str) or not token:
        raise Unauthorized('missing token')
    try:
        claims = jwt.decode(token, ctx.secret, algorithms=['HS256'],
                            options={'require': ['exp', 'sub', 'iat']})
        user_id = int(claims['sub'])
    except (jwt.PyJWTError, ValueError, TypeError):
        raise Unauthorized('invalid or expired token') from None
    user = await ctx.store.read(_load_auth, user_id)
    # Revocation wins a tie: a token from the very millisecond of a logout
    # is refused (the new token of that logout is issued after its commit).
    if user is None or \
            round(float(claims['iat']) * 1000) <= user.tokens_valid_after:
        raise Unauthorized('invalid or expired token')
    data = user_dict(user)
    ctx.users[user.id] = data
    return data


def _get_user(user_id):
    return User.get_or_none(User.id == user_id)


async def get_user(ctx, user_id) -> dict:
    if user_id in ctx.users:
        return ctx.users[user_id]
    user = await ctx.store.read(_get_user, user_id)
    if user is None:
        raise Unauthorized('no such user')
    ctx.users[user.id] = user_dict(user)
    return ctx.users[user.id]
