"""Connection state recovery for the official Socket.IO clients (PROTOCOL
v2), built on the durable per-room event log.

A socket opts in with ``auth: {token, recover: true}``. It then has a
recovery session, named by a random ``pid`` that the CONNECT reply carries,
and every ``message``, ``message_updated``, ``room`` and ``room_left`` sent
to it gets one extra last argument: its offset, the count of such events
sent to the session so far (``"1"``, ``"2"``, ...). Right before the CONNECT
reply a fresh session gets an ``offset`` event whose only argument is
``"0"``, so a client that reconnects before any other event still returns
an offset of this session (the JS client keeps the last offset it saw
across sessions otherwise).

The session knows, for what it sent, which log event each offset was:
``(room_id, seq)`` (``seq`` of the message, ``update_seq`` of an update,
``last_seq`` of a group's ``room`` event, ``seq`` of ``room_left``; 0 for
the ``room`` event of a new dm or group, not in the log). Its
``base`` is the log position of every room of the user when the session
started (a client catches up to there with ``sync``); the last
``recovery_max_events`` sends are kept one by one, older ones are folded
into ``base`` (per room, the highest seq received without a gap, plus the
seqs above it). The transport is ordered, so the offset a client returns
says exactly what it received: the folded state plus the sends up to that
offset. Everything else the log holds for the user's rooms past that is
what it missed; it is read with ``messages.sync`` and sent, with offsets,
together with the ``room`` event of each room the user is in that the
session never heard of (a dm or group made meanwhile has nothing in the
log until its first message), before the CONNECT reply, which the JS
client buffers and hands to the app before ``connect`` (as Node's server
does). Live events that arrive for the socket meanwhile wait and
follow, without those already replayed.

When a session cannot say that (unknown pid or offset, an offset older
than the sends kept, older than ``recovery_window_seconds``, more than
``recovery_max_events`` missed, another user's pid, the database away) the
socket gets a new session and the client falls back to ``sync``.

Sessions live in this process while their socket is connected; when it
disconnects the session is frozen (nothing more is sent to it) and kept
for the window: in Redis when there is one (so a reconnect to any process
of the service recovers; it is taken with GETDEL, so it recovers once),
else in this process, and on SIGTERM the frozen sessions are written to
``recovery.json`` in the data directory and read back at start. A SIGKILL
(or Redis unreachable) loses them: the client gets ``recovered: false``
and syncs, never a gap.
"""
import logging
import secrets
import time

from engineio import packet as eio_packet
from socketio import packet

from server.errors import PostboxError
from server.services import messages
from server.transport.recovery_saved import Frozen
from server.transport.recovery_session import (  # noqa: F401 (re-exported)
    RECOVERY_FIELDS, TRACKED, Session, event_key, plain_payload)

log = logging.getLogger(__name__)

OFFSET_EVENT = 'offset'  # a fresh session's first event: offset "0"
_ROOM_PREFIX = 'room:'


