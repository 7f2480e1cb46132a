"""Overrides ``engineio.AsyncServer``: the Engine.IO server under
Postbox's Socket.IO, serving ``engineio_socket.Socket`` sockets (see that
module for why), with a lean send queue (``transport.sendqueue``) and
environ (``RequestEnviron``), one ping schedule (``transport.pings``),
and websocket options of its own.

Upstream names touched (``PRIVATE_NAMES`` says why for each private one):
``handle_request`` (a new websocket is served from here), ``_handle_connect``
(copied, with the socket opened by ``_open_socket``), ``create_queue``,
``send_packet`` (bounded by ``transport.backpressure``), ``shutdown``,
the driver's ``translate_request`` (mirrored by ``RequestEnviron``); the
hashes in ``COPIED`` are of the upstream code copied or mirrored.
"""
import asyncio
import json
import logging
import sys
import time
import urllib.parse
from collections.abc import Mapping

import engineio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from engineio import exceptions, packet

from server.transport.pings import PingSchedule
from server.transport.sendqueue import SendQueue
from server.typedefs import CTX
from server.upstream.aiohttp_websocket import CoalescingWebSocketResponse
from server.upstream.engineio_socket import Socket, Utf8Text

UPSTREAM = engineio.AsyncServer
PRIVATE_NAMES = {
    'engineio.AsyncServer._handle_connect':
        'replaced: a copy with the socket opened by _open_socket',
    'engineio.AsyncServer._async':
        'the driver table: translate_request becomes RequestEnviron',
    'engineio.AsyncServer._service_task':
        'started on the first connect, as _handle_connect does',
    'engineio.AsyncServer._trigger_event':
        'runs the connect handler, as _handle_connect',
    'engineio.AsyncServer._upgrades':
        "the OPEN packet's upgrades, as _handle_connect",
    'engineio.AsyncServer._unauthorized':
        'a refused connect, as _handle_connect',
    'engineio.AsyncServer._ok':
        "the first poll's response, as _handle_connect",
    'engineio.AsyncServer._bad_request':
        'the first poll failed, as _handle_connect',
    'engineio.AsyncServer._generate_sid_cookie':
        'the sid cookie, as _handle_connect',
    'engineio.AsyncServer._make_response':
        'turns a refusal into the aiohttp response, as handle_request',
    'engineio.AsyncServer._cors_allowed_origins':
        'the origin check of a new websocket, as handle_request',
    'engineio.async_socket.AsyncSocket._upgrade_websocket':
        'serves a new websocket (engineio_socket.Socket replaces it)',
}
COPIED = {
    # _is_websocket_connect mirrors its new-websocket checks
    'engineio.AsyncServer.handle_request': '1a8c878e35166cfe',
    'engineio.AsyncServer._handle_connect': '5bd7edc1d1ae115a',
    'engineio.AsyncServer.create_queue': '5ff5673a0c017681',
    'engineio.AsyncServer.send_packet': 'c54317440865030d',
    'engineio.async_drivers.aiohttp.translate_request': '20aa782740060790',
}

log = logging.getLogger(__name__)

