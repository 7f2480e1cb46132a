"""Engine.IO requests a hostile (or broken) client sends, against a real
server: packet types that do not exist, websocket upgrades that never
finish, polling POSTs that stall, overlap, come chunked or compressed,
or are exactly as large as allowed. Each gets a clear refusal, no
traceback in the log, no lost ack and nothing held after the session
ends. Found by a black-box review; each test failed before its fix."""
import asyncio
import json
import os
import urllib.parse

import aiohttp
import pytest

from tests.kit import ServerProcess, closed_as_protocol_error, connect, \
    http, register
from tests.test_limits import raw_socket

MAX_PAYLOAD = 4000  # POSTBOX_MAX_PAYLOAD_BYTES of the server here


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    """A server logging at INFO, with a short body idle time and a small
    payload limit."""
    proc = ServerProcess(tmp_path_factory.mktemp('eio-hostile'), env={
        'POSTBOX_LOG_LEVEL': 'INFO',
        'POSTBOX_ATTACHMENT_UPLOAD_IDLE_SECONDS': '1',
        'POSTBOX_MAX_PAYLOAD_BYTES': str(MAX_PAYLOAD)})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()
    assert 'Traceback' not in proc.read_log(), proc.read_log()


def polling(base) -> str:
    return base + '/socket.io/?EIO=4&transport=polling'


async def handshake(session, base) -> str:
    async with session.get(polling(base)) as resp:
        assert resp.status == 200
        return json.loads((await resp.text())[1:])['sid']


async def connected(session, base, token) -> str:
    """A long-polling session with its Socket.IO connection made."""
    sid = await handshake(session, base)
    url = f'{polling(base)}&sid={sid}'
    async with session.post(url, data='40' + json.dumps(
            {'token': token})) as resp:
        assert resp.status == 200
    async with session.get(url) as resp:
        assert any(p.startswith('40') for p in (await resp.text())
                   .split('\x1e'))
    return sid


async def raw_http(base, head: str, body: bytes = b''):
    """A connection with ``head`` (its Host header added) and ``body``
    sent: (reader, writer)."""
    url = urllib.parse.urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    first, rest = head.split('\r\n', 1)
    writer.write(f'{first}\r\nHost: {url.netloc}\r\n{rest}'.encode() + body)
    await writer.drain()
    return reader, writer


def status_of(answer: bytes) -> int:
    return int(answer.split(b'\r\n', 1)[0].split()[1])


def fds(proc) -> int:
    return len(os.listdir(f'/proc/{proc.pid}/fd'))


async def still_serving(base):
    """Another user's connection works: an event is acked."""
    _, token = await register(base)
    client = await connect(base, token)
    assert (await client.call('rooms', {}))['ok']
    await client.close()


async def test_packet_types_that_do_not_exist_close_quietly(hostile):
    """Packet types 7, 8, 9 are not Engine.IO's: a websocket sending them
    is closed 1002 and a polling POST answered 400 (its session closed),
    with one log line each, no traceback."""
    base = hostile.url
    start = len(hostile.read_log())
    async with aiohttp.ClientSession() as session:
        for kind in '789':
            await closed_as_protocol_error(session, base, kind, 200)
        _, token = await register(base)
        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        async with session.post(url, data='8\x1e8') as resp:
            assert resp.status == 400
        async with session.get(url) as resp:
            assert resp.status == 400
    await still_serving(base)
    log = hostile.read_log()[start:]
    assert 'Traceback' not in log and 'receive failed' not in log, log
    assert log.count('undecodable websocket frame') == 3, log
    assert log.count('undecodable polling payload') == 1, log


async def test_upgrade_never_probed_ends_with_its_session(hostile):
    """A websocket upgrade that never sends its probe is closed when its
    session closes: nothing is held past it (file descriptors come
    back). A second upgrade of a session while one is under way is
    refused."""
    base = hostile.url
    ws_url = base + '/socket.io/?EIO=4&transport=websocket&sid='
    async with aiohttp.ClientSession() as session:
        await handshake(session, base)  # the service task runs already
        before = fds(hostile)
        upgrades = []
        for _ in range(20):
            sid = await handshake(session, base)
            upgrades.append(await session.ws_connect(ws_url + sid))
            async with session.post(f'{polling(base)}&sid={sid}',
                                    data='1') as resp:
                assert resp.status == 200
        for ws in upgrades:
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE,
                                aiohttp.WSMsgType.CLOSED), msg
            await ws.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while fds(hostile) > before + 2:
            assert loop.time() < deadline, (before, fds(hostile))
            await asyncio.sleep(0.1)

        sid = await handshake(session, base)
        first = await session.ws_connect(ws_url + sid)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url + sid)
        assert refused.value.status == 400
        await first.close()


