"""Overrides ``aiohttp.web.WebSocketResponse``: the websocket response
Postbox serves Socket.IO over.

aiohttp writes every websocket frame to the socket as soon as it is sent:
one ``send`` syscall, and one TCP segment, per frame. A DM produces several
frames for the same socket at once (the sender's ack and its own copy of
the message; a partner's messages acked by one group commit), so
``CoalescingWebSocketResponse`` hands the frames a socket gets during one
event-loop iteration to the transport in a single write. Control frames
(close, ping, pong) go out at once, after whatever was waiting, so a close
is never lost behind a buffer.

Upstream names touched: ``WebSocketResponse.prepare`` (extended) and its
private ``_writer``, whose public ``transport`` is replaced by the
coalescing one. aiohttp is not pinned as python-engineio and
python-socketio are; the drift test still checks ``_writer`` exists.
"""
import asyncio

from aiohttp import web

UPSTREAM = web.WebSocketResponse
PRIVATE_NAMES = {
    'aiohttp.web.WebSocketResponse._writer':
        'the frame writer, whose transport prepare() wraps',
}
COPIED = {}

# First bytes of the control frames a server writes: FIN plus the close,
# ping or pong opcode (RFC 6455, section 5.5). A payload written apart from
# its header (aiohttp does that for large frames) can only be mistaken for
# one if it is binary, and then it is merely written at once, in order.
CONTROL_FRAMES = frozenset((0x88, 0x89, 0x8A))


class _CoalescingTransport:
    """Stands in for the TCP transport of one websocket writer: data
    written during an iteration of the event loop is joined and written
    once, at the end of it. ``writelines`` and ``write_eof`` go after
    the data pending; everything else goes to the real transport."""

    def __init__(self, transport):
        self._transport = transport
        self._pending = None
        self.writes = 0  # writes handed to the real transport

    def write(self, data):
        if data and data[0] in CONTROL_FRAMES:
            self.flush()
            self._write(data)
            return
        if self._pending is None:
            self._pending = [data]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self._pending.append(data)

    def writelines(self, chunks):
        # The real transport's would overtake what is pending. Chunk by
        # chunk, so that a control frame among them goes out at once.
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self):
        self.flush()
        self._transport.write_eof()

    def flush(self):
        pending, self._pending = self._pending, None
        if pending:
            self._write(pending[0] if len(pending) == 1
                        else b''.join(pending))

    def _write(self, data):
        if not self._transport.is_closing():
            self.writes += 1
            self._transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class CoalescingWebSocketResponse(web.WebSocketResponse):
    """``web.WebSocketResponse`` whose data frames, compressed or not, are
    coalesced per event-loop iteration; control frames go out at once
    (see the module docstring)."""

    async def prepare(self, request):
        payload_writer = await super().prepare(request)
        writer = self._writer
        if not isinstance(writer.transport, _CoalescingTransport):
            writer.transport = _CoalescingTransport(writer.transport)
        return payload_writer
