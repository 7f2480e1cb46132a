"""The Engine.IO server under Postbox's Socket.IO: python-engineio's, with
less held per connection.

With the stock server an idle websocket cost about 36 KB of server memory,
most of it asyncio machinery rather than data (measured with tracemalloc
and object counts, 2,000 idle sockets): besides aiohttp's two tasks per
connection, python-engineio runs four more per websocket (a writer waiting
on its queue through ``asyncio.wait_for``, which wraps the wait in a task
of its own; the reader's ``wait_for`` around a read task; a task asleep
until the next ping), each with its coroutine frames, timer and context;
an ``asyncio.Queue`` per socket (four deques, about 3 KB while empty); and
a WSGI ``environ`` dict that copies every request header and is kept for
the life of the socket. Here the protocol stays and the machinery goes:

- the websocket is read in a plain loop by the request's own task; a
  writer task exists only while packets wait to be sent;
- pings are sent from one schedule for all sockets (``PingSchedule``),
  not by a sleeping task per socket; a client that stops answering is
  still closed by python-engineio's service task, and its websocket is
  then closed here;
- the send queue (``SendQueue``) holds no buffer while empty;
- ``environ`` is a read-only view of the aiohttp request that works the
  WSGI keys out when they are read (``RequestEnviron``);
- the handshake's response headers are dropped once sent;
- a new websocket is served from the endpoint's handler with one
  coroutine of ours, and the HTTP middlewares let it pass
  (``http.websockets_pass``).

An idle websocket now costs about 18.5 KB (10,000 held, bench/run.py's
idle scenario), most of it aiohttp's (the request and its headers, the
HTTP parser, two tasks, the websocket reader) and uvloop's transport.

What stays python-engineio's: the handshake checks, long-polling, the
upgrade protocol, the service task and every event it triggers. The
methods overridden here are private ones of python-engineio 4.x; the test
``tests/test_engine.py`` fails when their upstream code changes, so an
upgrade gets this module re-read against it.
"""
import asyncio
import collections
import logging
import math
import sys
import time
import urllib.parse
from collections.abc import Mapping

import engineio
import socketio
from aiohttp import WSCloseCode, WSMsgType, web
from engineio import async_socket, exceptions, packet, payload
from socketio import packet as sio_packet

from server.services.limits import TooManyConnections
from server.transport.addresses import client_address
from server.transport.json_depth import deeper_than
from server.transport.websocket import CoalescingWebSocketResponse

log = logging.getLogger(__name__)


class SendQueue:
    """The part of ``asyncio.Queue`` that Engine.IO sockets use (unbounded,
    FIFO, ``task_done``/``join``), holding no deque while empty and no
    futures while nobody waits: an ``asyncio.Queue`` keeps four deques of
    about 700 bytes each for its whole life."""

    __slots__ = ('_items', '_getters', '_unfinished', '_joiners')

    def __init__(self):
        self._items = None  # a deque while anything is queued
        self._getters = None  # futures of get() callers waiting
        self._unfinished = 0
        self._joiners = None  # futures of join() callers waiting

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item):
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()

    async def put(self, item):
        self.put_nowait(item)

    def get_nowait(self):
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    async def get(self):
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = collections.deque()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if self._getters is not None and getter in self._getters:
                    self._getters.remove(getter)
                # Woken and cancelled at once: pass the item on.
                if self._items and not getter.cancelled():
                    self._wake_getter()
                raise
        return self.get_nowait()

    def task_done(self):
        if self._unfinished <= 0:
            raise ValueError('task_done() called too many times')
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners is not None:
            joiners, self._joiners = self._joiners, None
            for joiner in joiners:
                if not joiner.done():
                    joiner.set_result(None)

    async def join(self):
        if self._unfinished > 0:
            joiner = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner

    def _wake_getter(self):
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break
        if not getters:
            self._getters = None


def _wsgi_name(header: str) -> str:
    name = header.upper().replace('-', '_')
    if name in ('CONTENT_TYPE', 'CONTENT_LENGTH'):
        return name
    return 'HTTP_' + name