# How long a long-polling POST's body may pause, and how slowly it may
# come on average past that, when the app has no config (the unit tests'
# bare Engine): the config's attachment_upload_* values otherwise.
BODY_IDLE_SECONDS = 30.0
BODY_MIN_BYTES_PER_SECOND = 1024


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
        # What may be queued for a socket, and how fast its frames are
        # read (``transport.backpressure``).
        self.send_bound = None
        self.read_budget = None

    def create_queue(self, *args, **kwargs):
        return SendQueue()

    async def send_packet(self, sid, pkt):
        """python-engineio's, unless ``send_bound`` refuses the packet (its
        socket stopped reading and is being cut off). A ``Utf8Text``
        message for a socket not on a websocket (long-polling, or still
        upgrading) is made a str: polling would send bytes as binary."""
        socket = self.sockets.get(sid)
        bound = self.send_bound
        if bound is not None and not bound.admit(socket):
            return
        if type(pkt.data) is Utf8Text and (socket is None or
                                           socket.ws is None):
            pkt = packet.Packet(packet.MESSAGE, data=pkt.data.decode())
        await super().send_packet(sid, pkt)

    def websocket_response(self) -> web.WebSocketResponse:
        # aiohttp refuses a frame of max_msg_size bytes (it compares >=);
        # the OPEN packet's maxPayload, and polling, accept exactly it.
        return CoalescingWebSocketResponse(
            max_msg_size=self.max_http_buffer_size + 1,
            compress=self.websocket_compress,
            timeout=self.websocket_close_timeout,
            # PINGs are answered by ``Socket._receive``, within the
            # socket's read budget.
            autoping=False)

    async def handle_request(self, request):
        """The aiohttp handler of the Engine.IO endpoint. A new websocket
        connection is served from here, so that the coroutines it holds
        for its whole life are few (python-engineio's path would hold four
        more); a long-polling POST to a session is served by
        ``_handle_post``; everything else, refusals included, takes
        python-engineio's path."""
        if request.method == 'POST':
            return await self._handle_post(request)
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

    async def _handle_post(self, request):
        """A long-polling POST to a session, python-engineio's POST branch
        with the checks it lacks: a session closed but not yet removed is
        refused (400) like one that is gone, the body is read here with
        a deadline (a stalled one: 408), whole (chunked, to its end),
        within ``max_http_buffer_size`` (413 ``too_large``) and not
        compressed (415), and a client that hangs up mid-body is no
        error. Anything else (a bad origin, a POST without a session,
        JSONP) takes python-engineio's path."""
        query = urllib.parse.parse_qs(request.query_string)
        environ = RequestEnviron(request)
        if 'sid' not in query or 'j' in query or \
                query.get('transport', ['polling']) != ['polling'] or \
                self._origin_refused(request):
            return await super().handle_request(request)
        sid = query['sid'][0]
        s = self.sockets.get(sid)
        if s is None or s.closing or s.closed:
            return await self._refuse(environ, 400, 'invalid',
                                      f'Invalid session {sid}')
        if not s.connected or s.upgraded:
            return await self._refuse(environ, 400, 'invalid',
                                      'Unexpected HTTP request')
        encoding = request.headers.get('Content-Encoding', 'identity')
        if encoding.strip().lower() != 'identity':
            # aiohttp would inflate it: the size limit would count the
            # inflated bytes. Engine.IO clients never compress a POST.
            return await self._refuse(
                environ, 415, 'invalid',
                f'Content-Encoding {encoding} is not supported')
        if s.post_pending:
            # Engine.IO clients wait for a POST's answer before the next
            # (the reference server refuses an overlap the same way);
            # overlapping ones would each wait out the read budget,
            # outside every per-address count.
            log.info('%s: overlapping POSTs, closing', sid)
            await s.close(wait=False, reason=self.reason.TRANSPORT_ERROR)
            return await self._refuse(environ, 400, 'invalid',
                                      'a POST is under way already')
        s.post_pending = True
        try:
            return await self._take_post(s, request, environ)
        finally:
            s.post_pending = False

    async def _take_post(self, s, request, environ):
        """The body of a long-polling POST to ``s``, read and received
        (``_handle_post``'s checks passed)."""
        sid = s.sid
        try:
            body = await self._read_body(request)
        except _BodyError as exc:
            if exc.status == 413:
                await s.close(wait=False,
                              reason=self.reason.TRANSPORT_ERROR)
            log.info('%s: polling POST refused: %s', sid, exc.message)
            return await self._refuse(environ, exc.status, exc.code,
                                      exc.message)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # aiohttp's payload errors are ConnectionErrors too.
            log.debug('%s: polling POST: the client went away (%r)', sid,
                      exc)
            return web.Response(status=400)
        except HttpProcessingError as exc:  # a broken chunked body
            log.info('%s: polling POST refused: %s', sid, exc)
            return await self._refuse(environ, 400, 'invalid',
                                      'the request body is malformed')
        if not await s.receive_payload(body):
            if s.closed and self.sockets.get(sid) is s:
                del self.sockets[sid]
            return await self._refuse(environ, 400, 'invalid',
                                      'Bad Request')
        return await self._make_response(self._ok(), environ)

    async def _read_body(self, request) -> bytes:
        """The whole body of ``request``, a chunked one to its end.
        Raises _BodyError: 413 past ``max_http_buffer_size``, 408 when
        it pauses longer than the idle time or, past that time, has come
        slower on average than the minimum rate."""
        limit = self.max_http_buffer_size
        length = request.content_length
        if length is not None and length > limit:
            raise _BodyError(413, 'too_large',
                             f'a payload is at most {limit} bytes')
        idle, rate = BODY_IDLE_SECONDS, BODY_MIN_BYTES_PER_SECOND
        ctx = request.app.get(CTX)
        if ctx is not None:
            idle = ctx.config.attachment_upload_idle_seconds
            rate = ctx.config.attachment_upload_min_bytes_per_second
        chunks, size, started = [], 0, time.monotonic()
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await request.content.read(limit + 1 - size)
            except TimeoutError:
                raise _BodyError(
                    408, 'invalid',
                    f'the request body paused for over {idle:g} s') from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise _BodyError(413, 'too_large',
                                 f'a payload is at most {limit} bytes')
            elapsed = time.monotonic() - started
            if elapsed > idle and size < rate * elapsed:
                raise _BodyError(408, 'invalid',
                                 'the request body came too slowly')
        if length is not None and size < length:
            raise asyncio.IncompleteReadError(b''.join(chunks), length)
        return b''.join(chunks)

    async def _refuse(self, environ, status: int, code: str, message: str):
        """A JSON error answer, ``{error: {code, message}}`` as every
        HTTP error of Postbox; the connection is closed after it (the
        body may be left unread)."""
        response = await self._make_response({
            'status': f'{status} {_REASONS[status]}',
            'headers': [('Content-Type', 'application/json')],
            'response': json.dumps({'error': {
                'code': code, 'message': message}}).encode()}, environ)
        response.force_close()
        return response

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
        return not self._origin_refused(request)

    def _origin_refused(self, request) -> bool:
        """Whether python-engineio refuses ``request`` for its Origin."""
        origin = request.headers.get('Origin')
        if self.cors_allowed_origins != [] and origin:
            allowed = self._cors_allowed_origins(RequestEnviron(request))
            if allowed is not None and origin not in allowed:
                return True
        return False

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


_REASONS = {400: 'Bad Request', 408: 'Request Timeout',
            413: 'Payload Too Large', 415: 'Unsupported Media Type'}


class _BodyError(Exception):
    """A long-polling POST body refused: the HTTP status and the error
    code and message of the answer."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class TooManySessions(str):
    """What the Engine.IO ``connect`` handler returns to refuse a session
    with 429 (its text is the reason)."""
