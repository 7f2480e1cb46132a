"""Push notifications to members who are not connected: Web Push (RFC 8030,
``aes128gcm`` payloads of RFC 8291, VAPID of RFC 8292, through pywebpush's
``WebPusher.encode`` and py-vapid) and a Matrix push gateway (Sygnal) for
native apps.

Rows come from the outbox (``server/services/outbox.py``): one per
subscription per message. Bursts collapse at the push service: every push
for a room carries the same ``Topic`` header, so a service still holding
an undelivered push of that room replaces it with the newer one (the
payload carries the room's unread count, so the latest says it all).

The VAPID key pair is generated once into ``data_dir/vapid.pem`` (0600),
like the JWT secret, so subscriptions survive restarts.
"""
import asyncio
import base64
import binascii
import fcntl
import json
import logging
import os
import time
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid
from pywebpush import WebPusher

from server.data import push as push_data
from server.errors import Invalid, NotFound, TooLarge
from server.services import rooms as rooms_service
from server.services.checks import check_text
from server.services.context import now_ms
from server.services import outbox
from server.services.outbox import bounded
from server.services.serialize import iso, load_users
from server.services.webhooks import check_url

log = logging.getLogger(__name__)

# How long a push service keeps an undelivered push (seconds): a day, as
# long as a message is worth a notification.
PUSH_TTL = 86400
# A VAPID token (an ECDSA signature, valid 24 h) is reused for an hour per
# push service: signing one per push was about a tenth of a push's CPU.
VAPID_REUSE_SECONDS = 3600
VAPID_CACHED_ORIGINS = 1000
# Most of a push gateway's answer read ({"rejected": [pushkeys]}).
GATEWAY_ANSWER_MAX = 64 * 1024
# Longest gateway pushkey and Web Push endpoint URL a subscription may
# have: real ones are a few hundred characters at most, and each is kept
# in the subscription's row and sent with every push to it.
PUSHKEY_MAX = 512
ENDPOINT_MAX = 2000


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + '=' * (-len(text) % 4))


def load_vapid(config) -> Vapid:
    """The server's VAPID key: read from ``data_dir/vapid.pem``, generated
    there (0600, under a lock, so processes starting together agree) the
    first time."""
    path = config.data_path / 'vapid.pem'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, 'r+b') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        pem = f.read()
        if pem.strip():
            return Vapid.from_pem(pem)
        vapid = Vapid()
        vapid.generate_keys()
        f.seek(0)
        f.truncate()
        f.write(vapid.private_pem())
        f.flush()
        os.fsync(f.fileno())
        log.info('%s: generated a VAPID key pair', path)
        return vapid


def public_key(vapid) -> str:
    """The VAPID public key as browsers take it: base64url of the
    uncompressed P-256 point."""
    return _b64url(vapid.public_key.public_bytes(
        serialization.Encoding.X962,
        serialization.PublicFormat.UncompressedPoint))


def _check_token(value, name, most) -> str:
    """An app id or pushkey: 1 to ``most`` characters, none of them a
    space or a control character (the two make one key, joined by a
    space)."""
    value = check_text(value, name, 1, most)
    if any(c <= ' ' or c == '\x7f' for c in value):
        raise Invalid(f'{name}: no spaces or control characters')
    return value


async def check_subscription(ctx, data) -> dict:
    """The PushSubscription fields of a ``POST /api/push/subscriptions``
    body; Invalid if anything is off."""
    kind = data.get('kind')
    if kind == 'webpush':
        endpoint = check_text(data.get('endpoint'), 'endpoint', 1,
                              ENDPOINT_MAX)
        try:
            scheme = urlsplit(endpoint).scheme
        except ValueError:
            raise Invalid('endpoint: not a valid URL') from None
        if scheme != 'https' and not ctx.config.webhook_allow_private:
            raise Invalid('endpoint: an https URL (plain http only with '
                          'the server\'s webhook_allow_private set)')
        await check_url(endpoint, ctx.config.webhook_allow_private,
                        'endpoint')
        keys = data.get('keys')
        if not isinstance(keys, dict):
            raise Invalid('keys: {p256dh, auth}')
        try:
            p256dh = _unb64url(check_text(keys.get('p256dh'), 'keys.p256dh',
                                          1, 200))
            auth = _unb64url(check_text(keys.get('auth'), 'keys.auth', 1,
                                        100))
        except (binascii.Error, ValueError):
            raise Invalid('keys: base64url') from None
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                         p256dh)
        except ValueError:
            raise Invalid('keys.p256dh: an uncompressed P-256 point') \
                from None
        if len(p256dh) != 65:
            raise Invalid('keys.p256dh: an uncompressed P-256 point')
        if len(auth) != 16:
            raise Invalid('keys.auth: 16 bytes')
        return {'kind': kind, 'endpoint': endpoint,
                'p256dh': _b64url(p256dh), 'auth': _b64url(auth),
                'app_id': None, 'pushkey': None}
    if kind == 'gateway':
        app_id = _check_token(data.get('app_id'), 'app_id', 128)
        pushkey = _check_token(data.get('pushkey'), 'pushkey', PUSHKEY_MAX)
        return {'kind': kind, 'endpoint': f'{app_id} {pushkey}',
                'p256dh': None, 'auth': None, 'app_id': app_id,
                'pushkey': pushkey}
    raise Invalid('kind: "webpush" or "gateway"')


