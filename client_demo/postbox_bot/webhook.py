"""Webhook mode: events POSTed by the server instead of a socket.

:func:`verify_signature` checks a delivery's ``Postbox-Signature`` (for any
receiver); :meth:`WebhookMixin.webhook_handler` is an aiohttp handler that
hands each delivery to the bot's usual handlers, once per room and seq.
"""
import hashlib
import hmac
import json
import time

from aiohttp import web

# How old a webhook delivery's signed time may be: a delivery replayed
# later than this (a captured request sent again) is refused.
WEBHOOK_TOLERANCE_SECONDS = 300


def verify_signature(secret, header, body: bytes,
                     tolerance=WEBHOOK_TOLERANCE_SECONDS) -> bool:
    """Whether ``header`` (``Postbox-Signature: t=<unix>,v1=<hex>``) signs
    ``body`` with the webhook's ``secret`` within ``tolerance`` seconds."""
    try:
        parts = dict(p.split('=', 1) for p in header.split(','))
        stamp = int(parts['t'])
        given = parts['v1']
    except (KeyError, ValueError):
        return False
    if abs(time.time() - stamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f'{stamp}.'.encode() + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(given, expected)


class WebhookMixin:
    """The webhook side of :class:`postbox_bot.Bot` (it uses the bot's
    ``seqs``, ``rooms``, handlers and state file)."""

    def webhook_handler(self, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS):
        """An aiohttp request handler for the bot's webhook (set with
        ``PUT /api/bots/{username}/webhook``, which gave ``secret``): it
        checks the signature (401 if wrong or too old), hands the event to
        the same handlers a socket would (``on_message``, ``on``,
        ``on_room``, ``on_room_left``), once per room and seq, and answers
        204 after they ran, so the server retries what was not handled.
        Mount it with ``app.router.add_post(path, handler)``. One
        difference from a socket: webhooks leave out the bot's own edits,
        deletes and reactions (``message_updated``), which a socket
        delivers as to every member."""
        async def handle(request):
            body = await request.read()
            if not verify_signature(secret, request.headers.get(
                    'Postbox-Signature', ''), body, tolerance):
                return web.Response(status=401)
            try:
                event = json.loads(body)
                await self._webhook_event(event)
            except (ValueError, KeyError, TypeError, AttributeError):
                return web.Response(status=400)
            return web.Response(status=204)
        return handle

    async def _webhook_event(self, event):
        """One webhook event; its id is '<room id>.<seq>', in seq order
        per room (the bot's own messages are not sent, so seqs skip)."""
        kind, data = event['type'], event['data']
        room_id, seq = (int(v) for v in event['id'].split('.'))
        # A new room's event has seq 0 (it comes before the room's first
        # event): new once, a retry when the room is known already.
        if seq <= self.seqs.get(room_id, -1 if seq == 0 else 0) or \
                (seq == 0 and room_id in self.rooms):
            return  # a retry of one handled already
        self.seqs[room_id] = seq
        if kind == 'room_left':
            self.rooms.pop(room_id, None)
            await self._call_handlers('room_left', room_id)
        else:
            if kind == 'room':
                self.rooms[room_id] = data
            await self._call_handlers(kind, data)
        await self._save_state()
