"""Bot webhooks: a bot's owner sets a URL; every event the bot would get
on a socket (its own messages excluded) is POSTed there as JSON ``{id,
type, created_at, data}``, signed with HMAC-SHA256 (``Postbox-Signature:
t=<unix>,v1=<hex of HMAC("<t>.<body>")>``). Rows come from the outbox
(``server/services/outbox.py``), which retries and keeps seq order per
room.

Addresses: webhook URLs (and push endpoints) must be http(s) and must not
resolve to loopback, private, link-local or otherwise non-public
addresses unless ``webhook_allow_private`` is set, or a user could make the
server reach its own network. The check runs when the URL is set and again
before every delivery (DNS can change), and redirects are never followed.
"""
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from urllib.parse import urlsplit

import aiohttp
import aiohttp.resolver

from server.data import outbox as outbox_data
from server.data import users as user_data
from server.data import webhooks as webhook_data
from server.data.messages import memberships
from server.data.rows import messages_by_id
from server.errors import Forbidden, Invalid, NotFound
from server.services.context import now_ms
from server.services.outbox import bounded
from server.services.messages import _room_event as room_event
from server.services.serialize import iso, message_dicts

log = logging.getLogger(__name__)

URL_MAX = 2000


# IPv6 ranges that carry an IPv4 address in their last 32 bits and reach
# it through a translator (NAT64, RFC 6052 and 8215), or the deprecated
# IPv4-compatible form: what decides is that IPv4 address.
_V4_INSIDE = [ipaddress.ip_network(n) for n in (
    '64:ff9b::/96', '64:ff9b:1::/48', '::/96', '::ffff:0:0:0/96')]
# Teredo tunnels through a relay to an address of the client's choosing:
# never taken as public.
_TEREDO = ipaddress.ip_network('2001::/32')


def _embedded_v4(ip):
    """The IPv4 address an IPv6 address stands for (mapped, NAT64,
    SIIT, 6to4, IPv4-compatible), or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _V4_INSIDE):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _public(address) -> bool:
    ip = ipaddress.ip_address(address.split('%')[0])
    if ip.version == 6:
        if ip in _TEREDO:
            return False
        ip = _embedded_v4(ip) or ip
    return ip.is_global and not ip.is_multicast


class PublicResolver(aiohttp.resolver.ThreadedResolver):
    """The outbox's resolver when private addresses are not allowed: a
    name resolves only to its public addresses. ``check_url`` checks a
    URL's host when it is set and before each delivery, but the
    connection resolves the name again; without this, a name answering a
    public address to the check and a private one to the connection (DNS
    rebinding) would reach the internal network. (A URL with a literal
    address is not resolved: ``check_url`` covers it.)"""

    async def resolve(self, host, port=0, family=socket.AF_INET):
        public = [r for r in await super().resolve(host, port, family)
                  if _public(r['host'])]
        if not public:
            raise OSError(f'{host} has no public address')
        return public


async def check_url(url, allow_private, what='url') -> str:
    """``url`` if it is http(s) with a host whose every address is public
    (or ``allow_private``); else Invalid."""
    if not isinstance(url, str) or not 0 < len(url) <= URL_MAX:
        raise Invalid(f'{what}: a URL of at most {URL_MAX} characters')
    if any(c <= ' ' or c == '\x7f' for c in url):
        raise Invalid(f'{what}: no spaces or control characters')
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Invalid(f'{what}: not a valid URL') from None
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise Invalid(f'{what}: an http or https URL')
    if allow_private:
        return url
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, port or (443 if parts.scheme == 'https' else 80),
            type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise Invalid(f'{what}: the host does not resolve') from None
    if not infos or not all(_public(info[4][0]) for info in infos):
        raise Invalid(f'{what}: the host is a loopback, private or '
                      'link-local address (the server allows those only '
                      'with webhook_allow_private set)')
    return url


def sign(secret, timestamp, body: bytes) -> str:
    """The ``Postbox-Signature`` header for ``body`` sent at
    ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode(), f'{timestamp}.'.encode() + body,
                   hashlib.sha256).hexdigest()
    return f't={timestamp},v1={mac}'


def _owned_bot(owner_id, username):
    bot = user_data.bot_row(username)
    if bot is None or not bot[1]:
        raise NotFound('no such bot')
    bot_id, _, bot_owner = bot
    if bot_owner != owner_id:
        raise Forbidden('only the owner of a bot can set its webhook')
    return bot_id


def _set(owner_id, username, url):
    bot_id = _owned_bot(owner_id, username)
    secret = secrets.token_hex(32)
    webhook_data.save(bot_id, url, secret, now_ms())
    return {'url': url, 'secret': secret}


