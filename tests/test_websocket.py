"""The coalescing websocket response: frames sent together reach the
client complete, in order, in one write; a close still goes out; bytes
written another way keep their place."""
import asyncio
import contextlib
import socket

import aiohttp
from aiohttp import web

from server.upstream.aiohttp_websocket import (
    CoalescingWebSocketResponse, _CoalescingTransport)

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
