"""Overrides ``socketio.AsyncServer``: python-socketio's asyncio server on
``engineio_server.Engine``, strict about what clients send (see
``Server``), with connect timeouts and per-address counting of sessions
that have no Socket.IO connection yet.

Upstream names touched (``PRIVATE_NAMES`` says why for each private one):
``_handle_eio_message`` is replaced (every packet checked before the
handlers below it); ``_handle_eio_connect``, ``_handle_eio_disconnect``,
``_send_packet`` and ``disconnect`` are extended; ``_handle_connect``,
``_handle_disconnect``, ``_handle_event``, ``_handle_ack``,
``_trigger_event`` and ``_engineio_server_class`` are called or returned as
python-socketio does; ``_send_eio_packet`` is made public
(``send_eio_packet``). ``COPIED`` holds the hashes of the upstream code
replaced or relied on.
"""
import asyncio
import logging

import socketio
from aiohttp import WSCloseCode
from socketio import packet as sio_packet

from server.services.limits import TooManyConnections
from server.transport.addresses import client_address
from server.transport.json_depth import deeper_than
from server.upstream.engineio_server import Engine, TooManySessions

UPSTREAM = socketio.AsyncServer
PRIVATE_NAMES = {
    'socketio.AsyncServer._engineio_server_class':
        'returns engineio_server.Engine',
    'socketio.AsyncServer._handle_eio_message':
        'replaced: every packet is checked before the handlers below',
    'socketio.AsyncServer._handle_eio_connect':
        'extended: starts the connect timeout, takes an address place',
    'socketio.AsyncServer._handle_eio_disconnect':
        'extended: gives the place back, marks a CONNECT being handled',
    'socketio.AsyncServer._send_packet':
        "extended: the recovery session's pid in the CONNECT reply, no "
        'answer to a CONNECT whose session closed',
    'socketio.AsyncServer._handle_connect':
        'called by _handle_eio_message, as upstream, then undone if the '
        'session closed meanwhile',
    'socketio.AsyncServer._handle_disconnect':
        'called by _handle_eio_message, as upstream',
    'socketio.AsyncServer._handle_event':
        'called by _handle_eio_message, as upstream',
    'socketio.AsyncServer._handle_ack':
        'called by _handle_eio_message, as upstream',
    'socketio.AsyncServer._trigger_event':
        "runs the catch-all '*' handler of a refusal",
    'socketio.AsyncServer._send_eio_packet':
        'made public as send_eio_packet, for the emits that encode once',
}
COPIED = {
    # replaced by Server._handle_eio_message, which checks each packet
    # before it reaches the handlers below it; its refused CONNECT is the
    # one that leaves the session without a connection
    'socketio.AsyncServer._handle_eio_message': 'bef50fc0e1635921',
    'socketio.AsyncServer._handle_connect': 'c97c480cf777de36',
    # Recovery (transport/recovery.py): Server._send_packet adds the pid
    # to the CONNECT reply, which _handle_connect (above) sends after the
    # connect handler
    'socketio.AsyncServer._send_packet': 'a00022b42c1c29e9',
    # send_eio_packet: missed events go out before the CONNECT reply
    'socketio.AsyncServer._send_eio_packet': '64cf72a2ab7d75b1',
}

log = logging.getLogger(__name__)


# Sessions per address and process let in over the per-address limit, so
# that their Socket.IO connect can be refused with its reason (a client
# sees "too many connections from this address", not a failed handshake).
# Each lives until that refusal, at most the connect timeout; past these,
# the handshake itself is refused (429), so a flood of sessions that never
# connect stays bounded.
OVER_LIMIT_SESSIONS = 8

# Client events with these names would reach the server's own lifecycle
# handlers, or ('*') the catch-all handler without the event's name first
# (python-socketio's ``_get_event_handler`` passes a name only to a
# catch-all it falls back to): they are answered as unknown events, with
# their name, instead.
RESERVED_EVENTS = frozenset(('connect', 'disconnect', '*'))