class RequestEnviron(Mapping):
    """The WSGI environ python-engineio's aiohttp driver builds for a
    request (``translate_request``), as a view of the request: the same
    keys and values, worked out when read. The driver's dict copies every
    header, and python-socketio keeps the environ of each connection for
    its whole life; the request itself is alive anyway while its websocket
    is open. Handlers read ``environ['aiohttp.request']``."""

    __slots__ = ('_request',)

    _FIXED = {
        'wsgi.input': lambda r: r.content,
        'wsgi.errors': lambda r: sys.stderr,
        'wsgi.version': lambda r: (1, 0),
        'wsgi.async': lambda r: True,
        'wsgi.multithread': lambda r: False,
        'wsgi.multiprocess': lambda r: False,
        'wsgi.run_once': lambda r: False,
        'SERVER_SOFTWARE': lambda r: 'aiohttp',
        'REQUEST_METHOD': lambda r: r.method,
        'QUERY_STRING': lambda r: r.query_string or '',
        'RAW_URI': lambda r: r.path_qs,
        'SERVER_PROTOCOL': lambda r: f'HTTP/{r.version[0]}.{r.version[1]}',
        # What the driver puts there: it does not know the peer either.
        'REMOTE_ADDR': lambda r: '127.0.0.1',
        'REMOTE_PORT': lambda r: '0',
        'SERVER_NAME': lambda r: 'aiohttp',
        'SERVER_PORT': lambda r: '0',
        'aiohttp.request': lambda r: r,
        'PATH_INFO': lambda r: r.path,
        'SCRIPT_NAME': lambda r: '',
    }

    def __init__(self, request):
        self._request = request

    def __getitem__(self, key):
        fixed = self._FIXED.get(key)
        if fixed is not None:
            return fixed(self._request)
        if key == 'wsgi.url_scheme':
            return self.get('HTTP_X_FORWARDED_PROTO', 'http')
        values = [value for name, value in self._request.headers.items()
                  if _wsgi_name(name) == key]
        if not values:
            raise KeyError(key)
        if key in ('CONTENT_TYPE', 'CONTENT_LENGTH'):
            return values[-1]
        return ','.join(values)

    def __iter__(self):
        yield from self._FIXED
        yield 'wsgi.url_scheme'
        seen = set()
        for name in self._request.headers:
            key = _wsgi_name(name)
            if key not in seen and key not in self._FIXED:
                seen.add(key)
                yield key

    def __len__(self):
        return sum(1 for _ in self)