async def test_post_to_a_closed_session_is_400(hostile):
    """A POST to a session closed (by a CLOSE packet) but not yet removed
    is refused like one to a session that is gone, not a 500."""
    base = hostile.url
    async with aiohttp.ClientSession() as session:
        sid = await handshake(session, base)
        url = f'{polling(base)}&sid={sid}'
        async with session.post(url, data='1') as resp:
            assert resp.status == 200
        async with session.post(url, data='1') as resp:
            assert resp.status == 400, await resp.text()


async def test_post_finished_after_its_session_is_gone_is_400(hostile):
    """A POST body still coming while its session is closed and removed
    gets a 400 when it ends, even if it does not decode."""
    base = hostile.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        body = b'\xff\xfe garbage not utf8'
        reader, writer = await raw_http(base, (
            f'POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n'
            f'Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n'
            '\r\n'), body[:3])
        # Closes the session: as a CLOSE packet (200), or as a POST
        # overlapping the one being read (400).
        async with session.post(url, data='1') as resp:
            assert resp.status in (200, 400)
        async with session.get(url) as resp:
            assert resp.status in (200, 400)
        writer.write(body[3:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(400), 10)
        writer.close()
        assert status_of(answer) == 400, answer
    await still_serving(base)


async def test_stalled_post_body_gets_408_and_hang_up_is_quiet(hostile):
    """A polling POST body that stops coming gets 408 and its connection
    closed; one whose client hangs up mid-body leaves no error in the
    log."""
    base = hostile.url
    start = len(hostile.read_log())
    async with aiohttp.ClientSession() as session:
        head = ('POST /socket.io/?EIO=4&transport=polling&sid={} HTTP/1.1\r\n'
                f'Content-Type: text/plain\r\nContent-Length: {MAX_PAYLOAD}'
                '\r\n\r\n')
        sid = await handshake(session, base)
        reader, writer = await raw_http(base, head.format(sid),
                                        b'4' * (MAX_PAYLOAD - 10))
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert status_of(answer) == 408, answer
        sid = await handshake(session, base)
        reader, writer = await raw_http(base, head.format(sid), b'4' * 100)
        writer.transport.abort()
    await still_serving(base)
    log = hostile.read_log()[start:]
    assert 'Traceback' not in log and ' ERROR ' not in log, log


async def test_a_poll_on_a_dead_connection_loses_no_ack(hostile):
    """A poll whose connection dropped is still waiting on the server
    when the client polls again: the session is closed (the client
    reconnects), or the ack of what it sends next comes to the new
    poll. Never is the POST accepted and its ack lost."""
    base = hostile.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        _, writer = await raw_http(
            base, f'GET /socket.io/?EIO=4&transport=polling&sid={sid} '
            'HTTP/1.1\r\n\r\n')
        await asyncio.sleep(0.3)  # the server has the poll waiting
        writer.transport.abort()
        new_poll = asyncio.ensure_future(session.get(
            url, timeout=aiohttp.ClientTimeout(total=15)))
        await asyncio.sleep(0.3)
        async with session.post(url, data='427["ping",{}]') as resp:
            posted = resp.status
        resp = await new_poll
        answers = (await resp.text()).split('\x1e')
        if posted == 200:
            for _ in range(5):
                if any(p.startswith('437') for p in answers):
                    break
                async with session.get(url) as resp:
                    assert resp.status == 200
                    answers += (await resp.text()).split('\x1e')
            assert any(p.startswith('437') for p in answers), answers
        else:
            assert posted == 400 and resp.status == 400


async def test_chunked_post_is_read_and_compressed_one_refused(hostile):
    """A polling POST without a Content-Length (chunked) is read whole:
    its Socket.IO connect is answered. A compressed body is refused
    with 415."""
    base = hostile.url
    _, token = await register(base)

    async def chunks():
        packet = ('40' + json.dumps({'token': token})).encode()
        yield packet[:5]
        yield packet[5:]

    async with aiohttp.ClientSession() as session:
        sid = await handshake(session, base)
        url = f'{polling(base)}&sid={sid}'
        async with session.post(url, data=chunks()) as resp:
            assert resp.status == 200
        async with session.get(url, timeout=aiohttp.ClientTimeout(
                total=15)) as resp:
            assert any(p.startswith('40')
                       for p in (await resp.text()).split('\x1e'))
        async with session.post(url, data=b'\x1f\x8b', headers={
                'Content-Encoding': 'gzip'}) as resp:
            assert resp.status == 415
            assert (await resp.json())['error']['code'] == 'invalid'


async def test_a_payload_of_exactly_the_maximum_is_accepted(hostile):
    """A websocket frame of exactly maxPayload bytes goes through as a
    polling POST of that size does; a larger POST gets 413 too_large."""
    base = hostile.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(base, token, session)
        frame = '421["ping",{"pad":""}]'
        frame = frame.replace('""', '"' + 'x' * (MAX_PAYLOAD - len(frame))
                              + '"')
        assert len(frame.encode()) == MAX_PAYLOAD
        await ws.send_str(frame)
        while True:
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            if msg.data.startswith('431'):
                break
        await ws.close()

        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        async with session.post(url, data='4' * (MAX_PAYLOAD + 1)) as resp:
            assert resp.status == 413
            assert (await resp.json())['error']['code'] == 'too_large'


async def test_a_flood_of_frames_is_read_at_the_sockets_own_pace(hostile):
    """Frames that spend no event token (NOOP, PONG, UPGRADE, refused
    events) cost the event loop all the same: one socket sending them as
    fast as it can is read at its own pace (about twice the event rate),
    so the others' share stays theirs. Nothing it sent is dropped: its
    CONNECT after the flood is answered."""
    base = hostile.url
    _, token = await register(base)
    other = await connect(base, (await register(base))[1])
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            base + '/socket.io/?EIO=4&transport=websocket')
        assert (await ws.receive_str(timeout=5)).startswith('0')
        for kind in '635' * 80:
            await ws.send_str(kind)
        await ws.send_str('40' + json.dumps({'token': token}))
        answer = await ws.receive_str(timeout=30)
        while answer.startswith(('6', '42')):  # NOOPs for the UPGRADEs
            answer = await ws.receive_str(timeout=30)
        assert answer.startswith('40{'), answer
        assert (await other.call('ping', {}))['ok']
        await ws.close()
    await other.close()
    status, text = await http(base, 'GET', '/metrics')
    assert status == 200
    paused = [line for line in text.splitlines()
              if line.startswith('postbox_socket_reads_paused_total ')]
    assert paused and float(paused[0].split()[1]) > 0, paused


