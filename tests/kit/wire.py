"""The raw Socket.IO client: Socket.IO v5 / Engine.IO v4 spoken directly
over a websocket, the same wire protocol as ``socketio.AsyncClient`` at a
fraction of its CPU per packet (no task per event, no packet objects), for
load that the generator must not be the bottleneck of (``bench/``).

``RawClient`` (aiohttp's websocket client and orjson) sends events, waits
for acks and hands server events to a callback; ``FastReceiver`` (a bare
asyncio protocol) only receives, parsing websocket frames straight from the
socket buffer, for thousands of fan-out members. Tests use ``Client``
(``tests.kit.clients``), the real client library.
"""
import asyncio
import base64
import itertools
import os
import zlib

import aiohttp
import orjson


class CallError(Exception):
    pass


class RawClient:
    """One Socket.IO connection over a raw websocket. ``on_event(client,
    event, data)`` is called for each server event, or ``on_raw(client,
    text)`` with the undecoded packet when set (cheap counting)."""

    def __init__(self, session, url, token, deflate=True, on_event=None,
                 on_raw=None, auth=None):
        self.session = session
        self.url = url.replace('http://', 'ws://', 1).rstrip('/') + \
            '/socket.io/?EIO=4&transport=websocket'
        self.token = token
        self.auth = auth or {}  # more CONNECT auth fields ({recover: true})
        self.deflate = deflate
        self.on_event = on_event
        self.on_raw = on_raw
        self.ws = None
        self.acks = {}
        self.ack_ids = itertools.count(1)
        self.ack_handler = None  # called with (ack id, response) if set
        self.reader = None
        self.closed = asyncio.Event()

    async def connect(self, timeout=30):
        self.ws = await self.session.ws_connect(
            self.url, compress=15 if self.deflate else 0, autoping=True,
            max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
        opened = await asyncio.wait_for(self.ws.receive(), timeout)
        if not str(opened.data).startswith('0'):
            raise CallError(f'no engine.io open packet: {opened.data!r}')
        await self.ws.send_str('40' + orjson.dumps(
            {'token': self.token, **self.auth}).decode())
        # Events for this user (presence, say) can come before the CONNECT
        # reply: the server emits to the user's room from its connect
        # handler. Nothing here needs them.
        while True:
            reply = await asyncio.wait_for(self.ws.receive(), timeout)
            text = str(reply.data)
            if text.startswith('40'):
                break
            if not text.startswith('42'):
                raise CallError(f'connection refused: {text!r}')
        self.reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        ws = self.ws
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = msg.data
                if data == '2':  # engine.io ping
                    await ws.send_str('3')
                elif data.startswith('42'):
                    if self.on_raw is not None:
                        self.on_raw(self, data)
                    elif self.on_event is not None:
                        event, payload = orjson.loads(data[2:])[:2]
                        self.on_event(self, event, payload)
                elif data.startswith('43'):
                    i = 2
                    while data[i].isdigit():
                        i += 1
                    ack_id = int(data[2:i])
                    response = orjson.loads(data[i:])[0]
                    future = self.acks.pop(ack_id, None)
                    if future is not None:
                        future.set_result(response)
                    elif self.ack_handler is not None:
                        self.ack_handler(ack_id, response)
        except (aiohttp.ClientError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self.closed.set()

    async def emit(self, event, data) -> int:
        """Send an event that asks for an ack without waiting for it; the
        ack goes to ``ack_handler``. Returns the ack id."""
        ack_id = next(self.ack_ids)
        await self.ws.send_str('42%d' % ack_id +
                               orjson.dumps([event, data]).decode())
        return ack_id

    async def call(self, event, data, timeout=30):
        """Send an event and wait for its ack; raises CallError on an
        error ack."""
        ack_id = next(self.ack_ids)
        future = asyncio.get_running_loop().create_future()
        self.acks[ack_id] = future
        await self.ws.send_str('42%d' % ack_id +
                               orjson.dumps([event, data]).decode())
        response = await asyncio.wait_for(future, timeout)
        if not response.get('ok'):
            raise CallError(f'{event}: {response}')
        return response

    async def close(self):
        if self.ws is not None and not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
                pass
        if self.reader is not None:
            self.reader.cancel()


class FastReceiver(asyncio.Protocol):
    """A receive-mostly Socket.IO client on a bare asyncio protocol, for the
    fan-out members: it parses websocket frames straight from the socket
    buffer (several per read) and hands each ``42...`` text packet to
    ``on_raw(self, text)``, at a few microseconds per frame, so that
    thousands of members do not make the generator the bottleneck. It
    offers per-message deflate like ``RawClient``. It sends only the
    CONNECT packet and pongs (masked with a zero key: valid framing, and
    no XOR to compute)."""

    def __init__(self, url, token, deflate=True, on_raw=None):
        rest = url.split('://', 1)[1].rstrip('/')
        self.host, _, port = rest.partition(':')
        self.port = int(port or 80)
        self.token = token
        self.deflate = deflate
        self.on_raw = on_raw
        self.buf = bytearray()
        self.handshaken = False
        self.inflate = None
        self.fragments = None
        self.connected = None
        self.transport = None

    async def connect(self, timeout=30):
        loop = asyncio.get_running_loop()
        self.connected = loop.create_future()
        await loop.create_connection(lambda: self, self.host, self.port)
        await asyncio.wait_for(self.connected, timeout)
        return self

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        ext = ('Sec-WebSocket-Extensions: permessage-deflate; '
               'client_max_window_bits\r\n') if self.deflate else ''
        transport.write((
            f'GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n'
            f'Host: {self.host}:{self.port}\r\nUpgrade: websocket\r\n'
            f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n'
            f'Sec-WebSocket-Version: 13\r\n{ext}\r\n').encode())

    def _send_text(self, text):
        data = text.encode()
        n = len(data)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        else:
            header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, 'big')
        self.transport.write(header + b'\0\0\0\0' + data)

    def _fail(self, why):
        if not self.connected.done():
            self.connected.set_exception(CallError(why))
        self.transport.close()

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b'\r\n\r\n')
            if end < 0:
                return
            head = bytes(buf[:end]).decode('latin-1')
            del buf[:end + 4]
            if not head.startswith('HTTP/1.1 101'):
                return self._fail('websocket upgrade refused: ' +
                                  head.splitlines()[0])
            if 'permessage-deflate' in head.lower():
                self.inflate = zlib.decompressobj(-15)
            self.handshaken = True
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7f
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(buf[start:start + 2], 'big')
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buf[start:start + 8], 'big')
                start += 8
            if size - start < length:
                break
            payload = bytes(buf[start:start + length])
            pos = start + length
            self._frame(b0, payload)
        if pos:
            del buf[:pos]

    def _frame(self, b0, payload):
        opcode = b0 & 0x0f
        if opcode == 0x8:  # close
            self.transport.close()
            return
        if opcode == 0x9:  # websocket ping
            self.transport.write(bytes((0x8a, 0x80 | len(payload))) +
                                 b'\0\0\0\0' + payload)
            return
        if opcode in (0x1, 0x0):
            if not b0 & 0x80:  # a fragment: keep it until FIN
                if self.fragments is None:
                    self.fragments = [b0 & 0x40, bytearray()]
                self.fragments[1] += payload
                return
            if self.fragments is not None:
                compressed = self.fragments[0]
                payload = bytes(self.fragments[1] + payload)
                self.fragments = None
            else:
                compressed = b0 & 0x40
            if compressed:
                payload = self.inflate.decompress(payload + b'\0\0\xff\xff')
            self._packet(payload.decode())

    def _packet(self, text):
        if text.startswith('42'):
            if self.on_raw is not None:
                self.on_raw(self, text)
        elif text == '2':
            self._send_text('3')
        elif text.startswith('0'):
            self._send_text('40' + orjson.dumps({'token': self.token})
                            .decode())
        elif text.startswith('40'):
            if not self.connected.done():
                self.connected.set_result(True)
        elif text.startswith('44'):
            self._fail('connection refused: ' + text)

    def connection_lost(self, exc):
        if self.connected is not None and not self.connected.done():
            self.connected.set_exception(CallError('connection lost'))

    async def close(self):
        if self.transport is not None and not self.transport.is_closing():
            # A close frame, then the socket: the server sees a clean close.
            self.transport.write(b'\x88\x82\0\0\0\0\x03\xe8')
            self.transport.close()


def new_session():
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=60))
