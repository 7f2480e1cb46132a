"""The Engine.IO socket's writer (``server/upstream/engineio_socket.py``):
a packet is written in the sender's own call when the write does not
wait, and one that waits goes on in a task, in order, without holding the
sender. The websocket here is a stand-in whose writes wait while its gate
is shut, as aiohttp's do while a client's buffer is full: the real socket
paths (a client that stops reading is cut off, every other client gets
every message) are ``test_limits.py``'s."""
import asyncio

import pytest
from engineio import packet

from server.transport.sendqueue import SendQueue
from server.upstream.engineio_socket import Socket


class Websocket:
    def __init__(self):
        self.sent = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waits = 0  # writes that found the gate shut
        self.unwound = []  # what ended a waiting write from outside
        self.closed_with = None

    async def send_str(self, data):
        try:
            if not self.gate.is_set():
                self.waits += 1
                await self.gate.wait()
        except BaseException as exc:
            self.unwound.append(type(exc))
            raise
        self.sent.append(data)

    async def send_bytes(self, data):
        await self.send_str(data)

    async def close(self, code=None):
        self.closed_with = code
        self.closed_in = asyncio.current_task()


class Engine:
    def create_queue(self):
        return SendQueue()


def socket_on(ws):
    sock = Socket(Engine(), 'sid')
    sock.ws = ws
    return sock


def send(sock, text):
    sock.queue.put_nowait(packet.Packet(packet.MESSAGE, data=text))
    sock._start_writer()


async def test_a_write_that_does_not_wait_is_done_in_the_senders_call():
    ws = Websocket()
    sock = socket_on(ws)
    send(sock, 'one')
    send(sock, 'two')
    # No await in between: both are on the websocket, no task was made.
    assert ws.sent == ['4one', '4two']
    assert sock.writer is None and sock.queue.empty()


async def test_a_write_that_waits_goes_on_in_a_task_in_order():
    ws = Websocket()
    ws.gate.clear()
    sock = socket_on(ws)
    send(sock, 'one')
    assert ws.sent == [] and ws.waits == 1
    writer = sock.writer
    assert isinstance(writer, asyncio.Task)
    send(sock, 'two')  # queued behind it: the same writer takes it
    send(sock, 'three')
    assert sock.writer is writer
    await asyncio.sleep(0.01)
    assert ws.sent == [] and not writer.done()
    # A dump of the tasks shows where the writer waits.
    assert [f.f_code.co_name for f in writer.get_stack()] == ['_write']
    ws.gate.set()
    await asyncio.wait_for(writer, 5)
    assert ws.sent == ['4one', '4two', '4three']
    assert sock.writer is None
    send(sock, 'four')  # the next write is done at once again
    assert ws.sent[-1] == '4four' and sock.writer is None


@pytest.mark.parametrize('started', [True, False])
async def test_a_waiting_write_is_cancelled_with_its_task(started):
    """Cancelled after the task's first step, or before it ran at all."""
    ws = Websocket()
    ws.gate.clear()
    sock = socket_on(ws)
    send(sock, 'one')
    writer = sock.writer
    if started:
        await asyncio.sleep(0)
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(writer, 5)
    # The cancellation reached the write itself, where it waited.
    assert ws.unwound == [asyncio.CancelledError] and ws.sent == []


async def test_the_close_waits_in_the_writer_after_what_was_queued():
    ws = Websocket()
    ws.gate.clear()
    sock = socket_on(ws)
    send(sock, 'last')
    sock.queue.put_nowait(None)  # the socket is done: close after it
    writer = sock.writer
    ws.gate.set()
    await asyncio.wait_for(writer, 5)
    assert ws.sent == ['4last'] and ws.closed_with is not None
    # The writer stays set once closing: no other one starts.
    assert sock.writer is writer


async def test_a_close_runs_in_the_writer_task_and_keeps_it_set():
    ws = Websocket()  # nothing waits: data and close could finish at once
    sock = socket_on(ws)
    send(sock, 'bye')
    sock.queue.put_nowait(None)
    sock._start_writer()  # no writer yet: this call starts one
    assert ws.sent == ['4bye'] and ws.closed_with is None
    writer = sock.writer
    assert isinstance(writer, asyncio.Task)
    await asyncio.wait_for(writer, 5)
    # Closed by the writer task (aiohttp's close timeout cancels the task
    # it runs in), not by this test's task; the writer stays set.
    assert ws.closed_in is writer and sock.writer is writer
    send(sock, 'after')
    assert ws.sent == ['4bye'] and sock.writer is writer
