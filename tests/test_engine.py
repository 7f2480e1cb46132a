"""The Engine.IO protocol as clients see it on the lean sockets of
server/upstream/engineio_socket.py (pings, upgrades from polling,
server-side closes), and what hostile clients get there (binary packets,
packets that are not Socket.IO, sessions that never connect). The
python-engineio code those sockets are written against is checked by
tests/test_upstream.py."""
import asyncio
import json

import aiohttp
import pytest
import socketio
from aiohttp.test_utils import make_mocked_request
from engineio.async_drivers import aiohttp as engineio_aiohttp
from socketio import packet as sio_packet

from server.upstream.engineio_server import Engine, RequestEnviron
from server.upstream.engineio_socket import Utf8Text
from server.upstream.socketio_packet import JsonPacket
from tests.kit import (ServerProcess, closed_as_protocol_error, connect, http,
                       pair, refused, register, rss_kib)
from tests.test_limits import raw_socket


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
                await closed_as_protocol_error(session, base, garbage, 100)
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


async def _poll_until_closed(session, url, answers=None) -> list:
    """Poll ``url`` (a session's) until it answers the CLOSE packet or
    no longer answers 200; the packets polled, after ``answers``."""
    answers = list(answers or [])
    for _ in range(10):  # each poll waits up to a ping interval
        if '1' in answers:
            break
        async with session.get(url) as resp:
            if resp.status != 200:
                break
            answers += _polled(await resp.text())
    return answers


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


# Hostile clients at the Socket.IO level: binary packets, packets that are
# not Socket.IO, sessions that never connect.

