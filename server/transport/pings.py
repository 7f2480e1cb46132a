"""One ping schedule for all the Engine.IO sockets of a server
(``upstream.engineio_socket.Socket`` adds itself after each pong), in
place of python-engineio's sleeping task per socket."""
import asyncio
import math


class PingSchedule:
    """When each socket is next pinged. Sockets wait in one list per tick
    (a 25th of the ping interval, at most a second) and one loop timer
    serves them all: a timer per socket costs about 400 bytes. A ping goes
    out up to a tick late, well inside the client's allowance (ping
    interval plus ping timeout). With the default 25 s interval a tick is
    a second; with short ones (the conformance suite's 300 ms) pings stay
    within a few ms of due, as a session that answers them but has not
    connected must see three before its 1 s connect timeout."""

    def __init__(self, interval: float):
        self.interval = interval
        self.tick = min(1.0, interval / 25)
        self.due = {}  # tick number -> sockets to ping then
        self.timer = None

    def add(self, socket):
        """Ping ``socket`` in ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        tick = math.ceil((loop.time() + self.interval) / self.tick)
        self.due.setdefault(tick, []).append(socket)
        if self.timer is None:
            self.timer = loop.call_at(tick * self.tick, self._run)

    def _run(self):
        loop = asyncio.get_running_loop()
        # Timers may fire a hair early; a tick this close is due.
        now = loop.time() + self.tick / 100
        for tick in sorted(t for t in self.due if t * self.tick <= now):
            for socket in self.due.pop(tick):
                socket.ping()
        self.timer = None
        if self.due:
            self.timer = loop.call_at(min(self.due) * self.tick, self._run)

    def stop(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.due.clear()
