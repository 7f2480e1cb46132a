"""The Engine.IO protocol as clients see it on the lean sockets of
server/transport/engine.py (pings, upgrades from polling, server-side
closes), and the python-engineio code that module is written against."""
import asyncio
import hashlib
import inspect
import json

import aiohttp
import engineio
import pytest
from aiohttp.test_utils import make_mocked_request
from engineio import async_socket, base_socket
from engineio.async_drivers import aiohttp as engineio_aiohttp

from server.transport.engine import RequestEnviron
from tests.helpers import ServerProcess, connect, pair, register
from tests.test_limits import raw_socket

# The python-engineio code server/transport/engine.py copies, overrides or
# relies on, by hash of its source. When an upgrade changes one of them,
# re-read engine.py against the new code (the copied ``_handle_connect``,
# the websocket-connect checks mirrored from ``handle_request``, the socket
# methods replaced, the environ mirrored from ``translate_request``), then
# update the hash here.
UPSTREAM = {
    'engineio.AsyncServer.handle_request':
        (engineio.AsyncServer.handle_request, '1a8c878e35166cfe'),
    'engineio.AsyncServer._handle_connect':
        (engineio.AsyncServer._handle_connect, '5bd7edc1d1ae115a'),
    'engineio.AsyncServer.create_queue':
        (engineio.AsyncServer.create_queue, '5ff5673a0c017681'),
    'engineio.async_socket.AsyncSocket':
        (async_socket.AsyncSocket, 'af72dafc541d46e6'),
    'engineio.base_socket.BaseSocket':
        (base_socket.BaseSocket, 'd787ee3666d08b7a'),
    'engineio.async_drivers.aiohttp.translate_request':
        (engineio_aiohttp.translate_request, '20aa782740060790'),
}


@pytest.mark.parametrize('name', sorted(UPSTREAM))
def test_python_engineio_code_is_what_engine_py_was_written_against(name):
    obj, expected = UPSTREAM[name]
    digest = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    assert digest[:16] == expected, (
        f'{name} changed in python-engineio {engineio.__version__}: '
        'check server/transport/engine.py against it')


def test_environ_view_reads_as_the_engineio_driver_environ():
    request = make_mocked_request(
        'GET', '/socket.io/?EIO=4&transport=websocket', headers={
            'Host': 'chat.example.com', 'Origin': 'https://chat.example.com',
            'Upgrade': 'websocket', 'Connection': 'Upgrade',
            'Content-Type': 'text/plain', 'X-Forwarded-Proto': 'https',
            'Accept-Language': 'en'})
    expected = engineio_aiohttp.translate_request(request)
    view = RequestEnviron(request)
    assert dict(view) == expected
    assert view['aiohttp.request'] is request
    assert view.get('HTTP_COOKIE') is None and 'HTTP_COOKIE' not in view


@pytest.fixture(scope='module')
def fast_pings(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp('fast-pings'), env={
        'POSTBOX_PING_INTERVAL': '0.5', 'POSTBOX_PING_TIMEOUT': '2'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


async def test_pings_keep_an_idle_websocket_open(fast_pings):
    base = fast_pings.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(base, token, session)
        # Several ping intervals, answering each ping: the server keeps
        # pinging and never closes.
        for _ in range(4):
            assert await ws.receive_str(timeout=5) == '2'
            await ws.send_str('3')
        await ws.send_str('421' + json.dumps(['ping', {}]))
        while True:
            text = await ws.receive_str(timeout=5)
            if text == '2':
                await ws.send_str('3')
                continue
            assert text.startswith('431')
            assert json.loads(text[3:]) == [{'ok': True}]
            break
        await ws.close()


async def test_polling_client_upgrades_to_websocket(base):
    alice, bob, a, b, room = await pair(base)
    await b.close()
    b = await connect(base, b.token, transports=['polling', 'websocket'])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while b.sio.transport() != 'websocket':
        assert loop.time() < deadline, 'the client never upgraded'
        await asyncio.sleep(0.05)  # the client upgrades in the background
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'up',
                                   'client_msg_id': 'up1'})
    assert ack['ok']
    assert (await b.next('message'))['body'] == 'up'
    assert (await b.call('send_dm', {'room_id': room['id'], 'body': 'back',
                                     'client_msg_id': 'up2'}))['ok']
    assert (await a.next('message', where=lambda m: m['body'] == 'back'))
    for client in (a, b):
        await client.close()