class Recovery:
    """Recovery sessions of this process: live ones by sid, frozen ones by
    pid. ``server`` is the Socket.IO server (sends and rooms), ``ctx`` the
    service context, ``metrics`` the app's metrics."""

    def __init__(self, server, ctx, metrics, window_seconds, max_events):
        self.server = server
        self.ctx = ctx
        self.metrics = metrics
        self.window = window_seconds
        self.keep = max_events
        self.live = {}  # sid -> Session
        self.frozen = Frozen(window_seconds)  # dropped sockets' sessions
        self._last_encoded = None  # (data, event, packet text but its ']')

    @property
    def shared(self):
        """The Redis fan-out manager frozen sessions are kept in, or None
        (set by the app when the service has Redis)."""
        return self.frozen.shared

    @shared.setter
    def shared(self, manager):
        self.frozen.shared = manager

    @staticmethod
    def opted_in(auth_data) -> bool:
        return isinstance(auth_data, dict) and auth_data.get('recover') is True

    def pid_of(self, sid):
        session = self.live.get(sid)
        return session.pid if session is not None else None

    # -- sending -----------------------------------------------------

    def _encode(self, event, args):
        pkt = self.server.packet_class(packet.EVENT, namespace='/',
                                       data=[event, *args])
        return eio_packet.Packet(eio_packet.MESSAGE, pkt.encode())

    def _encode_with_offset(self, event, data, offset):
        """``[event, data, offset]`` as a packet. One emit reaches many
        sockets with the same ``data``: it is encoded once and each
        socket's offset (digits only) is put before the closing bracket."""
        cached = self._last_encoded
        if cached is None or cached[0] is not data or cached[1] != event:
            text = self.server.packet_class(
                packet.EVENT, namespace='/', data=[event, data]).encode()
            if not isinstance(text, str) or not text.endswith(']'):
                # Not a plain text packet (binary parts): no splicing.
                return self._encode(event, [data, offset])
            # Holding ``data`` keeps its id from being reused. An emitted
            # payload is never changed afterwards (it is shared by every
            # recipient of the emit already).
            cached = self._last_encoded = (data, event, text[:-1])
        return eio_packet.Packet(eio_packet.MESSAGE,
                                 f'{cached[2]},"{offset}"]')

    async def _send(self, sid, eio_sid, session, event, data, key=False):
        """Send with the next offset, recorded as the log event ``key``
        (by default worked out from the payload)."""
        if key is False:
            key = event_key(event, data)
        offset = session.record(key, self.keep)
        try:
            await self.server.send_eio_packet(
                eio_sid, self._encode_with_offset(event, data, offset))
        except Exception:  # that socket is closing
            log.debug('send to %s failed', sid, exc_info=True)

    async def deliver(self, sid, eio_sid, event, data) -> bool:
        """Send a live ``event`` to ``sid`` with its offset, or hold it
        while the socket recovers. False when ``sid`` has no session (the
        caller sends it plainly)."""
        session = self.live.get(sid)
        if session is None:
            return False
        if session.buffer is not None:
            session.buffer.append((event, data))
            return True
        key = event_key(event, data)
        if session.has_sent(key):
            # Already replayed: its live copy was still on the way when
            # the replay read the log (the send's emit follows its
            # commit). Sent again it would be a duplicate.
            self.metrics.recovery_duplicates.inc()
            return True
        await self._send(sid, eio_sid, session, event, data, key)
        return True

    # -- connecting --------------------------------------------------

    def start(self, sid, user_id):
        """Called before the socket enters its user's room: live events
        for it are held from here until ``resume`` sends them."""
        session = Session(None, user_id, {})
        session.buffer = []
        self.live[sid] = session

    def _fall_back(self, reason):
        self.metrics.recoveries.labels('fallback', reason).inc()
        log.info('recovery refused: %s', reason)

    async def _take(self, user_id, auth_data):
        """The frozen session the client names and the offset it saw, or
        (None, reason)."""
        pid, offset = auth_data.get('pid'), auth_data.get('offset')
        if pid is None:
            return None, None  # a first connection: nothing to recover
        self.metrics.recoveries.labels('attempted', '').inc()
        if not isinstance(pid, str) or len(pid) > 64:
            return None, 'unknown_session'
        session = await self.frozen.take(user_id, pid)
        if session is None or session.user_id != user_id:
            return None, 'unknown_session'
        if time.time() - session.saved_at > self.window:
            return None, 'expired'
        if not isinstance(offset, str) or not offset.isascii() or \
                not offset.isdigit() or len(offset) > 18:
            return None, 'unknown_offset'
        offset = int(offset)
        if offset < session.first - 1:
            return None, 'too_old'
        if offset > session.count:
            return None, 'unknown_offset'
        return (session, offset), None

    async def resume(self, sid, eio_sid, user_id, auth_data) -> bool:
        """After the socket entered its user's room: recover the session
        the client names if it can be done exactly, else start a new one;
        send what it missed (or a fresh session's offset event), restore
        its joined rooms, then the live events held meanwhile. True when
        it recovered."""
        held = self.live.get(sid)
        if held is None:
            return False
        try:
            return await self._resume(sid, eio_sid, user_id, auth_data, held)
        except Exception:
            # A bug must not cost the connection: it goes on without.
            log.exception('recovery failed for %s', sid)
            session = self.live.pop(sid, None)
            if session is not None and session.buffer:
                await self._flush_plain(eio_sid, session.buffer)
            return False

    async def _resume(self, sid, eio_sid, user_id, auth_data, held):
        taken, reason = await self._take(user_id, auth_data)
        replay = []
        if taken is not None:
            session, offset = taken
            try:
                replay = await self._missed(session, offset)
            except PostboxError as exc:
                replay, reason = None, exc.code
            if replay is None:
                reason = reason or 'too_many'
                taken, replay = None, []
        if reason is not None:
            self._fall_back(reason)
        fresh = taken is None
        if fresh:
            try:
                base = await messages.room_positions(self.ctx, user_id)
            except PostboxError:
                # No position to start from: this socket goes without.
                self.live.pop(sid, None)
                await self._flush_plain(eio_sid, held.buffer)
                return False
            session = Session(secrets.token_urlsafe(12), user_id,
                              dict(base))
        if self.live.get(sid) is not held:
            return False  # disconnected meanwhile
        session.buffer = held.buffer
        self.live[sid] = session
        if fresh:
            await self._raw(eio_sid, OFFSET_EVENT, [str(session.count)])
        else:
            self.metrics.recoveries.labels('succeeded', '').inc()
            for event, data, key in replay:
                await self._send(sid, eio_sid, session, event, data, key)
            await self._rejoin(sid, user_id, session.joined)
        # Live events held meanwhile follow, without those the replay
        # (or, for a live event that arrives twice, the buffer) sent.
        while session.buffer:
            event, data = session.buffer.pop(0)
            key = event_key(event, data)
            if session.has_sent(key):
                self.metrics.recovery_duplicates.inc()
            else:
                await self._send(sid, eio_sid, session, event, data, key)
        session.buffer = None
        return not fresh

    async def _raw(self, eio_sid, event, args):
        try:
            await self.server.send_eio_packet(eio_sid,
                                              self._encode(event, args))
        except Exception:
            log.debug('send to %s failed', eio_sid, exc_info=True)

    async def _flush_plain(self, eio_sid, buffer):
        for event, data in buffer or ():
            await self._raw(eio_sid, event, [plain_payload(event, data)])

    async def _missed(self, session, offset):
        """The events a client of ``session`` that saw ``offset`` missed,
        as (event, payload, log key) in seq order per room; None if more
        than ``recovery_max_events``. A room the session never heard of
        starts with its ``room`` event as it is now, but with ``last_seq``
        just below its first event replayed (a client takes ``last_seq``
        as applied: it must not skip what follows). That includes a room
        with nothing in the log yet (a new dm, a new group: they take no
        seq), found in the user's rooms as of now, one indexed query."""
        marks, extras = session.received(offset)
        # Read before the log: a room made after this read is either in
        # the log or among the live events held for the socket.
        current = await messages.room_positions(self.ctx, session.user_id)
        events = await self._read_log(session.user_id, marks, extras)
        if events is None:
            return None
        replay = []
        for e in events:
            room_id, seq = e['room_id'], e['seq']
            if seq <= marks.get(room_id, 0) or seq in extras.get(room_id, ()):
                continue
            if room_id not in marks:
                marks[room_id] = 0  # its room event goes first, once
                replay.append(await self._new_room(room_id, seq - 1))
            kind, key = e['type'], (room_id, seq)
            if kind == 'room_left':
                replay.append(('room_left', {'room_id': room_id, 'seq': seq},
                               key))
            elif kind == 'room':
                replay.append(('room', e['room'], key))
            elif kind == 'message_updated':
                # The message as it is now, under this change's own seq:
                # a later change of it is replayed apart, under its own.
                replay.append((kind, {**e['message'], 'update_seq': seq},
                               key))
            else:
                replay.append((kind, e['message'], key))
        quiet = [room_id for room_id, _ in current if room_id not in marks]
        if len(replay) + len(quiet) > self.keep:
            return None
        for room_id in quiet:
            replay.append(await self._new_room(room_id, 0))
        return replay

    async def _new_room(self, room_id, last_seq):
        """The replayed ``room`` event of a room new to the session, with
        ``last_seq`` given. Not a log event: it is recorded as ``(room,
        0)`` (see ``event_key``)."""
        from server.services import rooms  # noqa: the services layer
        info = await rooms.room_info(self.ctx, room_id)
        room = await self.ctx.store.read(rooms.room_dict, self.ctx, info,
                                         last_seq)
        return 'room', room, (room_id, 0)

    async def _read_log(self, user_id, marks, extras):
        """The log events past ``marks`` in the user's rooms, page after
        page of ``sync``, in seq order per room; None once they are more
        than a replay may hold (the received ``extras`` are among them)."""
        limit = self.keep + sum(len(seqs) for seqs in extras.values())
        events, seen, known = [], set(), dict(marks)
        while True:
            answer = await messages.sync(self.ctx, user_id, known)
            new = 0
            for e in answer['events']:
                key = (e['room_id'], e['seq'])
                if key in seen:  # a left room's room_left, on every page
                    continue
                seen.add(key)
                events.append(e)
                new += 1
                if e['type'] == 'room_left':
                    known.pop(e['room_id'], None)
                else:
                    known[e['room_id']] = max(known.get(e['room_id'], 0),
                                              e['seq'])
            if len(events) > limit:
                return None
            if not answer['has_more']:
                return events
            if not new:
                return None  # no progress: never loop

    async def _rejoin(self, sid, user_id, room_ids):
        """Put the socket back in the rooms it had joined, those where the
        user still is a member."""
        if not room_ids:
            return
        from server.services import rooms  # noqa: the services layer
        from server.transport.realtime import room_room
        for room_id in room_ids:
            try:
                info = await rooms.member_room(self.ctx, user_id, room_id)
            except PostboxError:
                continue
            await self.server.enter_room(sid, room_room(info.id, user_id))

    # -- disconnecting -----------------------------------------------

    async def stop(self, sid, joined_rooms):
        """The socket is gone: freeze its session for the window.
        ``joined_rooms`` are its Socket.IO room names."""
        session = self.live.pop(sid, None)
        if session is None or session.pid is None:
            return
        joined = []
        for name in joined_rooms:
            parts = name.split(':')
            if name.startswith(_ROOM_PREFIX) and len(parts) == 3:
                try:
                    joined.append(int(parts[1]))
                except ValueError:
                    pass
        session.joined = tuple(joined)
        session.buffer = None
        session.saved_at = time.time()
        await self.frozen.put(session)

    # -- restarts ----------------------------------------------------

    def save(self, directory):
        """Write the frozen sessions (after a drain) to ``directory``."""
        self.frozen.save(directory)

    def load(self, directory):
        """Read the sessions a drain saved, once (the file goes)."""
        self.frozen.load(directory)

