"""Webhook mode: events POSTed by the server instead of a socket.

:func:`verify_signature` checks a delivery's ``Postbox-Signature`` (for any
receiver); :meth:`WebhookMixin.webhook_handler` is an aiohttp handler that
hands each delivery to the bot's usual handlers, once per room and seq.
"""
import hashlib
import hmac
import json
import logging
import time

from aiohttp import web

from .errors import BotError

log = logging.getLogger(__name__)

# How old a webhook delivery's signed time may be: a delivery replayed
# later than this (a captured request sent again) is refused.
WEBHOOK_TOLERANCE_SECONDS = 300
# How many times a webhook event whose handler raises is answered 500 (and
# delivered again) before it is given up.
WEBHOOK_HANDLER_TRIES = 5


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
        204 after they ran. A handler that raises makes the answer 500 and
        the event is not recorded as handled: the server delivers it again
        later (with backoff, for up to 24 hours), and every handler of the
        event runs again then, so handlers should be idempotent (derive a
        ``client_msg_id`` from the event). A delivery of an event being
        handled right now (a retry that overtook it) is answered 409.
        Mount it with ``app.router.add_post(path, handler)``. In webhook
        mode ``bot.send`` goes over HTTP (no socket needed), ``is_dm``
        works (a room not known yet is read over HTTP) and the token is
        refreshed by the HTTP requests. One difference from a socket:
        webhooks leave out the bot's own edits, deletes and reactions
        (``message_updated``), which a socket delivers as to every
        member."""
        async def handle(request):
            body = await request.read()
            if not verify_signature(secret, request.headers.get(
                    'Postbox-Signature', ''), body, tolerance):
                return web.Response(status=401)
            try:
                event = json.loads(body)
                kind, data = event['type'], event['data']
                room_id, seq = (int(v) for v in event['id'].split('.'))
            except (ValueError, KeyError, TypeError, AttributeError):
                return web.Response(status=400)
            key = (room_id, seq)
            if key in self._webhook_busy:
                return web.Response(status=409)
            self._webhook_busy.add(key)
            try:
                await self._webhook_event(kind, data, room_id, seq)
            except Exception as exc:
                # A handler's error is logged with its traceback where it
                # happened; the server delivers the event again, up to
                # WEBHOOK_HANDLER_TRIES times: the server keeps a room's
                # events in order, so an event that always fails would
                # hold up the room's next ones.
                failures = self._webhook_failures.get(key, 0) + 1
                if failures < WEBHOOK_HANDLER_TRIES:
                    self._webhook_failures[key] = failures
                    log.warning('webhook event %s.%s not handled (%r): '
                                'answered 500, to be delivered again',
                                room_id, seq, exc)
                    return web.Response(status=500)
                self._webhook_failures.pop(key, None)
                log.error('webhook event %s.%s not handled in %s tries '
                          '(%r): given up, so that the room\'s next events '
                          'come', room_id, seq, failures, exc)
            finally:
                self._webhook_busy.discard(key)
            self._webhook_failures.pop(key, None)
            return web.Response(status=204)
        return handle

    async def _webhook_event(self, kind, data, room_id, seq):
        """One webhook event; its id is '<room id>.<seq>', in seq order
        per room (the bot's own messages are not sent, so seqs skip).
        Raises what a handler raised: the seq is recorded only once every
        handler of the event succeeded."""
        # A new room's event has seq 0 (it comes before the room's first
        # event): new once, a retry when the room is known already.
        if seq <= self.seqs.get(room_id, -1 if seq == 0 else 0) or \
                (seq == 0 and room_id in self.rooms):
            return  # a retry of one handled already
        if self.user is None:
            # Who the bot is: is_own, and the state file's owner.
            self.user = (await self.http('GET', '/api/me'))[1]['user']
            self._check_state_owner()
        else:
            # No socket, no keeper task: each delivery refreshes a token
            # that is due (a no-op until then).
            await self._refresh_quietly()
        if kind == 'room_left':
            self.rooms.pop(room_id, None)
            self._kinds.pop(room_id, None)
            await self._call_handlers('room_left', room_id,
                                      raise_errors=True)
        else:
            previous = self.rooms.get(room_id)
            if kind == 'room' and isinstance(data, dict):
                self.rooms[room_id] = data
            elif room_id not in self.rooms and room_id not in self._kinds:
                await self._learn_room(room_id)
            try:
                await self._call_handlers(kind, data, raise_errors=True)
            except Exception:
                # Not handled: its retry must not look like a room event
                # handled already.
                if previous is None:
                    self.rooms.pop(room_id, None)
                else:
                    self.rooms[room_id] = previous
                raise
        self.seqs[room_id] = max(seq, self.seqs.get(room_id, 0))
        await self._save_state()

    async def _learn_room(self, room_id):
        """The kind of one of the bot's rooms, read over HTTP (``GET
        /api/rooms/{id}``): for ``is_dm`` of a room whose ``room`` event
        came before this process started (or before the state file kept
        kinds). Kinds only: ``rooms`` is left to the room events (a room
        read here whose ``room`` event is still on its way must not look
        like one announced already)."""
        try:
            _, answer = await self.http('GET', f'/api/rooms/{room_id}')
        except BotError as exc:
            if exc.code not in ('forbidden', 'not_found'):
                raise
            return  # out of the room since: an owed event, kind unknown
        self._kinds[room_id] = answer['room']['kind']
