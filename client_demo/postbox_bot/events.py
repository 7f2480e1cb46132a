"""Events in order, exactly once: the bot's dispatcher.

Live events, a recovery's replay and ``sync`` pages all go through here;
each room's seq decides what is new (handled once) and what is a gap
(filled with ``sync``)."""
import inspect
import logging

import socketio

from .errors import BotError

log = logging.getLogger(__name__)

# Events numbered by the room's seq; everything else is passed straight on
# (a ``room`` event is numbered too when it reports a group change: its
# ``last_seq`` is then the change's seq).
SEQ_EVENTS = ('message', 'message_updated')
# Events that carry a recovery offset as their last argument.
TRACKED = ('message', 'message_updated', 'room', 'room_left')
# A recovering server's first event to a fresh session: offset "0".
OFFSET_EVENT = 'offset'


class Catchup:
    """Queue marker: catch up with ``sync`` before the next live event."""


class Recovered:
    """Queue marker: the server replayed what the bot missed (the events
    before this one); no ``sync`` unless the replay needs one."""


class Wake:
    """Queue marker: wakes the dispatcher so it can see that it must stop."""


def _room_of(event, payload):
    if not isinstance(payload, dict):
        return None
    return payload.get('id') if event == 'room' else payload.get('room_id')


class EventsMixin:
    """The dispatcher of :class:`postbox_bot.Bot`: ``_queue`` holds
    ``(event, payload, replayed)`` and markers, in arrival order."""

    async def _dispatch_loop(self):
        while not self._stopping.is_set():
            item = await self._queue.get()
            if self._stopping.is_set() or isinstance(item, Wake):
                break
            try:
                if isinstance(item, Catchup):
                    await self._catch_up()
                elif isinstance(item, Recovered):
                    await self._recovered()
                else:
                    await self._live(*item)
            except (BotError, socketio.exceptions.SocketIOError) as exc:
                # Disconnected mid-way: the next connect catches up again.
                log.info('catch-up interrupted: %s', exc)

    async def _recovered(self):
        if self._deferred:
            # A group the bot was added to while away came in the replay:
            # where its part of that group starts is in the inbox, which
            # the catch-up reads.
            await self._catch_up()
            return
        log.info('recovered: the missed events were replayed')
        await self._now_ready()

    async def _now_ready(self):
        if self.connected.is_set():
            self.ready.set()
        await self._call_handlers('ready', None)

    async def _live(self, event, payload, replayed=False):
        room_id = _room_of(event, payload)
        if room_id is not None and room_id in self._deferred:
            return  # the catch-up after the replay brings it
        if event in SEQ_EVENTS and isinstance(payload, dict):
            seq = payload.get('update_seq' if event == 'message_updated'
                              else 'seq')
            await self._accept(event, room_id, seq, payload, from_sync=False)
            return
        if event == 'room' and isinstance(payload, dict):
            seq = payload.get('last_seq') or 0
            if replayed and payload.get('kind') == 'group' and \
                    room_id not in self.seqs and room_id not in self.rooms:
                # A group new to the bot, made or joined while it was
                # away: the replay brings its whole log, from before the
                # bot's arrival too. Where its part starts is in the
                # inbox, which the catch-up after the replay reads.
                self._deferred.add(room_id)
                return
            if seq == 0 and room_id in self.rooms:
                # A new room's event the catch-up announced already (it
                # was on its way while the inbox was read).
                return
            if seq > 0 and payload.get('kind') == 'group':
                # A group change, numbered like messages.
                if room_id not in self.seqs:
                    # Added to a group: it starts here for the bot, the
                    # messages from before are history, not news.
                    self.seqs[room_id] = seq - 1
                await self._accept('room', room_id, seq, payload,
                                   from_sync=False)
                return
            self.rooms[room_id] = payload
        if event == 'room_left' and isinstance(payload, dict):
            await self._left(room_id)
            return
        await self._call_handlers(event, payload)

    async def _left(self, room_id):
        """The bot is out of ``room_id``: forget it (a later sync then
        does not list it) and tell the handlers, once."""
        self._kinds.pop(room_id, None)
        known = (self.rooms.pop(room_id, None) is not None) | (
            self.seqs.pop(room_id, None) is not None)
        if known:
            await self._save_state()
            await self._call_handlers('room_left', room_id)

    async def _accept(self, event, room_id, seq, message, from_sync):
        last = self.seqs.get(room_id, 0)
        if seq <= last:
            return  # seen already (live and sync overlap)
        if seq != last + 1 and not from_sync:
            # A gap: something arrived while the socket was changing.
            # sync fills it in order, this event included.
            await self._catch_up()
            return
        self.seqs[room_id] = seq
        if event == 'room':
            self.rooms[room_id] = message
        await self._call_handlers(event, message)
        await self._save_state()

    async def _catch_up(self):
        self.syncs += 1
        session = self._pid
        self._deferred.clear()
        known = set(self.rooms) | set(self.seqs)
        for entry in await self.inbox():
            room = entry['room']
            new = self._have_state and room['id'] not in known
            self.rooms[room['id']] = room
            if not self._have_state and self.skip_history:
                self.seqs[room['id']] = room['last_seq']
            elif new and room['kind'] == 'group' and entry['last_read_seq']:
                # A group the bot was added to while away: from its
                # arrival (the server starts an added member's read
                # marker at the seq of the change that added it). The
                # sync below replays that change: the room handlers run
                # then.
                self.seqs[room['id']] = max(0, entry['last_read_seq'] - 1)
            elif new:
                # A dm opened, or a group made with the bot in it, while
                # the bot was away: announced as live, before its
                # messages; kept in the state from here (a room with no
                # message yet would be new again at every restart).
                self.seqs.setdefault(room['id'], 0)
                await self._call_handlers('room', room)
        if not self._have_state:
            self._have_state = True
            await self._save_state()
        pages = 0
        while True:
            ack = await self.call('sync', {'rooms': {
                str(k): v for k, v in self.seqs.items()}})
            pages += 1
            for event in ack['events']:
                if event['type'] == 'room_left':
                    await self._left(event['room_id'])
                    continue
                await self._accept(event['type'], event['room_id'],
                                   event['seq'],
                                   event.get('message') or event.get('room'),
                                   from_sync=True)
            if not ack['has_more']:
                break
        log.info('caught up in %d sync page(s)', pages)
        # The bot now has all that its recovery session started from: a
        # reconnect may name that session. (Not if the session changed
        # meanwhile: that one's own catch-up follows.)
        self._resumable = session is not None and session == self._pid
        await self._now_ready()

    async def _call_handlers(self, event, payload, raise_errors=False):
        """Run the handlers of ``event``. One that raises is logged, under
        its own name, and the others still run; with ``raise_errors``
        (webhook mode) the first error is raised once they all ran, so the
        event is delivered again."""
        failed = None
        for fn in self._handlers.get(event, ()):
            try:
                result = fn(payload) if payload is not None else fn()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                # Over the socket a broken handler must not stop the bot
                # or replay the event forever; it is logged and the bot
                # moves on.
                log.exception('handler %s for %s failed', _name(fn), event)
                failed = failed or exc
        if failed is not None and raise_errors:
            raise failed


def _name(fn) -> str:
    """A handler's name for the logs: its module and qualified name."""
    name = getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None)
    if name is None:
        return repr(fn)
    module = getattr(fn, '__module__', None)
    return f'{module}.{name}' if module else name
