"""The coalescing websocket response: frames sent together reach the
client complete, in order, in one write; a close still goes out; bytes
written another way keep their place. And what a hostile client's events
get on a real server's socket: an ack, never a hang or a disconnect (an
event named like a handler python-socketio treats specially, a string
that is not valid Unicode)."""
import asyncio
import contextlib
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from server.upstream.aiohttp_websocket import (
    CoalescingWebSocketResponse, _CoalescingTransport)
from tests.kit import ServerProcess, connect, pair, register
from tests.test_engine import acked, closed, next_text
from tests.test_limits import raw_socket

FRAMES = ['42["message",{"body":"hi"}]', '9' * 200, 'x' * 70_000, '430[{}]']


@contextlib.asynccontextmanager
async def served(handler):
    """Serves ``handler`` at /ws on a free local port; yields the URL and
    cleans the server up on the way out, even when the test fails."""
    app = web.Application()
    app.router.add_get('/ws', handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, '127.0.0.1', 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        yield f'http://127.0.0.1:{port}/ws'
    finally:
        await runner.cleanup()


async def test_frames_of_one_iteration_go_out_in_one_write():
    writes = asyncio.get_running_loop().create_future()

    async def handler(request):
        ws = CoalescingWebSocketResponse(compress=False)
        await ws.prepare(request)
        transport = ws._writer.transport
        before = transport.writes
        for frame in FRAMES:
            await ws.send_str(frame)
        await asyncio.sleep(0)  # the end of this iteration: one write
        await asyncio.sleep(0)
        writes.set_result(transport.writes - before)
        await ws.receive()  # the client's reply
        await ws.close(code=4000, message=b'bye')
        return ws

    async with served(handler) as url:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as ws:
                received = [(await ws.receive(timeout=5)).data
                            for _ in FRAMES]
                assert received == FRAMES
                await ws.send_str('thanks')
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == 4000 and msg.extra == 'bye'
        assert await writes == 1


async def test_close_right_after_sends_delivers_both():
    async def handler(request):
        ws = CoalescingWebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_str('last words')
        await ws.close(code=4001)  # same iteration as the send
        return ws

    async with served(handler) as url:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as ws:
                assert (await ws.receive(timeout=5)).data == 'last words'
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == 4001


async def test_client_close_is_answered():
    async def handler(request):
        ws = CoalescingWebSocketResponse(compress=False)
        await ws.prepare(request)
        await ws.send_str('hello')
        async for _ in ws:  # until the client's close, answered by aiohttp
            pass
        return ws

    async with served(handler) as url:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(
                ws_close=5))
            assert (await ws.receive(timeout=5)).data == 'hello'
            await ws.close(code=4002)
            # aiohttp answers with 1000; without an answer it would be 1006.
            assert ws.close_code == 1000


async def test_writelines_and_write_eof_go_after_pending_data():
    """What goes to the transport another way than ``write`` does not
    overtake the frames still waiting for the end of the iteration."""
    left, right = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=left)
    reader, peer = await asyncio.open_connection(sock=right)
    try:
        transport = _CoalescingTransport(writer.transport)
        transport.write(b'first, ')  # pending until the iteration ends
        transport.writelines([b'second, ', b'third'])
        transport.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == \
            b'first, second, third'
    finally:
        writer.close()
        peer.close()


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    """A server logging at INFO with a small event budget (8 tokens, next
    to none refilled): what a test's user spends is counted exactly. No
    handler may fail on what the tests send."""
    proc = ServerProcess(tmp_path_factory.mktemp('hostile'), env={
        'POSTBOX_LOG_LEVEL': 'INFO', 'POSTBOX_EVENT_BURST': '8',
        'POSTBOX_EVENT_RATE_PER_SECOND': '0.01'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()
    log = proc.read_log()
    assert 'Traceback' not in log and 'Task exception' not in log, log


def unknown(name):
    return {'ok': False, 'error': {'code': 'invalid',
                                   'message': f'unknown event {name!r}'}}


async def test_event_named_star_is_an_unknown_event(hostile):
    """Attacker's test: an event literally named ``*`` (python-socketio
    hands it to the catch-all handler without its name) is answered like
    any unknown event, whatever its arguments, and spends a token: the
    budget of 8 runs out on the ninth event."""
    _, token = await register(hostile.url)
    client = await connect(hostile.url, token)
    for args in (({},), (), ('x',)):
        assert await client.sio.call('*', *args, timeout=3) == unknown('*')
    assert await client.call('ping', {}, timeout=3) == {'ok': True}
    answers = [await client.sio.call('*', {}, timeout=3) for _ in range(5)]
    assert answers[:4] == [unknown('*')] * 4, answers
    assert answers[4]['error']['code'] == 'rate_limited', answers
    await client.close()


async def test_special_event_names_are_unknown_events(hostile):
    """Names python-socketio routes apart from other events (its lifecycle
    handlers, the catch-all, the client's reserved ones) are each answered
    as unknown events, at once, and the socket goes on."""
    _, token = await register(hostile.url)
    client = await connect(hostile.url, token)
    for name in ('connect', 'disconnect', '*', 'message', 'connect_error',
                 '__disconnect_final'):
        assert await client.call(name, {}, timeout=3) == unknown(name)
    assert await client.call('ping', {}, timeout=3) == {'ok': True}
    await client.close()


async def test_lone_surrogates_are_answered_invalid(hostile):
    """Attacker's test: a lone surrogate escape (valid JSON, what JS's
    JSON.stringify makes of half an emoji) anywhere in an event is
    answered invalid, reaches no handler, and the socket stays connected;
    a proper surrogate pair is sent as usual. A frame that is not JSON
    still closes the connection."""
    _, _, a, b, room = await pair(hostile.url)
    half = 'a string is not valid Unicode (a lone surrogate)'
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(hostile.url, a.token, session)
        frames = [
            '["send_dm",{"room_id":%d,"body":"\\udc00x",'
            '"client_msg_id":"zz1"}]' % room['id'],
            '["open_dm",{"username":"\\ud800"}]',
            '["\\ud800",{}]',
            '["ping",{"\\ud83dx":1}]']
        for ack_id, frame in enumerate(frames, 1):
            await ws.send_str(f'42{ack_id}' + frame)
            answer = acked(await next_text(ws, f'43{ack_id}'), ack_id)
            assert answer == {'ok': False, 'error': {
                'code': 'invalid', 'message': half}}, answer
        await ws.send_str('429' + json.dumps(
            ['send_dm', {'room_id': room['id'], 'body': '\U0001F600 ok',
                         'client_msg_id': 'zz2'}]))
        assert acked(await next_text(ws, '439'), 9)['ok'] is True
        got = await b.next('message')
        assert got['body'] == '\U0001F600 ok', got  # and nothing before it
        await ws.send_str('4210["send_dm",{"body":"\\ud800"')  # not JSON
        assert (await closed(ws)).data == 1002
        await ws.close()
    # The same from python-socketio's client (json.dumps escapes it).
    assert await a.call('open_dm', {'username': '\ud800'}, timeout=3) == {
        'ok': False, 'error': {'code': 'invalid', 'message': half}}
    assert await a.call('ping', {}, timeout=3) == {'ok': True}
    await a.close()
    await b.close()