def _subscription_dict(row) -> dict:
    return {'id': row.id, 'kind': row.kind, 'created_at': iso(row.created_at)}


def _subscribe(user_id, fields, most):
    now = now_ms()
    if push_data.subscription_count(user_id) >= most and \
            not push_data.has_subscription(user_id, fields['endpoint']):
        raise TooLarge(f'at most {most} push subscriptions per user')
    # One endpoint is one browser or device: whoever subscribed it before
    # (signed out without unsubscribing) no longer gets pushes there.
    push_data.take_endpoint(user_id, fields['endpoint'])
    row = push_data.save_subscription(user_id, fields, now)
    return _subscription_dict(row)


async def subscribe(ctx, user_id, data) -> dict:
    """Add (or, for the same endpoint or pushkey, update) a subscription
    of ``user_id``: ``{id, kind, created_at}``. Raises Invalid, TooLarge
    (past ``push_subscriptions_per_user``)."""
    if not isinstance(data, dict):
        raise Invalid('body must be a JSON object')
    fields = await check_subscription(ctx, data)
    return await ctx.store.write(_subscribe, user_id, fields,
                                 ctx.config.push_subscriptions_per_user)


def _list(user_id):
    return [_subscription_dict(s) for s in push_data.subscriptions_of(user_id)]


async def subscriptions(ctx, user_id) -> list:
    return await ctx.store.read(_list, user_id)


def _unsubscribe(user_id, subscription_id):
    if not push_data.remove_subscription(user_id, subscription_id):
        raise NotFound('no such subscription')


async def unsubscribe(ctx, user_id, subscription_id):
    await ctx.store.write(_unsubscribe, user_id, subscription_id)


async def mute_room(ctx, user_id, room_id, muted):
    """No pushes (or pushes again) for ``room_id``. Raises Invalid,
    NotFound (not a member)."""
    if not isinstance(muted, bool):
        raise Invalid('muted must be true or false')
    await rooms_service.member_room(ctx, user_id, room_id)
    await ctx.store.write(push_data.set_muted, user_id, room_id, muted)


def _load(ctx, rows):
    """The subscriptions, messages (with senders) and unread counts the
    rows need."""
    subs = push_data.subscriptions(r.target for r in rows)
    messages = push_data.messages(r.message_id for r in rows)
    senders = load_users(ctx, list({m.sender_id for m in messages.values()}))
    unread = push_data.unread_counts((r.user_id, r.room_id) for r in rows)
    return subs, messages, senders, unread


