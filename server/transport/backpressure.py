"""Bounded send queues: a client that stops reading must not grow the
server's memory without bound.

Engine.IO queues every outgoing packet per socket (``socket.queue``) and a
writer task drains it into the websocket (or the next poll). When the
client stops reading, the TCP buffers fill, the writer waits forever and
the queue grows with every message sent to that user. ``SendBound`` is
asked by the Engine.IO server before each packet is queued
(``upstream.engineio_server.Engine.send_packet``): once a socket has
``max_packets`` waiting for longer than a moment, the socket is cut off
(its TCP connection aborted, so the blocked writer wakes up too) and what
it had queued is dropped. The client reconnects and catches up with
``sync``; nothing acked is lost.
"""
import asyncio
import logging
import time

log = logging.getLogger(__name__)


class SendBound:
    """What may wait in a socket's send queue.

    A healthy client can briefly have many packets queued (one group
    commit acks hundreds of messages at once, and the writer task runs
    only after them), so reaching ``max_packets`` starts a watch: if the
    queue is still that long ``stall_seconds`` later, the socket is cut
    off. Past four times ``max_packets`` it is cut off at once, which
    bounds the memory a stalled socket can hold. ``on_cut(eio_sid)`` is
    called once for each socket cut off. The sockets are
    ``server.upstream.engineio_socket.Socket``: a websocket one knows its
    TCP transport (``tcp_transport``), which is aborted to cut it off."""

    def __init__(self, max_packets: int, stall_seconds: float, on_cut=None):
        self.max_packets = max_packets
        self.stall_seconds = stall_seconds
        self.hard_limit = 4 * max_packets
        self.on_cut = on_cut

    def admit(self, eio_socket) -> bool:
        """Whether a packet may be queued for ``eio_socket`` (None: a
        socket that is gone, left to python-engineio)."""
        if eio_socket is None:
            return True
        if getattr(eio_socket, 'cut_off', False):
            return False
        queued = eio_socket.queue.qsize()
        if queued >= self.hard_limit:
            self._cut(eio_socket)
            return False
        if queued >= self.max_packets and \
                not getattr(eio_socket, 'watched', False):
            eio_socket.watched = True
            asyncio.ensure_future(self._watch(eio_socket))
        return True

    def _cut(self, eio_socket):
        if not getattr(eio_socket, 'cut_off', False):
            eio_socket.cut_off = True
            # Not awaited here: this runs inside an emit that is iterating
            # over a room, and closing the socket changes the rooms.
            asyncio.ensure_future(_cut(eio_socket))
            if self.on_cut is not None:
                self.on_cut(eio_socket.sid)

    async def _watch(self, eio_socket):
        await asyncio.sleep(self.stall_seconds)
        eio_socket.watched = False
        if eio_socket.queue.qsize() >= self.max_packets and \
                not eio_socket.closed:
            self._cut(eio_socket)


def bound_send_queues(sio, max_packets: int, stall_seconds: float,
                      on_cut=None):
    """Limit what ``sio`` (an ``upstream.socketio_server.Server``) queues
    for a socket that does not read: see ``SendBound``."""
    sio.eio.send_bound = SendBound(max_packets, stall_seconds, on_cut)


def pace_reads(sio, event_rate: float, event_burst: float, on_pause=None):
    """Read each socket of ``sio`` at twice the user's event rate (and
    burst), plus the few frames the protocol adds: see ``ReadBudget``."""
    sio.eio.read_budget = ReadBudget(2 * event_rate + 10,
                                     2 * event_burst + 20, on_pause)


async def _cut(eio_socket):
    log.warning('socket %s stopped reading (%s packets queued): '
                'disconnecting', eio_socket.sid, eio_socket.queue.qsize())
    transport = getattr(eio_socket, 'tcp_transport', None)
    if transport is not None:
        transport.abort()
    try:
        await eio_socket.close(wait=False, abort=True)
    except Exception:  # already closing
        log.debug('close of %s failed', eio_socket.sid, exc_info=True)
    # Free the queued packets now rather than when the socket is reaped.
    while not eio_socket.queue.empty():
        eio_socket.queue.get_nowait()
        eio_socket.queue.task_done()
    eio_socket.queue.put_nowait(None)  # wakes a writer or poll to exit


class ReadBudget:
    """How fast one socket's frames are read: ``rate`` a second, ``burst``
    at once. Frames that spend no event token (NOOP, PONG, UPGRADE, or
    events refused once the user's bucket is empty) cost the event loop
    all the same, and one client sending them as fast as it can would
    take it from everyone. Past its budget, a socket's reading waits
    (``take`` says how long, ``pause`` waits): its TCP window fills and
    the client slows down; nothing it sent is dropped. ``on_pause()`` is
    called at each wait."""

    def __init__(self, rate: float, burst: float, on_pause=None):
        self.rate = rate
        self.burst = burst
        self.on_pause = on_pause

    def take(self, eio_socket, frames=1) -> float:
        """Take ``frames`` from ``eio_socket``'s budget: how long to wait
        (``pause``) before reading it again, 0.0 within the budget. Not a
        coroutine: it runs for every frame read."""
        now = time.monotonic()
        # A new socket's read_tokens is infinite: a full budget.
        refill = (now - eio_socket.read_at) * self.rate
        tokens = min(self.burst, eio_socket.read_tokens + refill) - frames
        eio_socket.read_tokens, eio_socket.read_at = tokens, now
        return -tokens / self.rate if tokens < 0 else 0.0

    async def pause(self, seconds):
        if self.on_pause is not None:
            self.on_pause()
        await asyncio.sleep(seconds)
