"""Keeping the bot's token fresh.

A Postbox token expires (``exp``, 7 days by default) and a socket is bound
to the token it connected with. The bot reads ``exp`` and ``iat`` from the
token's payload (without checking the signature: only the server can, and
it does on every use), and two thirds into the token's lifetime swaps it
for a new one with ``POST /api/token/refresh``. The new token is kept in
``bot.token`` (and in the state file, so a restart uses it), and a running
socket reconnects with it right away (recovering its session: nothing is
missed or handled twice). HTTP requests refresh a due token first too, so a
bot in webhook mode (no socket) stays logged in as long as it keeps making
requests.
"""
import asyncio
import base64
import json
import logging
import time

import aiohttp

from .errors import BotError

log = logging.getLogger(__name__)

# The share of a token's lifetime after which it is refreshed.
REFRESH_AFTER = 2 / 3


def token_claims(token):
    """The payload of a JWT (``{sub, iat, exp}`` for a Postbox token),
    unverified; None when ``token`` is not a JWT with an ``exp``."""
    try:
        payload = token.split('.')[1]
        payload += '=' * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (AttributeError, IndexError, ValueError, TypeError):
        return None
    if not isinstance(claims, dict) or \
            not isinstance(claims.get('exp'), (int, float)):
        return None
    return claims


def newer_token(given, saved):
    """``saved`` (a token refreshed by an earlier run, from the state
    file) if it belongs to the same user as ``given`` and was issued after
    it, else ``given``: a token the owner rotated since is newer, and
    wins."""
    a, b = token_claims(given), token_claims(saved)
    if a is None or b is None or str(a.get('sub')) != str(b.get('sub')):
        return given
    if float(b.get('iat') or 0) > float(a.get('iat') or 0) and \
            float(b['exp']) > time.time():
        return saved
    return given


class TokenMixin:
    """Token refresh for :class:`postbox_bot.Bot`: ``token``,
    ``_token_received`` ((token, local time it was received) of a token
    refreshed here: its lifetime is counted on the local clock, so clock
    skew does not matter) and ``_token_lock``."""

    def _token_times(self):
        """(seconds until the token is due for a refresh, seconds until it
        expires), or None for a token without ``exp``."""
        claims = token_claims(self.token)
        if claims is None:
            return None
        exp = float(claims['exp'])
        lifetime = max(0.0, exp - float(claims.get('iat') or exp))
        received = self._token_received
        now = time.time()
        if received and received[0] == self.token:
            expires = received[1] + lifetime - now
        else:
            expires = exp - now
        return expires - lifetime * (1 - REFRESH_AFTER), expires

    async def refresh_token(self) -> str:
        """Swap ``bot.token`` for a new one with a full lifetime (``POST
        /api/token/refresh``; the old one keeps working until it expires),
        save it in the state file and reconnect a running socket with it.
        The bot does this by itself two thirds into a token's lifetime;
        returns the new token. Raises BotError (``unauthorized`` when the
        token has expired or was revoked: a bot account then needs a new
        token from its owner, ``POST /api/bots/{username}/token``)."""
        async with self._token_lock:
            await self._swap_token()
        await self._after_refresh()
        return self.token

    async def _refresh_if_due(self):
        async with self._token_lock:
            times = self._token_times()
            if times is None or times[0] > 0:
                return  # not due (or refreshed meanwhile by another task)
            await self._swap_token()
        await self._after_refresh()

    async def _refresh_quietly(self):
        """Refresh the token if it is due; a failure is logged, not
        raised (the old token works until it expires)."""
        times = self._token_times()
        if times is None or times[0] > 0:
            return
        try:
            await self._refresh_if_due()
        except (BotError, aiohttp.ClientError, OSError,
                asyncio.TimeoutError) as exc:
            log.warning('token refresh failed: %s', exc)

    async def _swap_token(self):
        _, data = await self._request('POST', '/api/token/refresh')
        self.token = data['token']
        self._token_received = (self.token, time.time())

    async def _after_refresh(self):
        times = self._token_times()
        log.info('token refreshed%s', f'; it expires in {times[1]:.0f} s'
                 if times else '')
        await self._save_state()
        self._rebind_socket()

    def _rebind_socket(self):
        """A socket that connected with an older token: reconnect it with
        the new one (its events would be refused once the old one expires,
        and the server closes it then). The transport is dropped, as a
        network drop would: the reconnect resumes the session, and the
        requests in flight are retried on the new connection."""
        sio = self.sio
        if sio is None or not self.connected.is_set() or \
                self._socket_token == self.token:
            return
        log.info('reconnecting with the refreshed token')
        self._reconnect_now = True
        task = asyncio.ensure_future(sio.eio.disconnect(abort=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _keep_token_fresh(self):
        """Runs with the bot: refreshes the token when it is due, retrying
        a refresh that failed until the token expires."""
        while not self._stopping.is_set():
            times = self._token_times()
            if times is None:
                return  # not a JWT: nothing to read the expiry from
            due, expires = times
            if due > 0:
                wait = min(due, 3600.0)
            else:
                try:
                    await self._refresh_if_due()
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 (retried below)
                    if expires <= 0:
                        log.error('token refresh failed (%s) and the token '
                                  'has expired: the bot cannot reconnect '
                                  'with it', exc)
                        return
                    log.warning('token refresh failed (%s); the token '
                                'expires in %.0f s, retrying', exc, expires)
                    wait = max(1.0, min(60.0, expires / 10))
            try:
                await asyncio.wait_for(self._stopping.wait(), wait)
            except asyncio.TimeoutError:
                pass
