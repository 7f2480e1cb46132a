"""Overrides ``engineio.async_socket.AsyncSocket``: the Engine.IO socket
under Postbox's Socket.IO, python-engineio's with less held per
connection.

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

- the websocket is read in a plain loop by the request's own task;
  packets are written at once, in the sender's own call, and a writer
  task exists only while a write has to wait (the socket's buffer full,
  a large frame compressed in a thread, the close handshake);
- pings are sent from one schedule for all sockets (``PingSchedule``),
  not by a sleeping task per socket; a client that stops answering is
  still closed by python-engineio's service task, and its websocket is
  then closed here;
- the send queue (``SendQueue``) holds no buffer while empty;
- ``environ`` is a read-only view of the aiohttp request that works the
  WSGI keys out when they are read (``RequestEnviron``);
- the handshake's response headers are dropped once sent;
- a message already encoded to UTF-8 (``Utf8Text``: a big Socket.IO ack)
  goes out as a text frame as it is, not decoded to a str and encoded
  back;
- a new websocket is served from the endpoint's handler with one
  coroutine of ours, and the HTTP middlewares let it pass
  (``http.websockets_pass``).

An idle websocket now costs about 18.5 KB (10,000 held, bench/run.py's
idle scenario), most of it aiohttp's (the request and its headers, the
HTTP parser, two tasks, the websocket reader) and uvloop's transport.

What stays python-engineio's: the handshake checks, long-polling, the
upgrade protocol, the service task and every event it triggers. The
methods overridden here are private ones of python-engineio 4.x; the
drift test (``tests/test_upstream.py``) fails when their upstream code
changes, so an upgrade gets this module re-read against it.

Upstream names touched (``PRIVATE_NAMES`` says why for each private one):
``AsyncSocket.send``, ``close``, ``schedule_ping``, ``handle_post_request``
and ``_upgrade_websocket`` are replaced, ``__init__`` and
``handle_get_request`` extended; ``receive``, ``check_ping_timeout``,
``poll``, ``queue``, ``last_ping``, ``connected``, ``upgraded``,
``upgrading``, ``closing``, ``closed`` are used as python-engineio does. The
whole upstream class is hashed in ``COPIED``: these overrides depend on how
the rest of it uses the queue and the flags.
"""
import asyncio
import collections.abc
import logging
import math
import time

from aiohttp import WSCloseCode, WSMsgType
from engineio import async_socket, exceptions, packet, payload

UPSTREAM = async_socket.AsyncSocket
PRIVATE_NAMES = {
    'engineio.async_socket.AsyncSocket._upgrade_websocket':
        'replaced: serves the websocket in a read loop, no tasks while '
        'idle',
    'engineio.AsyncServer._bad_request':
        'the refusal of a second upgrade under way',
    'engineio.AsyncServer._make_response':
        'turns that refusal into the aiohttp response',
}
COPIED = {
    'engineio.async_socket.AsyncSocket': 'af72dafc541d46e6',
    'engineio.base_socket.BaseSocket': 'd787ee3666d08b7a',
    # A Utf8Text (bytes) is a MESSAGE's data as python-engineio takes any
    # bytes: accepted, marked binary (``Engine.send_packet`` relies on it
    # being queued as it is).
    'engineio.packet.Packet.__init__': '26559aaf4a6f4ddd',
}

log = logging.getLogger(__name__)


class Utf8Text(bytes):
    """The payload of an Engine.IO MESSAGE that is text already encoded to
    UTF-8 (``socketio_packet.JsonPacket.encode`` makes them): a websocket
    sends it as a text frame as it is. Python-engineio takes any bytes
    for binary, so ``Engine.send_packet`` hands a socket that is not on a
    websocket its str instead."""

    __slots__ = ()


def decode_packet(data):
    """The Engine.IO packet a websocket frame's ``data`` encodes, or None
    when it is not one: it does not decode, or its type is none of
    Engine.IO's (python-engineio decodes any digit as a type, and its
    ``receive`` then fails on 7, 8 or 9 with an IndexError)."""
    try:
        pkt = packet.Packet(encoded_packet=data)
    except ValueError:
        return None
    return pkt if _known_type(pkt) else None


class _Payload(payload.Payload):
    # python-engineio refuses a payload of more than 16 packets, and the
    # session was closed then; engine.io-client sends whatever it has
    # buffered in one POST (up to maxPayload bytes), so a client flushing
    # 17 emits lost them. The body's size bounds it already; this bounds
    # the parse (about 1 us a packet, on the event loop).
    max_decode_packets = 1000


def decode_payload(body: bytes):
    """The packets of a long-polling POST's ``body``, or None when it is
    not an Engine.IO payload (as ``decode_packet``)."""
    try:
        packets = _Payload(encoded_payload=body.decode('utf-8')).packets
    except (ValueError, KeyError, IndexError):  # KeyError: a bare 'd='
        return None
    return packets if all(_known_type(pkt) for pkt in packets) else None


def _known_type(pkt) -> bool:
    return 0 <= pkt.packet_type < len(packet.packet_names)