async def test_engineio_close_packet_ends_the_connection(base):
    """A client that says goodbye at the Engine.IO level (packet ``1``)
    is disconnected and has its websocket closed by the server."""
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(base, token, session)
        await ws.send_str('1')
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # The server let go of it: the user can connect again at once and the
    # new socket works.
    again = await connect(base, token)
    assert (await again.call('rooms', {}))['ok']
    await again.close()


async def test_websocket_handshake_carries_the_security_headers(base):
    """The handshake's response headers are dropped by the server once
    sent, not before: the client gets them."""
    handshakes = []

    async def on_request_end(session, context, params):
        handshakes.append(params.response.headers)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        ws = await session.ws_connect(
            base + '/socket.io/?EIO=4&transport=websocket')
        assert (await ws.receive_str(timeout=5)).startswith('0')
        await ws.close()
    headers, = handshakes
    assert headers['Upgrade'].lower() == 'websocket'
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert headers['X-Frame-Options'] == 'DENY'
    assert "frame-ancestors 'none'" in headers['Content-Security-Policy']


async def test_invalid_websocket_handshake_is_refused(base):
    """An upgrade request that is not a valid websocket handshake (no
    Sec-WebSocket-Key) gets a 400; the endpoint goes on serving."""
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        async with session.get(
                base + '/socket.io/?EIO=4&transport=websocket',
                headers={'Upgrade': 'websocket', 'Connection': 'Upgrade',
                         'Sec-WebSocket-Version': '13'}) as resp:
            assert resp.status == 400
    client = await connect(base, token)
    assert (await client.call('rooms', {}))['ok']
    await client.close()


# Frames no Engine.IO client sends: not a packet type, empty, a binary
# packet that is not base64, a digit int() refuses.
UNDECODABLE = ['x', '', 'bA', '\u00b2']


async def test_undecodable_frames_close_the_websocket_quietly(tmp_path):
    """Frames that are not Engine.IO packets get the websocket closed as a
    protocol error, with one log line and no traceback; the server goes
    on serving everyone else."""
    server = ServerProcess(tmp_path, env={'POSTBOX_LOG_LEVEL': 'INFO'})
    server.start()
    try:
        base = server.url
        async with aiohttp.ClientSession() as session:
            for garbage in UNDECODABLE:
                ws = await session.ws_connect(
                    base + '/socket.io/?EIO=4&transport=websocket')
                assert (await ws.receive_str(timeout=5)).startswith('0')
                for _ in range(100):
                    await ws.send_str(garbage)
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE, (garbage, msg)
                assert msg.data == aiohttp.WSCloseCode.PROTOCOL_ERROR
                await ws.close()
        _, token = await register(base)
        client = await connect(base, token)
        assert (await client.call('rooms', {}))['ok']
        await client.close()
    finally:
        assert await server.astop() == 0
    log = server.read_log()
    assert 'Traceback' not in log and ' ERROR ' not in log, log
    assert log.count('undecodable websocket frame') == len(UNDECODABLE), log


def _polled(body: str) -> list:
    """The packets of a polling response."""
    return body.split('\x1e')


async def test_undecodable_upgrade_probe_leaves_polling_working(base):
    """A websocket upgrade whose probe is not an Engine.IO packet is
    refused; the client's polling goes on as before (its polls are not
    answered with NOOPs at once, as while an upgrade is under way)."""
    _, token = await register(base)
    endpoint = base + '/socket.io/?EIO=4&transport=polling'
    async with aiohttp.ClientSession() as session:
        async with session.get(endpoint) as resp:
            opening = await resp.text()
        assert opening.startswith('0'), opening
        sid = json.loads(opening[1:])['sid']
        polling = f'{endpoint}&sid={sid}'
        async with session.post(polling, data='40' + json.dumps(
                {'token': token})) as resp:
            assert resp.status == 200
        async with session.get(polling) as resp:
            assert any(p.startswith('40') for p in _polled(await resp.text()))

        ws = await session.ws_connect(
            base + f'/socket.io/?EIO=4&transport=websocket&sid={sid}')
        await ws.send_str('x')  # not '2probe', not a packet at all
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await ws.close()

        async with session.post(polling, data='421' + json.dumps(
                ['rooms', {}])) as resp:
            assert resp.status == 200
        answers = []
        for _ in range(10):
            async with session.get(polling) as resp:
                assert resp.status == 200
                answers += _polled(await resp.text())
            if any(p.startswith('431') for p in answers):
                break
        assert '6' not in answers, answers  # no NOOP: not upgrading
        ack, = [p for p in answers if p.startswith('431')]
        assert json.loads(ack[3:])[0]['ok']