def paused_count(text) -> float:
    found = [line for line in text.splitlines()
             if line.startswith('postbox_socket_reads_paused_total ')]
    return float(found[0].split()[1]) if found else 0.0


async def test_websocket_pings_and_empty_posts_spend_the_read_budget(
        hostile):
    """Websocket PING control frames (aiohttp used to answer them all
    itself) and empty polling POSTs cost the loop like any frame: a flood
    of either is paced, and the flooding socket still gets its answers."""
    base = hostile.url
    _, text = await http(base, 'GET', '/metrics')
    before = paused_count(text)
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            base + '/socket.io/?EIO=4&transport=websocket', autoping=False)
        assert (await ws.receive_str(timeout=5)).startswith('0')
        for n in range(300):
            await ws.ping(str(n).encode())
        await ws.send_str('40' + json.dumps({'token': token}))
        pongs = 0
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type == aiohttp.WSMsgType.PONG:
                pongs += 1
            elif msg.data.startswith('40{'):
                break
        assert pongs == 300
        await ws.close()
        _, text = await http(base, 'GET', '/metrics')
        after_pings = paused_count(text)
        assert after_pings > before
        sid = await handshake(session, base)
        url = f'{polling(base)}&sid={sid}'
        for _ in range(160):
            async with session.post(url, data=b'') as resp:
                assert resp.status == 200
    _, text = await http(base, 'GET', '/metrics')
    assert paused_count(text) > after_pings


async def test_a_polling_post_of_many_packets_is_taken_whole(hostile):
    """engine.io-client sends whatever it has buffered in one POST:
    python-engineio refused more than 16 packets, and the session was
    closed with every emit in it."""
    base = hostile.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        emits = [f'42{n}["ping",{{}}]' for n in range(1, 31)]
        async with session.post(url, data='\x1e'.join(emits)) as resp:
            assert resp.status == 200
        acked = set()
        while len(acked) < 30:
            async with session.get(url) as resp:
                assert resp.status == 200
                for p in (await resp.text()).split('\x1e'):
                    if p.startswith('43'):
                        n, _, body = p[2:].partition('[')
                        assert json.loads('[' + body) == [{'ok': True}], p
                        acked.add(int(n))
        assert acked == set(range(1, 31))


async def test_overlapping_posts_close_the_session(hostile):
    """A second POST while one is still being read is refused and the
    session closed, as the reference server does: clients wait for a
    POST's answer before the next."""
    base = hostile.url
    _, token = await register(base)
    async with aiohttp.ClientSession() as session:
        sid = await connected(session, base, token)
        url = f'{polling(base)}&sid={sid}'
        head = (f'POST /socket.io/?EIO=4&transport=polling&sid={sid} '
                'HTTP/1.1\r\nContent-Type: text/plain\r\n'
                'Content-Length: 100\r\n\r\n')
        reader, writer = await raw_http(base, head, b'42')
        # The first is being read (the server here gives a stalled body
        # one second: POSTBOX_ATTACHMENT_UPLOAD_IDLE_SECONDS).
        await asyncio.sleep(0.4)
        async with session.post(url, data='42["ping",{}]') as resp:
            assert resp.status == 400
            assert (await resp.json())['error']['code'] == 'invalid'
        writer.close()
        # Polls end with the CLOSE packet (after any event queued before,
        # such as the user's own presence), or the session is gone.
        for _ in range(5):
            async with session.get(url) as resp:
                if resp.status == 400 or \
                        '1' in (await resp.text()).split('\x1e'):
                    break
        else:
            raise AssertionError('the session was not closed')
    await still_serving(base)