class PushSender:
    """The outbox sender of 'push' rows."""

    def __init__(self, ctx, session):
        self.ctx = ctx
        self.session = session
        self.vapid = load_vapid(ctx.config)
        self._vapid_headers = {}  # origin -> (headers, reuse until)

    async def __call__(self, rows, gate) -> dict:
        ctx = self.ctx
        results, owed = self._connected(rows, await self._online(rows))
        if not owed:
            return results
        subs, messages, senders, unread = await ctx.store.read(
            _load, ctx, owed)
        gone = set()
        calls = [self._one(r, subs.get(r.target), messages.get(r.message_id),
                           senders, unread, gone) for r in owed]
        outcomes = await bounded(
            gate, calls, 2 * ctx.config.outbox_timeout_seconds)
        results.update((r.id, o) for r, o in zip(owed, outcomes))
        if gone:
            await ctx.store.write(push_data.remove_subscriptions, gone)
        return results

    async def _online(self, rows) -> tuple:
        """(users with a socket on this process, users presence counts
        online anywhere: a socket on another process, or a socket closed
        less than the grace period ago)."""
        ids = {r.user_id for r in rows}
        here = outbox.connected_here(self.ctx, ids)
        status = await self.ctx.presence.status(list(ids - here))
        return here, {u for u, (online, _) in status.items() if online}

    def _connected(self, rows, online) -> tuple:
        """({row id: outcome} of the rows not to push now, the rows to
        push). A user with a socket here has the message: nothing owed.
        One online elsewhere may only be in the grace period after
        closing their last socket (presence cannot tell that from a
        socket on another process): the push waits until the grace period
        of the message's time is over, and goes if they are offline by
        then."""
        here, anywhere = online
        settle_ms = int(self.ctx.config.presence_grace_seconds * 1000) + 2000
        results, owed = {}, []
        for row in rows:
            if row.user_id in here:
                results[row.id] = None
            elif row.user_id in anywhere:
                wait_until = row.created_at + settle_ms
                results[row.id] = (outbox.Later(wait_until)
                                   if now_ms() < wait_until else None)
            else:
                owed.append(row)
        return results, owed

    def _one(self, row, sub, message, senders, unread, gone):
        async def call():
            if sub is None or message is None or message.deleted:
                return None  # unsubscribed, or nothing left to tell
            if (row.user_id, row.room_id) not in unread:
                # Out of the room since (removed, or left): what it says
                # now is no longer theirs to read.
                return None
            payload = {'type': 'message', 'room_id': row.room_id,
                       'seq': row.seq, 'message_id': message.id,
                       'sender': senders.get(message.sender_id),
                       'unread': unread.get((row.user_id, row.room_id), 0)}
            if self.ctx.config.push_include_body:
                payload['body'] = message.body
            if sub.kind == 'webpush':
                return await self.webpush(sub, payload, gone)
            return await self.gateway(sub, payload, gone)
        return call

    async def webpush(self, sub, payload, gone) -> str | None:
        config = self.ctx.config
        try:
            await check_url(sub.endpoint, config.webhook_allow_private)
        except Invalid as exc:
            return str(exc)
        info = {'endpoint': sub.endpoint,
                'keys': {'p256dh': sub.p256dh, 'auth': sub.auth}}
        data = json.dumps(payload, separators=(',', ':')).encode()
        # ECDH and AES off the event loop.
        body = await asyncio.to_thread(
            lambda: WebPusher(info).encode(data, 'aes128gcm')['body'])
        parts = urlsplit(sub.endpoint)
        headers = self.vapid_headers(f'{parts.scheme}://{parts.netloc}')
        headers.update({'Content-Encoding': 'aes128gcm',
                        'Content-Type': 'application/octet-stream',
                        'TTL': str(PUSH_TTL), 'Urgency': 'high',
                        # One per room: the push service replaces an
                        # undelivered push of the room by the newer one.
                        'Topic': f'room{payload["room_id"]}'})
        try:
            async with self.session.post(sub.endpoint, data=body,
                                         headers=headers,
                                         allow_redirects=False) as resp:
                # Only the status counts: the body is not read.
                if resp.status in (404, 410):
                    gone.add(sub.id)
                    return None
                if 200 <= resp.status < 300:
                    return None
                return f'HTTP {resp.status}'
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f'{type(exc).__name__}: {exc}'[:300]

    def vapid_headers(self, origin) -> dict:
        """The VAPID headers for a push service (``origin``: its scheme,
        host and port), signed at most once an hour."""
        now = time.monotonic()
        cached = self._vapid_headers.get(origin)
        if cached is None or cached[1] < now:
            if len(self._vapid_headers) >= VAPID_CACHED_ORIGINS:
                self._vapid_headers.clear()
            cached = self._vapid_headers[origin] = (self.vapid.sign({
                'aud': origin, 'sub': self.ctx.config.push_vapid_subject}),
                now + VAPID_REUSE_SECONDS)
        return dict(cached[0])

    async def gateway(self, sub, payload, gone) -> str | None:
        url = self.ctx.config.push_gateway_url
        if not url:
            return None  # no gateway configured: nothing to send to
        sender = payload['sender'] or {}
        content = {'body': payload['body']} if 'body' in payload else {}
        body = {'notification': {
            'event_id': str(payload['message_id']),
            'room_id': str(payload['room_id']),
            'type': 'm.room.message',
            'sender': sender.get('username'),
            'sender_display_name': sender.get('display_name'),
            'content': content,
            'counts': {'unread': payload['unread']},
            'devices': [{'app_id': sub.app_id, 'pushkey': sub.pushkey}]}}
        try:
            async with self.session.post(url, json=body,
                                         allow_redirects=False) as resp:
                if not 200 <= resp.status < 300:
                    return f'HTTP {resp.status}'
                # A gateway's answer is a short JSON object.
                answer = json.loads(await resp.content.read(GATEWAY_ANSWER_MAX))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError,
                ValueError) as exc:
            return f'{type(exc).__name__}: {exc}'[:300]
        rejected = answer.get('rejected') if isinstance(answer, dict) else None
        if isinstance(rejected, list) and sub.pushkey in rejected:
            gone.add(sub.id)
        return None