@pytest.fixture(scope='module')
def strict(tmp_path_factory):
    """A server logging at INFO (what a hostile client makes it write is
    checked), with a short connect timeout and a small event budget."""
    proc = ServerProcess(tmp_path_factory.mktemp('strict'), env={
        'POSTBOX_LOG_LEVEL': 'INFO', 'POSTBOX_CONNECT_TIMEOUT_SECONDS': '1',
        'POSTBOX_EVENT_BURST': '4', 'POSTBOX_EVENT_RATE_PER_SECOND': '0.01'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()
    # (python-engineio logs one ERROR line per kind of bad request, such
    # as a poll for a closed session, once per process: not checked.)
    assert 'Traceback' not in proc.read_log(), proc.read_log()


async def next_text(ws, prefix, timeout=10) -> str:
    """The next text frame starting with ``prefix``, skipping others
    (pings are answered, presence events and the like skipped)."""
    while True:
        msg = await ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        if msg.data == '2':
            await ws.send_str('3')
        elif msg.data.startswith(prefix):
            return msg.data


async def closed(ws, timeout=10) -> aiohttp.WSMessage:
    """Read until the server closes ``ws``; returns the close message."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return msg


def acked(frame: str, ack_id: int):
    """The answer in ACK ``frame`` (``43<id>[answer]``) to ``ack_id``."""
    assert frame.startswith(f'43{ack_id}['), frame
    return json.loads(frame[2 + len(str(ack_id)):])[0]


async def test_binary_event_costs_bounded_memory_and_is_refused(strict):
    """A binary event announcing 1,234,567 attachments, then 80 binary
    frames of 1 MB: the event is answered invalid at once, nothing is kept
    (the server's memory grows by far less than the 80 MB sent), and the
    socket goes on with JSON."""
    _, token = await register(strict.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(strict.url, token, session)
        before = rss_kib(strict.proc.pid)
        await ws.send_str('451234567-7["send_dm",{"room_id":1,'
                          '"body":{"_placeholder":true,"num":0}}]')
        answer = acked(await next_text(ws, '437'), 7)
        assert answer == {'ok': False, 'error': {
            'code': 'invalid',
            'message': 'binary payloads are not supported; send JSON'}}
        chunk = b'\x00' * 999_000  # just under max_payload_bytes
        for _ in range(80):
            await ws.send_bytes(chunk)
        await ws.send_str('428["ping",{}]')
        assert acked(await next_text(ws, '438'), 8) == {'ok': True}
        grown_mib = (rss_kib(strict.proc.pid) - before) / 1024
        assert grown_mib < 30, f'server memory grew {grown_mib:.0f} MiB'
        await ws.close()


async def test_binary_events_use_up_the_event_budget(strict):
    """Each binary event costs a token of the user's event budget (4
    here), like any event, whatever it announces: the fifth is
    rate_limited, and so is a JSON event after it."""
    _, token = await register(strict.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(strict.url, token, session)
        errors = []
        for ack_id in range(1, 6):
            await ws.send_str(f'451234567-{ack_id}["ping",'
                              '{"_placeholder":true,"num":0}]')
            await ws.send_bytes(b'attachment')
            errors.append(acked(await next_text(ws, f'43{ack_id}'),
                                ack_id)['error'])
        assert errors[:4] == [{
            'code': 'invalid',
            'message': 'binary payloads are not supported; send JSON'}] * 4
        assert errors[4]['code'] == 'rate_limited', errors
        await ws.send_str('426["ping",{}]')
        assert acked(await next_text(ws, '436'), 6)['error']['code'] == \
            'rate_limited'
        await ws.close()


# Packets that are not valid Socket.IO (the conformance suite's three,
# then others): each closes the socket as a protocol error.
INVALID_PACKETS = ['4abc', '42{}', '42abc["message-with-ack",1]', '4', '42',
                   '42[]', '42[null]', '42[{"a":1}]', '47', '44{}', '4[1]',
                   '4true', '43', '40"token"', '451-["x"', '41{"a":1}']


async def test_invalid_socketio_packets_close_with_one_line(strict):
    """200 copies of an invalid packet from a logged-in socket: the socket
    gets CLOSE and a 1002 close frame, the log one short line for it (no
    traceback), and the user connects again at once."""
    _, token = await register(strict.url)
    async with aiohttp.ClientSession() as session:
        for frame in INVALID_PACKETS:
            start = len(strict.read_log())
            ws = await raw_socket(strict.url, token, session)
            for _ in range(200):
                await ws.send_str(frame)
            assert await next_text(ws, '1') == '1', frame
            msg = await closed(ws)
            assert msg.type == aiohttp.WSMsgType.CLOSE, (frame, msg)
            assert msg.data == aiohttp.WSCloseCode.PROTOCOL_ERROR, frame
            await ws.close()
            # The disconnect is logged after the line about the packet.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while 'disconnect' not in strict.read_log()[start:]:
                assert loop.time() < deadline, strict.read_log()[start:]
                await asyncio.sleep(0.05)
            log = strict.read_log()[start:]
            assert log.count('invalid Socket.IO packet') == 1, (frame, log)
            assert 'Traceback' not in log, log
    client = await connect(strict.url, token)
    assert (await client.call('ping', {}))['ok']
    await client.close()


async def test_events_before_connect_close_the_session(strict):
    """An event, or an ack, on a session without a Socket.IO connection
    (none yet, or refused) closes it, as the reference server does."""
    async with aiohttp.ClientSession() as session:
        for frames in (['421["ping",{}]'], ['431[{}]'],
                       ['40{"token":"wrong"}', '421["ping",{}]']):
            ws = await session.ws_connect(
                strict.url + '/socket.io/?EIO=4&transport=websocket')
            assert (await ws.receive_str(timeout=5)).startswith('0')
            for frame in frames:
                await ws.send_str(frame)
            assert await next_text(ws, '1') == '1', frames
            assert (await closed(ws)).type == aiohttp.WSMsgType.CLOSE
            await ws.close()


async def test_refused_long_polling_client_reads_why_then_is_closed(
        strict):
    """A CONNECT refused on long-polling: the next poll gets the
    CONNECT_ERROR, not a 400 for a session already gone; then the session
    is closed.
    A browser on polling, or in the middle of its upgrade, would otherwise
    never learn that its token was revoked and retry forever."""
    endpoint = strict.url + '/socket.io/?EIO=4&transport=polling'
    async with aiohttp.ClientSession() as session:
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])['sid']
        async with session.post(f'{endpoint}&sid={sid}',
                                data='40{"token":"revoked"}') as resp:
            assert resp.status == 200
        async with session.get(f'{endpoint}&sid={sid}') as resp:
            assert resp.status == 200
            answers = _polled(await resp.text())
        assert answers[0].startswith('44'), answers
        assert json.loads(answers[0][2:])['message'] == 'unauthorized'
        # Then the session is closed (a CLOSE packet, if a poll is there
        # to take it before the session goes).
        await _poll_until_closed(session, f'{endpoint}&sid={sid}', answers)
        async with session.get(f'{endpoint}&sid={sid}') as resp:
            assert resp.status == 400


async def test_nothing_runs_on_a_session_after_its_refusal(strict):
    """Attacker's test: one long-polling POST of a refused CONNECT, then
    a CONNECT with a valid token, then more refused ones. Only the first
    runs (refused); the session is closed by the next packet, so the
    valid CONNECT never runs (it would be a connection on a session about
    to close), nor does the connect handler run once per packet."""
    user, token = await register(strict.url)
    start = len(strict.read_log())
    endpoint = strict.url + '/socket.io/?EIO=4&transport=polling'
    body = '\x1e'.join(['40{"token":"bad"}', '40' + json.dumps(
        {'token': token})] + ['40{"token":"bad"}'] * 10)
    async with aiohttp.ClientSession() as session:
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])['sid']
        async with session.post(f'{endpoint}&sid={sid}', data=body) as resp:
            assert resp.status in (200, 400)
        answers = await _poll_until_closed(session, f'{endpoint}&sid={sid}')
    # At most the refusal was read before the next packet closed it.
    assert all(a.startswith('44') or a in ('1', '6') for a in answers), \
        answers
    async with aiohttp.ClientSession() as session:
        async with session.get(f'{endpoint}&sid={sid}') as resp:
            assert resp.status == 400  # closed
    log = strict.read_log()[start:]
    assert log.count('connection refused: unauthorized') == 1, log
    assert f'connect user_id={user["id"]} ' not in log, log
    # The user's places are all free.
    client = await connect(strict.url, token)
    assert (await client.call('ping', {}))['ok']
    await client.close()


async def test_lifecycle_event_names_are_unknown_events(tmp_path):
    """Events named ``connect`` or ``disconnect`` are answered as unknown
    events; they never reach the connect or disconnect handlers (which
    would count the connection again, or forget it, each time)."""
    server = ServerProcess(tmp_path, env={
        'POSTBOX_MAX_CONNECTIONS_PER_USER': '2'}).start()
    try:
        _, token = await register(server.url)
        async with aiohttp.ClientSession() as session:
            ws = await raw_socket(server.url, token, session)
            for ack_id, name in enumerate(['connect', 'disconnect'] * 3):
                await ws.send_str(f'42{ack_id}' + json.dumps(
                    [name, {}, {'token': token}]))
                answer = acked(await next_text(ws, f'43{ack_id}'), ack_id)
                assert answer == {'ok': False, 'error': {
                    'code': 'invalid',
                    'message': f'unknown event {name!r}'}}, answer
            await ws.close()
        # Nothing was counted: the user's two places are free.
        clients = [await connect(server.url, token) for _ in range(2)]
        for client in clients:
            assert (await client.call('ping', {}))['ok']
            await client.close()
    finally:
        assert await server.astop() == 0


async def test_deeply_nested_event_payloads_are_answered_invalid(strict):
    """A payload nested past json_max_depth (32), and one past what the
    JSON parser takes at all, is answered invalid; the socket stays
    usable and nothing is logged as an error."""
    _, token = await register(strict.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(strict.url, token, session)
        for ack_id, depth in ((1, 40), (2, 5000)):
            await ws.send_str(f'42{ack_id}["ping",{{"a":' + '[' * depth +
                              ']' * depth + '}]')
            answer = acked(await next_text(ws, f'43{ack_id}'), ack_id)
            assert answer['ok'] is False, answer
            assert answer['error']['code'] == 'invalid', answer
            assert 'nested too deeply' in answer['error']['message']
        await ws.send_str('423["ping",{"a":' + '[' * 20 + ']' * 20 + '}]')
        assert acked(await next_text(ws, '433'), 3) == {'ok': True}
        await ws.close()


async def test_session_without_connect_is_closed(strict):
    """An Engine.IO session that sends no Socket.IO connect is closed
    after connect_timeout_seconds (1 s here), on a websocket and on
    long-polling alike."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            strict.url + '/socket.io/?EIO=4&transport=websocket')
        assert (await ws.receive_str(timeout=5)).startswith('0')
        assert await next_text(ws, '1', timeout=15) == '1'
        assert (await closed(ws)).type == aiohttp.WSMsgType.CLOSE
        await ws.close()

        endpoint = strict.url + '/socket.io/?EIO=4&transport=polling'
        async with session.get(endpoint) as resp:
            sid = json.loads((await resp.text())[1:])['sid']
        answers = await _poll_until_closed(session, f'{endpoint}&sid={sid}')
        assert '1' in answers, answers
        async with session.get(f'{endpoint}&sid={sid}') as resp:
            assert resp.status == 400


async def test_session_left_without_connection_is_closed(strict):
    """A session whose Socket.IO connection ended, by the client (41) or
    by the server (a logout everywhere), and that does not connect again
    within the connect timeout is closed."""
    _, token = await register(strict.url)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(strict.url, token, session)
        await ws.send_str('41')
        assert await next_text(ws, '1', timeout=15) == '1'
        assert (await closed(ws)).type == aiohttp.WSMsgType.CLOSE
        await ws.close()

        ws = await raw_socket(strict.url, token, session)
        await ws.send_str('41')
        await ws.send_str('40' + json.dumps({'token': token}))
        await next_text(ws, '40')
        status, _ = await http(strict.url, 'POST', '/api/logout',
                               token=token, json={'all': True})
        assert status == 200
        await next_text(ws, '41')
        assert await next_text(ws, '1', timeout=15) == '1'
        assert (await closed(ws)).type == aiohttp.WSMsgType.CLOSE
        await ws.close()


async def test_polling_payload_that_does_not_decode_closes_quietly(strict):
    """A long-polling POST whose body is not Engine.IO packets gets a 400
    and its session closed, with one log line and no traceback; binary
    packets sent over polling (base64) are dropped like websocket ones."""
    _, token = await register(strict.url)
    endpoint = strict.url + '/socket.io/?EIO=4&transport=polling'
    async with aiohttp.ClientSession() as session:
        async def polling_session():
            async with session.get(endpoint) as resp:
                sid = json.loads((await resp.text())[1:])['sid']
            url = f'{endpoint}&sid={sid}'
            async with session.post(url, data='40' + json.dumps(
                    {'token': token})) as resp:
                assert resp.status == 200
            async with session.get(url) as resp:
                assert any(p.startswith('40')
                           for p in _polled(await resp.text()))
            return url

        url = await polling_session()
        binary = '\x1e'.join(['451-1["ping",{"_placeholder":true,"num":0}]',
                              'bAAECAw==', '422["ping",{}]'])
        async with session.post(url, data=binary) as resp:
            assert resp.status == 200
        answers = []
        for _ in range(10):
            async with session.get(url) as resp:
                answers += _polled(await resp.text())
            if len([p for p in answers if p.startswith('43')]) == 2:
                break
        assert acked(next(p for p in answers if p.startswith('431')), 1) \
            == {'ok': False, 'error': {
                'code': 'invalid',
                'message': 'binary payloads are not supported; send JSON'}}
        assert acked(next(p for p in answers if p.startswith('432')), 2) \
            == {'ok': True}

        for body in ('x', '\x1e\x1e', 'bA', b'\xff\xfe'):
            url = await polling_session()
            start = len(strict.read_log())
            async with session.post(url, data=body) as resp:
                assert resp.status == 400, body
            async with session.get(url) as resp:
                assert resp.status == 400, body  # the session is gone
            log = strict.read_log()[start:]
            assert log.count('undecodable polling payload') == 1, log


async def test_sessions_without_connect_count_per_address(tmp_path):
    """Engine.IO sessions that never connect take places of their
    address's limit (3 here): with 3 held, a real client is refused with
    the address reason, a few more sessions get in only to be refused
    that way, and past those the handshake itself is refused (429).
    Closing the held sessions frees the places."""
    server = ServerProcess(tmp_path, env={
        'POSTBOX_MAX_CONNECTIONS_PER_IP': '3'}).start()
    try:
        base = server.url
        _, token = await register(base)
        async with aiohttp.ClientSession() as session:
            held = []
            for _ in range(3):
                ws = await session.ws_connect(
                    base + '/socket.io/?EIO=4&transport=websocket')
                assert (await ws.receive_str(timeout=5)).startswith('0')
                held.append(ws)
            error = await refused(base, token)
            assert error['data'] == {
                'code': 'rate_limited',
                'message': 'too many connections from this address'}
            extra, statuses = [], []
            for _ in range(30):
                try:
                    ws = await session.ws_connect(
                        base + '/socket.io/?EIO=4&transport=websocket')
                except aiohttp.WSServerHandshakeError as exc:
                    statuses.append(exc.status)
                    continue
                extra.append(ws)
            assert 0 < len(extra) < 30 and set(statuses) == {429}, statuses
            for ws in held + extra:
                await ws.close()
        # The server lets go of the places as it sees the closes.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                client = await connect(base, token)
                break
            except socketio.exceptions.ConnectionError:
                assert loop.time() < deadline, 'places never freed'
                await asyncio.sleep(0.1)
        assert (await client.call('ping', {}))['ok']
        await client.close()
    finally:
        assert await server.astop() == 0


async def test_sessions_without_connect_count_per_address_across_processes(
        redis, tmp_path):
    """With Redis, Engine.IO sessions that never connect count in the
    address's shared count: two held on one process and one on the other
    fill a limit of 3 for both, until they close."""
    from tests.kit import FAST_REDIS_ENV, astop_servers, start_servers
    servers = start_servers(tmp_path / 'cluster', 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
        'POSTBOX_REDIS_CHANNEL': 'pb-' + tmp_path.name,
        'POSTBOX_MAX_CONNECTIONS_PER_IP': '3'})
    try:
        one, two = servers[0].url, servers[1].url
        _, token = await register(one)
        async with aiohttp.ClientSession() as session:
            held = []
            for url in (one, one, two):
                ws = await session.ws_connect(
                    url + '/socket.io/?EIO=4&transport=websocket')
                assert (await ws.receive_str(timeout=5)).startswith('0')
                held.append(ws)
            for url in (one, two):
                assert (await refused(url, token))['data'] == {
                    'code': 'rate_limited',
                    'message': 'too many connections from this address'}
            for ws in held:
                await ws.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                client = await connect(two, token)
                break
            except socketio.exceptions.ConnectionError:
                assert loop.time() < deadline, 'places never freed'
                await asyncio.sleep(0.1)
        assert (await client.call('ping', {}))['ok']
        await client.close()
    finally:
        codes = await astop_servers(servers)
    assert codes == [0, 0], [server.read_log() for server in servers]


def test_a_big_ack_is_encoded_once_to_utf8_a_small_one_as_before():
    """An ack of 16 KB of JSON and more is UTF-8 bytes (sent as a text
    frame as it is); a smaller one, and every event, is the str it was."""
    big = [{'ok': True, 'body': 'héllo 😀 ' * 4000}]
    encoded = JsonPacket(sio_packet.ACK, data=big, id=12).encode()
    assert type(encoded) is Utf8Text
    assert encoded.startswith(b'312[')
    assert json.loads(encoded[3:]) == big
    small = [{'ok': True, 'body': 'héllo 😀'}]
    assert JsonPacket(sio_packet.ACK, data=small, id=7).encode() == \
        '37' + json.dumps(small, ensure_ascii=False, separators=(',', ':'))
    event = JsonPacket(sio_packet.EVENT, data=['message', big[0]]).encode()
    assert isinstance(event, str) and json.loads(event[1:])[1] == big[0]
    on_a_namespace = JsonPacket(sio_packet.ACK, namespace='/x', id=3,
                                data=big).encode()
    assert on_a_namespace.startswith(b'3/x,3[')


async def test_a_big_ack_arrives_whole_over_websocket_and_polling(base):
    """History of 20 KB and more of non-ASCII text: a websocket client
    gets it in a text frame, a long-polling client in its poll, a client
    mid-upgrade either way, each the same messages as sent."""
    alice, bob, a, b, room = await pair(base)
    bodies = [f'{i} ' + 'ünïcødé 😀 ' * 300 for i in range(6)]
    for i, body in enumerate(bodies):
        assert (await a.call('send_dm', {
            'room_id': room['id'], 'body': body,
            'client_msg_id': f'big{i}'}))['ok']
    await b.close()
    polling = await connect(base, b.token, transports=['polling'])
    upgrading = await connect(base, b.token,
                              transports=['polling', 'websocket'])
    for client in (a, polling, upgrading):
        ack = await client.call('join_room', {'room_id': room['id']})
        assert ack['ok'], ack
        assert [m['body'] for m in ack['messages']] == bodies
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(base, a.token, session)
        await ws.send_str('421' + json.dumps(
            ['join_room', {'room_id': room['id']}]))
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.TEXT
        assert msg.data.startswith('431') and len(msg.data.encode()) > 20000
        assert [m['body'] for m in json.loads(msg.data[3:])[0]['messages']] \
            == bodies
        await ws.close()
    for client in (a, polling, upgrading):
        await client.close()


async def test_a_big_ack_for_a_socket_not_on_a_websocket_is_made_text():
    """``Engine.send_packet``: a ``Utf8Text`` message is queued as it is
    for a socket on a websocket, and as its str for one that polls (or is
    still upgrading), since polling would send bytes as binary."""
    engine = Engine(async_mode='aiohttp')
    queued = {}

    class Stub:
        closed = False

        def __init__(self, sid, ws):
            self.sid, self.ws = sid, ws

        async def send(self, pkt):
            queued[self.sid] = pkt

    text = Utf8Text('[{"body":"ünï 😀"}]'.encode())
    for sid, ws in (('on-ws', object()), ('polling', None)):
        engine.sockets[sid] = Stub(sid, ws)
        await engine.send(sid, text)
    assert queued['on-ws'].data is text
    assert type(queued['polling'].data) is str
    assert queued['polling'].encode(b64=True) == '4[{"body":"ünï 😀"}]'