class _Started(collections.abc.Coroutine):
    """``coro`` after its first step, which ran outside any task and left
    it waiting on ``waiting`` (what it yielded), as a coroutine a task can
    run on from there: the task's first step gets ``waiting``, every later
    one (and whatever the task throws in, a cancellation before its first
    step included) goes to ``coro``."""

    def __init__(self, coro, waiting):
        self._coro = coro
        self._waiting = [waiting]  # until the task's first step takes it

    def send(self, value):
        if self._waiting:
            return self._waiting.pop()
        return self._coro.send(value)

    def throw(self, *exc):
        self._waiting = None
        return self._coro.throw(*exc)

    def close(self):
        self._coro.close()

    @property
    def cr_frame(self):
        """Where ``coro`` is: what a task's ``get_stack`` (the SIGUSR2
        dump of tasks) shows for it."""
        return self._coro.cr_frame

    def __await__(self):  # a task runs it; nothing awaits it
        raise TypeError('_Started is run by a task, not awaited')


class Socket(async_socket.AsyncSocket):
    """An Engine.IO socket that serves its websocket without tasks of its
    own while idle."""

    # Class defaults, so that an idle socket stores only what it changed.
    ws = None  # the WebSocketResponse, once the socket is on websocket
    writer = None  # the task sending queued packets, while there are any
    tcp_transport = None  # what backpressure aborts to cut a stalled socket
    refused = False  # its Socket.IO CONNECT was refused: closing soon
    close_code = WSCloseCode.OK  # what the websocket is closed with
    upgrade_ws = None  # the websocket of an upgrade under way

    def __init__(self, server, sid):
        super().__init__(server, sid)
        # The read budget's state (``transport.backpressure.ReadBudget``),
        # set here in the same order for every socket so that their
        # instance dicts keep sharing keys: set at the first frame read,
        # the two cost 750 bytes a socket, not 50.
        self.read_tokens = math.inf
        self.read_at = 0.0
    poll_pending = False  # a long-polling GET is waiting for packets
    post_pending = False  # a long-polling POST is being read or taken

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
        if self.closed and self.upgrade_ws is not None:
            # An upgrade under way would otherwise wait for its probe, or
            # its UPGRADE packet, after the session is gone (a connection
            # held outside every per-address count). Closed in a task of
            # its own: the close handshake may wait for the client.
            self.server.start_background_task(
                self.upgrade_ws.close, code=WSCloseCode.GOING_AWAY)
            self.upgrade_ws = None

    async def handle_get_request(self, environ):
        """python-engineio's, except that a poll while another one is
        waiting closes the session, as the reference server does: the
        first poll may be on a connection that is gone (aiohttp does not
        cancel its handler), and the packets it takes would be lost.
        The waiting poll gets the CLOSE packet, the new one a 400
        (EngineIOError); the client reconnects."""
        if 'HTTP_UPGRADE' in environ or self.upgrading or self.upgraded:
            return await super().handle_get_request(environ)
        if self.poll_pending:
            log.info('%s: overlapping polls, closing', self.sid)
            await self.close(wait=False,
                             reason=self.server.reason.TRANSPORT_ERROR)
            raise exceptions.EngineIOError()
        self.poll_pending = True
        try:
            return await super().handle_get_request(environ)
        finally:
            self.poll_pending = False

    async def _upgrade_websocket(self, environ):
        """Take the request onto a websocket, a new socket's or a polling
        socket's upgrade (the probe exchange first), and serve it: read
        packets until it closes, then close the socket. Writing is
        ``_write``'s, started by ``send`` when needed. Returns the
        response once the websocket is closed."""
        if self.upgraded:
            raise OSError('Socket has been upgraded already')
        if self.upgrading or self.closing or self.closed:
            # Two upgrades at once would both succeed, each with a read
            # loop of its own.
            return await self.server._make_response(
                self.server._bad_request('Upgrade refused'), environ)
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
            self.upgrade_ws = ws  # closed by ``close`` meanwhile
            try:
                if not await self._expect(ws, packet.PING, 'probe'):
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION)
                    return ws
                await ws.send_str(packet.Packet(packet.PONG, data='probe')
                                  .encode())
                # ends the poll waiting, so that the client sends UPGRADE
                self.queue.put_nowait(packet.Packet(packet.NOOP))
                if not await self._expect(ws, packet.UPGRADE):
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION)
                    return ws
                self.upgraded = True
            finally:
                self.upgrading = False
                self.upgrade_ws = None
        else:
            self.connected = True
            self.upgraded = True
        self.ws = ws
        self._start_writer()  # what was queued before (the OPEN packet)
        reason = self.server.reason.TRANSPORT_CLOSE
        budget = self.server.read_budget
        # Every await here is a frame held for the life of the connection:
        # the loop reads with ``receive`` rather than ``async for``.
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.PING or msg.type is WSMsgType.PONG:
                # As ``_receive``, inline: a coroutine awaited here would
                # be one more frame held by every idle socket (1 KB).
                if msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                if budget is not None:
                    wait = budget.take(self)
                    if wait:
                        await budget.pause(wait)
                continue
            # An ERROR (a frame over max_msg_size, a broken frame) has
            # closed the websocket already.
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            pkt = decode_packet(msg.data)
            if pkt is None:
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
            if budget is not None:
                wait = budget.take(self)
                if wait:
                    await budget.pause(wait)
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
        """A long-polling POST as python-engineio's path hands it over
        (``Engine.handle_request`` reads the body of every other one and
        calls ``receive_payload``): the whole body is read, not the part
        that has arrived. Raises EngineIOError (the server answers 400)
        when the session is closed here; a session closed already is left
        alone (python-engineio would then fail on its own answer)."""
        if self.closing or self.closed:
            return
        length = int(environ.get('CONTENT_LENGTH', '0'))
        if length > self.server.max_http_buffer_size:
            # Closed without waiting for a poll to take the CLOSE packet:
            # python-engineio's close would hold this request until then.
            await self.close(wait=False,
                             reason=self.server.reason.TRANSPORT_ERROR)
            raise exceptions.ContentTooLongError()
        try:
            body = await environ['wsgi.input'].readexactly(length)
        except asyncio.IncompleteReadError as exc:  # shorter than announced
            body = exc.partial + b'\xff'  # does not decode
        if not await self.receive_payload(body):
            raise exceptions.EngineIOError()

    async def receive_payload(self, body: bytes) -> bool:
        """Take the packets of a long-polling POST's ``body``. A body that
        does not decode closes the session with one log line (not a
        traceback per request, the session left open): returns False
        then. Packets a client never sends (PING, OPEN, NOOP) are
        ignored, and nothing is read once the session is closed."""
        if self.closing or self.closed:
            return False
        packets = decode_payload(body)
        # An empty POST is charged too: a client looping them would cost
        # the loop a request each.
        await self._spend(max(1, len(packets or ())))
        if self.closing or self.closed:
            return False
        if packets is None:
            log.info('%s: undecodable polling payload %r, closing', self.sid,
                     body[:40])
            await self.close(wait=False,
                             reason=self.server.reason.TRANSPORT_ERROR)
            return False
        for pkt in packets:
            try:
                await self.receive(pkt)
            except exceptions.UnknownPacketError:
                pass
            if self.closing or self.closed:
                break
        return True

    async def _receive(self, ws):
        """The next frame of ``ws`` that is not a websocket PING or PONG.
        aiohttp would answer PINGs itself (``autoping``), where no read
        budget sees them, so a flood of them cost the event loop nothing
        to send: here each is answered and charged (``read_budget``)."""
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is not WSMsgType.PONG:
                return msg
            await self._spend(1)

    async def _spend(self, frames):
        budget = self.server.read_budget
        if budget is not None:
            wait = budget.take(self, frames)
            if wait:
                await budget.pause(wait)

    async def _expect(self, ws, packet_type, data=None) -> bool:
        """Whether the next frame on ``ws``, a step of an upgrade, is a
        ``packet_type`` packet (with ``data``, if given). A frame that
        does not decode is a refusal like any wrong one, and so is no
        frame within the ping timeout (the client sends them at once),
        or the socket closed meanwhile (``close`` closes ``ws``)."""
        try:
            async with asyncio.timeout(self.server.ping_timeout):
                msg = await self._receive(ws)
        except TimeoutError:
            log.info('%s: websocket upgrade timed out', self.sid)
            return False
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY) or \
                self.closing or self.closed:
            return False
        pkt = decode_packet(msg.data)
        if pkt is None or pkt.packet_type != packet_type or \
                (data is not None and pkt.data != data):
            log.info('%s: failed websocket upgrade, got %r', self.sid,
                     msg.data[:40])
            return False
        return True

    def _start_writer(self):
        """Write what is queued now, unless a writer is at it already. A
        write that has to wait goes on in a task (``writer`` until done),
        so the sender never waits for a slow client. Most writes never
        wait (aiohttp hands the frame to the transport and returns):
        running ``_write``'s first step here saves a task per send (in an
        open-loop run at 4,200 DMs/s, creating tasks fell from 10% to 6%
        of the event loop's samples). Closing always waits, so a close
        is always the writer task's."""
        if self.ws is None or self.writer is not None or self.queue.empty():
            return
        write = self._write(self.ws)
        try:
            waiting = write.send(None)
        except StopIteration:  # all written
            return
        self.writer = asyncio.ensure_future(_Started(write, waiting))

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
                if type(pkt.data) is Utf8Text:
                    await ws.send_frame(b'4' + pkt.data, WSMsgType.TEXT)
                    continue
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
        # The close handshake runs in the writer task, never in the
        # sender's call (_start_writer): aiohttp's close timeout cancels
        # the task it runs in, and that task is then ``writer``.
        await asyncio.sleep(0)
        try:
            await ws.close(code=self.close_code)
        except Exception:  # already broken; aiohttp has let go of it
            log.debug('%s: close failed', self.sid, exc_info=True)