# python-socketio refuses a CONNECT to an unknown namespace, or a second
# one, with this bare string; a client reads ``err.data`` as our other
# refusals' {code, message}, so it gets one too.
UPSTREAM_REFUSAL = 'Unable to connect'
NOT_CONNECTABLE = {'code': 'invalid', 'message': 'Unable to connect: an '
                   'unknown namespace, or connected to it already'}

BINARY_REFUSED = 'binary payloads are not supported; send JSON'
# JSON lets a string hold a lone surrogate escape; the handlers (and
# orjson, and PostgreSQL) take only valid Unicode.
NOT_UNICODE = 'a string is not valid Unicode (a lone surrogate)'


class Server(socketio.AsyncServer):
    """python-socketio's asyncio server on ``Engine``, strict about what
    clients send. Takes ``websocket_compress`` and
    ``websocket_close_timeout`` and ``connect_timeout`` (see ``Engine``),
    ``json_max_depth`` and ``trusted_proxies`` (whose forwarded addresses
    are believed, as in ``addresses.client_address``) besides
    python-socketio's own arguments.

    - A packet that is not valid Socket.IO (``JsonPacket.problem``, or an
      event or ack for a namespace the session is not connected to) closes
      the session with one log line, as the reference server does.
    - Binary packets are refused without keeping anything: an event is
      answered ``invalid`` (or ``rate_limited``: it costs a token of the
      catch-all ``*`` handler, the application's charge for junk), its
      attachments and every other binary message are dropped as they come,
      and the connection goes on with JSON.
    - An event whose payload nests deeper than ``json_max_depth``, or
      holds a string with a lone surrogate (``JsonPacket.lone_surrogate``),
      is answered ``invalid`` the same way; so is one named after a
      lifecycle event (``connect``, ``disconnect``) or the catch-all
      (``*``), as an unknown event.
    - An Engine.IO session with no Socket.IO connection is closed after
      ``eio.connect_timeout`` seconds, and, once ``count_sessions`` has been
      called, holds a place of its address's connection limit meanwhile.
    """

    def __init__(self, *args, json_max_depth=32, trusted_proxies=(),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.json_max_depth = json_max_depth
        self.trusted_proxies = tuple(trusted_proxies)
        self.connections = None  # the per-address counter, if counting
        # Engine.IO sessions without a Socket.IO connection: eio sid ->
        # [address counted or None, over-limit address or None, timer].
        self.waiting = {}
        self.over_limit = {}  # address -> sessions let in over its limit
        self.closing_tasks = set()  # refused sessions, closed once read
        # Sessions whose CONNECT is being handled: eio sid -> [how many
        # CONNECTs, why the session closed meanwhile (None while open)].
        self.connecting = {}
        # Connection state recovery (``recovery.Recovery``), set by the app.
        self.recovery = None
        # Awaited with the sid once a connect succeeded and its reply is
        # queued (the app marks presence there), set by the app.
        self.after_connect = None

    # An Engine.IO packet, encoded once, to one session: for the emit paths
    # that encode a packet once for many sockets (``socketio_manager.
    # local_emit``, transport/recovery.py).
    send_eio_packet = socketio.AsyncServer._send_eio_packet

    def _engineio_server_class(self):
        return Engine

    def count_sessions(self, connections):
        """Count Engine.IO sessions without a Socket.IO connection against
        the per-address limit of ``connections`` (``limits.Connections``:
        ``acquire_address``/``release_address``). A session's place passes
        to its Socket.IO connection, which the connect handler counts."""
        self.connections = connections

    # Sessions without a Socket.IO connection.

    def _address(self, environ):
        request = environ.get('aiohttp.request')
        if request is None:
            return None
        return client_address(request, self.trusted_proxies)

    async def _wait_for_connect(self, eio_sid, environ) -> bool:
        """Start the connect timeout of a session without a Socket.IO
        connection and take its address's place; False (nothing taken)
        when the address has no place left, not even over the limit."""
        counted = over = None
        ip = self._address(environ) if self.connections is not None \
            else None
        if ip is not None:
            try:
                await self.connections.acquire_address(ip)
                counted = ip
            except TooManyConnections:
                if self.over_limit.get(ip, 0) >= OVER_LIMIT_SESSIONS:
                    return False
                self.over_limit[ip] = self.over_limit.get(ip, 0) + 1
                over = ip
        timer = asyncio.get_running_loop().call_later(
            self.eio.connect_timeout, self._connect_timed_out, eio_sid)
        self.waiting[eio_sid] = [counted, over, timer]
        return True

    async def _stop_waiting(self, eio_sid):
        """The session has a Socket.IO connection, or is gone: stop its
        timeout and give back its place."""
        entry = self.waiting.pop(eio_sid, None)
        if entry is None:
            return
        counted, over, timer = entry
        timer.cancel()
        if over is not None:
            left = self.over_limit.get(over, 0) - 1
            if left > 0:
                self.over_limit[over] = left
            else:
                self.over_limit.pop(over, None)
        if counted is not None:
            await self.connections.release_address(counted)

    def _connect_timed_out(self, eio_sid):
        if eio_sid not in self.waiting:
            return
        s = self.eio.sockets.get(eio_sid)
        if s is None or s.closing or s.closed:
            # Closed while its place was being taken (a Redis round trip),
            # after its disconnect had given back nothing yet.
            asyncio.ensure_future(self._stop_waiting(eio_sid))
            return
        log.info('%s: no Socket.IO connect within %ss, closing', eio_sid,
                 self.eio.connect_timeout)
        asyncio.ensure_future(self._close_session(eio_sid))

    def _gone(self, eio_sid) -> bool:
        s = self.eio.sockets.get(eio_sid)
        return s is None or s.closing or s.closed

    def closed(self, sid, namespace='/') -> bool:
        """Whether the Engine.IO session of ``sid``, a socket whose connect
        handler is running, has closed: its handler should then take
        nothing (its disconnect has found no connection to undo)."""
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace)
        return eio_sid is None or self._gone(eio_sid)

    def _connected(self, eio_sid, namespace=None) -> bool:
        """Whether the session has a Socket.IO connection (to
        ``namespace``, or to any)."""
        manager = self.manager
        for ns in (namespace,) if namespace else list(
                manager.get_namespaces()):
            sid = manager.sid_from_eio_sid(eio_sid, ns)
            if sid is not None and manager.is_connected(sid, ns):
                return True
        return False

    async def _close_session(self, eio_sid, code=WSCloseCode.OK):
        """Close an Engine.IO session (a CLOSE packet, then the websocket
        with ``code``) without waiting for a poll to take the packet."""
        s = self.eio.sockets.get(eio_sid)
        if s is None or s.closing or s.closed:
            return
        s.close_code = code
        await s.close(wait=False, reason=self.reason.SERVER_DISCONNECT)

    async def _refused(self, eio_sid):
        """After a refused CONNECT: nothing more can happen on the session
        (a client opens a new one to try again; any packet it sends now
        closes it at once), so it is closed, but only once its
        CONNECT_ERROR has been taken. A closed session answers a poll 400,
        and a long-polling client (or one in the middle of its upgrade)
        would never read why it was refused: socket.io-client would then
        reconnect, be refused and lose the answer again. Until then it
        holds its address's place like a session that never connected
        (if one is left), for ``connect_timeout`` at most."""
        s = self.eio.sockets.get(eio_sid)
        if s is None or s.closing or s.closed:
            return
        s.refused = True
        await self._wait_for_connect(eio_sid, self.environ.get(eio_sid, {}))
        task = asyncio.ensure_future(self._close_when_taken(s))
        self.closing_tasks.add(task)
        task.add_done_callback(self.closing_tasks.discard)

    async def _close_when_taken(self, s):
        try:
            await asyncio.wait_for(s.queue.join(), self.eio.connect_timeout)
        except asyncio.TimeoutError:
            pass  # never polled
        await self._close_session(s.sid)

    async def _left(self, eio_sid, count=True):
        """After a namespace disconnect: a session left without any
        Socket.IO connection waits for a connect again (counted against
        its address unless ``count`` is false), or is closed."""
        s = self.eio.sockets.get(eio_sid)
        if s is None or s.closing or s.closed or eio_sid in self.waiting \
                or self._connected(eio_sid):
            return
        environ = self.environ.get(eio_sid, {}) if count else {}
        if not await self._wait_for_connect(eio_sid, environ):
            await self._close_session(eio_sid)

    async def disconnect(self, sid, namespace=None, ignore_queue=False):
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace or '/')
        await super().disconnect(sid, namespace=namespace,
                                 ignore_queue=ignore_queue)
        if eio_sid is not None:
            # Server side (a revoked token, a drain): the timeout alone, no
            # shared count to ask for while many sockets go at once; the
            # client closes the session itself anyway.
            await self._left(eio_sid, count=False)

    async def _handle_eio_connect(self, eio_sid, environ):
        await super()._handle_eio_connect(eio_sid, environ)
        if not await self._wait_for_connect(eio_sid, environ):
            self.environ.pop(eio_sid, None)
            return TooManySessions('too many connections from this address')

    async def _handle_eio_disconnect(self, eio_sid, reason):
        entry = self.connecting.get(eio_sid)
        if entry is not None:  # its CONNECT is undone when handled
            entry[1] = reason
        await super()._handle_eio_disconnect(eio_sid, reason)
        await self._stop_waiting(eio_sid)

    async def _send_packet(self, eio_sid, pkt):
        """python-socketio's, with the recovery session's ``pid`` in the
        CONNECT reply of a socket that has one; no answer to a CONNECT
        whose session closed while it was handled (see ``_connect``); its
        bare-string refusal made {code, message} (``NOT_CONNECTABLE``)."""
        if pkt.packet_type in (sio_packet.CONNECT,
                               sio_packet.CONNECT_ERROR) and \
                self._gone(eio_sid):
            return
        if pkt.packet_type == sio_packet.CONNECT_ERROR and \
                pkt.data == UPSTREAM_REFUSAL:
            pkt.data = NOT_CONNECTABLE
        if pkt.packet_type == sio_packet.CONNECT and \
                self.recovery is not None and isinstance(pkt.data, dict):
            pid = self.recovery.pid_of(pkt.data.get('sid'))
            if pid is not None:
                pkt.data = {**pkt.data, 'pid': pid}
        await super()._send_packet(eio_sid, pkt)

    # Packets from clients.

    async def _handle_eio_message(self, eio_sid, data):
        """python-socketio's, checking every packet (see the class
        docstring) and keeping no binary attachments."""
        s = self.eio.sockets.get(eio_sid)
        if s is None or s.closing or s.closed:
            return  # sent before the session was closed
        if s.refused:  # anything after a refusal: not a real client's
            return await self._close_session(eio_sid)
        if isinstance(data, (bytes, bytearray)):
            return  # attachments of a refused binary packet, or junk
        if not isinstance(data, str):  # a JSON Engine.IO message
            return await self._invalid(eio_sid, 'not a Socket.IO packet',
                                       data)
        try:
            pkt = self.packet_class(encoded_packet=data)
        except ValueError as exc:
            return await self._invalid(eio_sid, str(exc)[:60], data)
        problem = pkt.problem()
        if problem is not None:
            return await self._invalid(eio_sid, problem, data)
        kind = pkt.packet_type
        namespace = pkt.namespace or '/'
        if kind == sio_packet.CONNECT:
            return await self._connect(eio_sid, namespace, pkt.data)
        if kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, namespace,
                                          self.reason.CLIENT_DISCONNECT)
            await self._left(eio_sid)
            return
        if not self._connected(eio_sid, namespace):
            return await self._invalid(eio_sid, 'not connected to ' +
                                       namespace, data)
        if kind == sio_packet.EVENT:
            name = pkt.data[0] if not pkt.undecoded else None
            if pkt.lone_surrogate:
                await self._refuse(eio_sid, namespace, pkt.id, None,
                                   NOT_UNICODE)
            elif pkt.too_deep or (
                    data.count('[') + data.count('{') > self.json_max_depth
                    and deeper_than(pkt.data, self.json_max_depth + 1)):
                await self._refuse(eio_sid, namespace, pkt.id, name,
                                   'payload is nested too deeply (at most '
                                   f'{self.json_max_depth} levels)')
            elif name in RESERVED_EVENTS:
                await self._refuse(eio_sid, namespace, pkt.id, name)
            else:
                await self._handle_event(eio_sid, namespace, pkt.id,
                                         pkt.data)
        elif kind == sio_packet.BINARY_EVENT:
            await self._refuse(eio_sid, namespace, pkt.id,
                               None if pkt.undecoded else pkt.data[0],
                               BINARY_REFUSED)
        elif kind == sio_packet.ACK and not pkt.undecoded:
            await self._handle_ack(eio_sid, namespace, pkt.id, pkt.data)
        # A binary or undecoded ack answers nothing Postbox asked: dropped.

    async def _connect(self, eio_sid, namespace, data):
        """python-socketio's ``_handle_connect``, undone if the session
        closed while the connect handler awaited (the token check, the
        connection count, recovery). Its disconnect found no connection
        then (python-socketio marks it connected only once the handler
        returns), so nothing would give back what the handler took: the
        user's connection places, the socket's count, its rooms. The
        disconnect handler runs now instead, and no CONNECT reply goes
        out (``_send_packet``).

        Connected, with the session open, the CONNECT reply is queued:
        then ``after_connect(sid)``, if the application set one, is
        awaited, for what must reach the client after that reply (events
        sent to the socket from its connect handler would go ahead of
        it). It is not awaited for a connect undone here."""
        entry = self.connecting.setdefault(eio_sid, [0, None])
        entry[0] += 1
        try:
            await self._stop_waiting(eio_sid)  # its place passes on
            if entry[1] is not None or self._gone(eio_sid):
                # Closed meanwhile (with Redis, the place is given back
                # over the network): python-socketio would look for the
                # session's environ, gone with it.
                return
            await self._handle_connect(eio_sid, namespace, data)
        finally:
            entry[0] -= 1
            if not entry[0]:
                self.connecting.pop(eio_sid, None)
        if entry[1] is not None or self._gone(eio_sid):
            # Connected (the handler succeeded) or not (refused: nothing
            # is left to undo, and _handle_disconnect does nothing).
            await self._handle_disconnect(
                eio_sid, namespace, entry[1] or self.reason.TRANSPORT_CLOSE)
        elif not self._connected(eio_sid):
            await self._refused(eio_sid)
        else:
            after = self.after_connect
            sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
            if after is not None and sid is not None and \
                    self.manager.is_connected(sid, namespace):
                await after(sid)

    async def _refuse(self, eio_sid, namespace, id, event, why=None):
        """Answer an event without running its handler: the catch-all
        ``*`` handler takes the event's token and answers (``invalid``, or
        ``rate_limited``); an ``invalid`` answer says ``why``, if given."""
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        answer = await self._trigger_event('*', namespace, event, sid)
        if not isinstance(answer, dict) or (
                why and answer.get('ok') is False and
                answer.get('error', {}).get('code') == 'invalid'):
            answer = {'ok': False, 'error': {
                'code': 'invalid',
                'message': why or f'unknown event {event!r}'}}
        if id is not None:
            await self._send_packet(eio_sid, self.packet_class(
                sio_packet.ACK, namespace=namespace, id=id, data=[answer]))

    async def _invalid(self, eio_sid, why, data):
        """One line, and the session closed (a protocol error)."""
        log.info('%s: invalid Socket.IO packet (%s) %r, closing', eio_sid,
                 why, data[:40] if isinstance(data, str) else type(data))
        await self._close_session(eio_sid, WSCloseCode.PROTOCOL_ERROR)