class PingSchedule:
    """When each socket is next pinged. Sockets wait in one list per tick
    (a 25th of the ping interval, at most a second) and one loop timer
    serves them all: a timer per socket costs about 400 bytes. A ping goes
    out up to a tick late, well inside the client's allowance (ping
    interval plus ping timeout). With the default 25 s interval a tick is
    a second; with short ones (the conformance suite's 300 ms) pings stay
    within a few ms of due, as a session that answers them but has not
    connected must see three before its 1 s connect timeout."""

    def __init__(self, interval: float):
        self.interval = interval
        self.tick = min(1.0, interval / 25)
        self.due = {}  # tick number -> sockets to ping then
        self.timer = None

    def add(self, socket):
        """Ping ``socket`` in ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + self.interval) / self.tick)
        self.due.setdefault(tick, []).append(socket)
        if self.timer is None:
            self.timer = loop.call_at(tick * self.tick, self._run)

    def _run(self):
        loop = asyncio.get_running_loop()
        # Timers may fire a hair early; a tick this close is due.
        now = loop.time() + self.tick / 100
        for tick in sorted(t for t in self.due if t * self.tick <= now):
            for socket in self.due.pop(tick):
                socket.ping()
        self.timer = None
        if self.due:
            self.timer = loop.call_at(min(self.due) * self.tick, self._run)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.due.clear()


class Socket(async_socket.AsyncSocket):
    """An Engine.IO socket that serves its websocket without tasks of its
    own while idle."""

    # Class defaults, so that an idle socket stores only what it changed.
    ws = None  # the WebSocketResponse, once the socket is on websocket
    writer = None  # the task sending queued packets, while there are any
    tcp_transport = None  # what backpressure aborts to cut a stalled socket
    close_code = WSCloseCode.OK  # what the websocket is closed with

    async def send(self, pkt):
        """Queue ``pkt``; on a websocket, start a writer if none runs."""
        if not await self.check_ping_timeout():
            return
        self.queue.put_nowait(pkt)
        self._start_writer()

    def schedule_ping(self):
        """After the client answered the last ping (and at connect): ping
        again in ``ping_interval``."""
        if self.last_ping:
            self.last_ping = None
            self.server.pings.add(self)

    def ping(self):
        """Send a ping now, unless the socket is closing. The client must
        answer within ``ping_timeout`` (the service task checks)."""
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.queue.put_nowait(packet.Packet(packet.PING))
            self._start_writer()

    async def close(self, wait=True, abort=False, reason=None):
        # ``wait`` waits for the queue to be taken. On a websocket whose
        # writer has met a broken connection nothing would take it, and
        # the CLOSE packet is queued before the end of the websocket
        # anyway: never wait there.
        await super().close(wait=wait and not self.upgraded, abort=abort,
                            reason=reason)
        if self.closed and self.ws is not None:
            # Nothing more goes out: the writer sends what is queued (a
            # CLOSE packet, if any) and closes the websocket, which ends
            # the read loop. python-engineio would leave it open until the
            # client closed it or stayed silent for a ping cycle.
            self.queue.put_nowait(None)
            self._start_writer()

    async def _upgrade_websocket(self, environ):
        """Take the request onto a websocket, a new socket's or a polling
        socket's upgrade (the probe exchange first), and serve it: read
        packets until it closes, then close the socket. Writing is
        ``_write``'s, started by ``send`` when needed. Returns the
        response once the websocket is closed."""
        if self.upgraded:
            raise OSError('Socket has been upgraded already')
        request = environ['aiohttp.request']
        ws = self.server.websocket_response()
        try:
            await ws.prepare(request)
        except Exception:  # not a valid handshake
            if not self.connected:  # a new socket: it will never be used
                await self.close(wait=False, abort=True,
                                 reason=self.server.reason.TRANSPORT_ERROR)
            raise
        # The handshake's response headers are on the wire; aiohttp would
        # keep them (and their serialised form, about 1 KB with our
        # security headers) for as long as the websocket is open.
        ws.headers.clear()
        self.tcp_transport = request.transport
        if self.connected:
            # Sends wait in the queue meanwhile, and polls get a NOOP at
            # once: however the upgrade ends (refused, or the connection
            # broken mid-way), polling must work again after it, or the
            # client polls in a tight loop until the ping timeout.
            self.upgrading = True
            try:
                if not await self._expect(ws, packet.PING, 'probe'):
                    return ws
                await ws.send_str(packet.Packet(packet.PONG, data='probe')
                                  .encode())
                # ends the poll waiting, so that the client sends UPGRADE
                self.queue.put_nowait(packet.Packet(packet.NOOP))
                if not await self._expect(ws, packet.UPGRADE):
                    return ws
                self.upgraded = True
            finally:
                self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True
        self.ws = ws
        self._start_writer()  # what was queued before (the OPEN packet)
        reason = self.server.reason.TRANSPORT_CLOSE
        # Every await here is a frame held for the life of the connection:
        # the loop reads with ``receive`` rather than ``async for``.
        while True:
            msg = await ws.receive()
            # PING/PONG frames are answered inside aiohttp; an ERROR (a
            # frame over max_msg_size, a broken frame) has closed the
            # websocket already.
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            try:
                pkt = packet.Packet(encoded_packet=msg.data)
            except ValueError:
                # Engine.IO clients never send a frame that does not
                # decode, so whatever sent this is not one: one line and
                # the socket is closed. A traceback per frame, the socket
                # left open, let anyone fill the log.
                log.info('%s: undecodable websocket frame %r, closing',
                         self.sid, msg.data[:40])
                self.close_code = WSCloseCode.PROTOCOL_ERROR
                reason = self.server.reason.TRANSPORT_ERROR
                break
            try:
                await self.receive(pkt)
            except exceptions.UnknownPacketError:
                pass
            except exceptions.SocketIsClosedError:
                break
            except Exception:
                log.exception('%s: receive failed', self.sid)
            if self.closing or self.closed:
                # Closed by what it sent (an invalid packet, a CLOSE): what
                # else it has sent is not read, nor logged again.
                break
        self.ws = None
        writer = self.writer
        if writer is not None:
            self.queue.put_nowait(None)
            await writer
        else:
            await ws.close(code=self.close_code)
        await self.close(wait=False, abort=True, reason=reason)
        return ws

    async def handle_post_request(self, environ):
        """A long-polling POST: python-engineio's, except that the whole
        body is read (not the part that has arrived), a body that does not
        decode closes the session with one log line (not a
        traceback per request, the session left open), packets a client
        never sends (PING, OPEN, NOOP) are ignored, and nothing is read
        once the session is closed. Raises EngineIOError (the server
        answers 400) when the session is closed here."""
        length = int(environ.get('CONTENT_LENGTH', '0'))
        if length > self.server.max_http_buffer_size:
            # Closed without waiting for a poll to take the CLOSE packet:
            # python-engineio's close would hold this request until then.
            await self.close(wait=False,
                             reason=self.server.reason.TRANSPORT_ERROR)
            raise exceptions.ContentTooLongError()
        try:
            # python-engineio's read(length) returns what has arrived, the
            # first part of a large body.
            body = await environ['wsgi.input'].readexactly(length)
            packets = payload.Payload(
                encoded_payload=body.decode('utf-8')).packets
        except asyncio.IncompleteReadError as exc:  # shorter than announced
            body = exc.partial
            packets = None
        except ValueError:
            packets = None
        if packets is None:
            log.info('%s: undecodable polling payload %r, closing', self.sid,
                     body[:40])
            await self.close(wait=False,
                             reason=self.server.reason.TRANSPORT_ERROR)
            raise exceptions.EngineIOError() from None
        for pkt in packets:
            try:
                await self.receive(pkt)
            except exceptions.UnknownPacketError:
                pass
            if self.closing or self.closed:
                break

    async def _expect(self, ws, packet_type, data=None) -> bool:
        """Whether the next frame on ``ws``, a step of an upgrade, is a
        ``packet_type`` packet (with ``data``, if given). A frame that
        does not decode is a refusal like any wrong one."""
        msg = await ws.receive()
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return False
        try:
            pkt = packet.Packet(encoded_packet=msg.data)
        except ValueError:
            pkt = None
        if pkt is None or pkt.packet_type != packet_type or \
                (data is not None and pkt.data != data):
            log.info('%s: failed websocket upgrade, got %r', self.sid,
                     msg.data[:40])
            return False
        return True

    def _start_writer(self):
        if self.ws is not None and self.writer is None and \
                not self.queue.empty():
            self.writer = asyncio.ensure_future(self._write(self.ws))

    async def _write(self, ws):
        """Send queued packets until the queue is empty, then end. A None
        in the queue means the socket is done: close the websocket."""
        queue = self.queue
        try:
            while not queue.empty():
                pkt = queue.get_nowait()
                queue.task_done()
                if pkt is None:
                    break
                data = pkt.encode()
                if isinstance(data, bytes):
                    await ws.send_bytes(data)
                else:
                    await ws.send_str(data)
            else:
                self.writer = None  # the next send starts another
                return
        except Exception:  # the connection is gone
            log.debug('%s: send failed', self.sid, exc_info=True)
        # Closing: ``writer`` stays set so that no other one starts, and
        # what is left is dropped so that no ``join`` waits for it.
        while not queue.empty():
            queue.get_nowait()
            queue.task_done()
        try:
            await ws.close(code=self.close_code)
        except Exception:  # already broken; aiohttp has let go of it
            log.debug('%s: close failed', self.sid, exc_info=True)


class Engine(engineio.AsyncServer):
    """python-engineio's asyncio server with ``Socket`` sockets, a lean
    send queue and environ, and websocket options of our own:
    ``websocket_compress`` (per-message deflate, off by default: it costs
    more CPU than it saves on chat-sized frames),
    ``websocket_close_timeout`` (how long a closing websocket waits for
    the client's close frame) and ``connect_timeout`` (how long a session
    may go without a Socket.IO connection: ``Server`` closes it then, as
    the reference server's ``connectTimeout`` does)."""

    def __init__(self, *args, websocket_compress=False,
                 websocket_close_timeout=10.0, connect_timeout=10.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.websocket_compress = websocket_compress
        self.websocket_close_timeout = websocket_close_timeout
        self.connect_timeout = connect_timeout
        self.pings = PingSchedule(self.ping_interval)
        self._async = dict(self._async, translate_request=RequestEnviron)

    def create_queue(self, *args, **kwargs):
        return SendQueue()

    def websocket_response(self) -> web.WebSocketResponse:
        return CoalescingWebSocketResponse(
            max_msg_size=self.max_http_buffer_size,
            compress=self.websocket_compress,
            timeout=self.websocket_close_timeout)

    async def handle_request(self, request):
        """The aiohttp handler of the Engine.IO endpoint. A new websocket
        connection is served from here, so that the coroutines it holds
        for its whole life are few (python-engineio's path would hold four
        more); everything else, refusals included, takes python-engineio's
        path."""
        if not self._is_websocket_connect(request):
            return await super().handle_request(request)
        environ = RequestEnviron(request)
        s = await self._open_socket(environ, 'websocket')
        if isinstance(s, dict):  # the connect handler refused
            return await self._make_response(s, environ)
        try:
            return await s._upgrade_websocket(environ)
        finally:
            if s.closed:
                self.sockets.pop(s.sid, None)

    def _is_websocket_connect(self, request) -> bool:
        """Whether python-engineio would take ``request`` as a valid new
        websocket connection (its ``handle_request``, the ``sid is None``
        and ``transport == 'websocket'`` branch)."""
        if request.method != 'GET' or 'websocket' not in self.transports or \
                request.headers.get('Upgrade', '').lower() != 'websocket':
            return False
        query = urllib.parse.parse_qs(request.query_string)
        if query.get('transport') != ['websocket'] or \
                query.get('EIO') != ['4'] or 'sid' in query or 'j' in query:
            return False
        origin = request.headers.get('Origin')
        if self.cors_allowed_origins != [] and origin:
            allowed = self._cors_allowed_origins(RequestEnviron(request))
            if allowed is not None and origin not in allowed:
                return False
        return True

    async def _handle_connect(self, environ, transport, jsonp_index=None):
        """python-engineio 4.x's ``_handle_connect``, with the socket
        opened by ``_open_socket``."""
        s = await self._open_socket(environ, transport)
        if isinstance(s, dict):
            return s
        if transport == 'websocket':
            # python-engineio goes through handle_get_request, which only
            # checks headers the websocket handshake checks again
            ret = await s._upgrade_websocket(environ)
            if s.closed and s.sid in self.sockets:
                # websocket connection ended, so we are done
                del self.sockets[s.sid]
            return ret
        s.connected = True
        headers = None
        if self.cookie:
            cookie = self.cookie if isinstance(self.cookie, dict) else {
                'name': self.cookie, 'path': '/', 'SameSite': 'Lax'}
            headers = [('Set-Cookie',
                        self._generate_sid_cookie(s.sid, cookie))]
        try:
            return self._ok(await s.poll(), headers=headers,
                            jsonp_index=jsonp_index)
        except exceptions.QueueEmpty:
            return self._bad_request()

    async def _open_socket(self, environ, transport):
        """The first half of python-engineio's ``_handle_connect``: a new
        ``Socket`` with its OPEN packet queued and the connect event run.
        Returns the socket, or the response dict of a refusal."""
        if self.start_service_task:
            # the service task closes sockets whose client stopped answering
            self.start_service_task = False
            self.service_task_handle = self.start_background_task(
                self._service_task)

        sid = self.generate_id()
        s = Socket(self, sid)
        self.sockets[sid] = s
        await s.send(packet.Packet(packet.OPEN, {
            'sid': sid,
            'upgrades': self._upgrades(sid, transport),
            'pingTimeout': int(self.ping_timeout * 1000),
            'pingInterval': int(
                self.ping_interval + self.ping_interval_grace_period) * 1000,
            'maxPayload': self.max_http_buffer_size,
        }))

        ret = await self._trigger_event('connect', sid, environ,
                                        run_async=False)
        if ret is not None and ret is not True:
            del self.sockets[sid]
            if isinstance(ret, TooManySessions):
                return {'status': '429 Too Many Requests',
                        'headers': [('Content-Type', 'application/json')],
                        'response': self._unauthorized(str(ret))['response']}
            self.logger.warning('Application rejected connection')
            return self._unauthorized(ret or None)

        s.schedule_ping()
        return s

    async def shutdown(self):
        self.pings.stop()
        await super().shutdown()


class TooManySessions(str):
    """What the Engine.IO ``connect`` handler returns to refuse a session
    with 429 (its text is the reason)."""


# Sessions per address and process let in over the per-address limit, so
# that their Socket.IO connect can be refused with its reason (a client
# sees "too many connections from this address", not a failed handshake).
# Each lives until that refusal, at most the connect timeout; past these,
# the handshake itself is refused (429), so a flood of sessions that never
# connect stays bounded.
OVER_LIMIT_SESSIONS = 8

# Client events with these names would reach the server's own lifecycle
# handlers: they are answered as unknown events instead.
RESERVED_EVENTS = frozenset(('connect', 'disconnect'))

BINARY_REFUSED = 'binary payloads are not supported; send JSON'


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
    - An event whose payload nests deeper than ``json_max_depth`` is
      answered ``invalid`` the same way; so is one named after a lifecycle
      event (``connect``, ``disconnect``).
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
        # Connection state recovery (``recovery.Recovery``), set by the app.
        self.recovery = None

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
        if eio_sid in self.waiting:
            log.info('%s: no Socket.IO connect within %ss, closing', eio_sid,
                     self.eio.connect_timeout)
            asyncio.ensure_future(self._close_session(eio_sid))

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
        await super()._handle_eio_disconnect(eio_sid, reason)
        await self._stop_waiting(eio_sid)

    async def _send_packet(self, eio_sid, pkt):
        """python-socketio's, with the recovery session's ``pid`` in the
        CONNECT reply of a socket that has one."""
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
            await self._stop_waiting(eio_sid)  # its place passes on
            await self._handle_connect(eio_sid, namespace, pkt.data)
            if not self._connected(eio_sid):
                # Refused: nothing more can happen on this session (a
                # client opens a new one to try again). Sent after the
                # CONNECT_ERROR already queued.
                await self._close_session(eio_sid)
            return
        if kind == sio_packet.DISCONNECT:
            await self._handle_disconnect(eio_sid, namespace,
                                          self.reason.CLIENT_DISCONNECT)
            await self._left(eio_sid)
            return
        if not self._connected(eio_sid, namespace):
            return await self._invalid(eio_sid, 'not connected to ' +
                                       namespace, data)
        if kind == sio_packet.EVENT:
            name = pkt.data[0] if not pkt.too_deep else None
            if pkt.too_deep or (
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
                               None if pkt.too_deep else pkt.data[0],
                               BINARY_REFUSED)
        elif kind == sio_packet.ACK and not pkt.too_deep:
            await self._handle_ack(eio_sid, namespace, pkt.id, pkt.data)
        # A binary or too deep ack answers nothing Postbox asked: dropped.

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