def _delete(owner_id, username):
    bot_id = _owned_bot(owner_id, username)
    webhook_data.remove(bot_id)
    # Deliveries still pending for it are dropped with it.
    webhook_data.drop_deliveries(bot_id)


def _username(value) -> str:
    if not isinstance(value, str):
        raise NotFound('no such bot')
    return value.strip().lower()[:64]


async def set_webhook(ctx, owner_id, username, url) -> dict:
    """Set (or replace, with a new secret) the webhook of the bot
    ``username``, owned by ``owner_id``: ``{url, secret}``. Raises
    Invalid (not an http(s) URL, or a non-public address), NotFound,
    Forbidden. Whose bot it is is checked first: no address lookup for
    someone who may not set it."""
    username = _username(username)
    await ctx.store.read(_owned_bot, owner_id, username)
    url = await check_url(url, ctx.config.webhook_allow_private)
    return await ctx.store.write(_set, owner_id, username, url)


async def delete_webhook(ctx, owner_id, username):
    await ctx.store.write(_delete, owner_id, _username(username))


def _load(ctx, rows):
    """{bot id: (url, secret)} and {row id: event data} for rows: a
    message's current state, a room as it was after its change. Per row,
    not per (room, seq): two bots' rows of one seq may differ (one of them
    out of the room; a ``room`` event for one, ``room_left`` for the
    other).

    A bot out of the room since the row was written (removed, or left)
    still gets the messages it was owed, but not one changed after its
    departure: that state is not the bot's to see (an edit, a reaction
    made after it left), so that row is dropped."""
    hooks = webhook_data.hooks(r.target for r in rows)
    about = [r for r in rows if r.message_id is not None]
    messages = {m['id']: m for m in message_dicts(ctx, messages_by_id(
        {r.message_id for r in about}))}
    members = memberships({(r.room_id, r.user_id) for r in about})
    left = outbox_data.departures({
        (r.user_id, r.room_id) for r in about
        if (r.room_id, r.user_id) not in members})
    data = {}
    for row in rows:
        key = row.id
        if row.message_id is not None:
            message = messages.get(row.message_id)
            if message is not None and (
                    (row.room_id, row.user_id) in members or
                    message['update_seq'] < left.get((row.user_id,
                                                      row.room_id), 0)):
                data[key] = message
        elif row.event == 'room_left':
            data[key] = {'room_id': row.room_id, 'seq': row.seq}
        elif row.event == 'room':  # a group change, or a new room (seq 0)
            state = webhook_data.room_state(row.room_id, row.seq)
            if state is not None:
                data[key] = room_event(ctx, row.room_id, row.seq, state)
    return hooks, data


class WebhookSender:
    """The outbox sender of 'webhook' rows."""

    def __init__(self, ctx, session):
        self.ctx = ctx
        self.session = session

    async def __call__(self, rows, gate) -> dict:
        hooks, data = await self.ctx.store.read(_load, self.ctx, rows)
        calls = [self._one(row, hooks.get(row.target), data)
                 for row in rows]
        # The DNS check and the request, with room to spare before the
        # claim runs out (a row must not be sent twice at once).
        results = await bounded(
            gate, calls, 2 * self.ctx.config.outbox_timeout_seconds)
        return {row.id: result for row, result in zip(rows, results)}

    def _one(self, row, hook, events):
        async def call():
            if hook is None:
                return None  # the webhook was removed: nothing owed
            data = events.get(row.id)
            if data is None:
                return None  # the message or room is gone
            return await self.post(hook[0], hook[1], {
                'id': f'{row.room_id}.{row.seq}', 'type': row.event,
                'created_at': iso(row.created_at), 'data': data})
        return call

    async def post(self, url, secret, event) -> str | None:
        """POST one event; None if the receiver took it (2xx), else the
        error to retry with."""
        config = self.ctx.config
        try:
            await check_url(url, config.webhook_allow_private)
        except Invalid as exc:
            return str(exc)
        body = json.dumps(event, separators=(',', ':')).encode()
        headers = {'Content-Type': 'application/json',
                   'Postbox-Event-Id': event['id'],
                   'Postbox-Signature': sign(secret, int(time.time()), body)}
        try:
            async with self.session.post(url, data=body, headers=headers,
                                         allow_redirects=False) as resp:
                # Only the status counts: the body is not read (a receiver
                # answering gigabytes must not fill this process).
                if 200 <= resp.status < 300:
                    return None
                return f'HTTP {resp.status}'
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return f'{type(exc).__name__}: {exc}'[:300]
