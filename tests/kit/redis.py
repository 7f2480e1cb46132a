"""A real redis-server for tests and benchmarks: on a free port, in a
temp dir, nothing persisted, stoppable, killable and restartable on the same
port; and a TCP proxy in front of it that can make subscriber connections
deaf."""
import asyncio
import shutil
import signal
import socket
from pathlib import Path

from tests.kit.processes import Process, free_port


class RedisProcess(Process):
    name = 'redis-server'

    def __init__(self, workdir, port=None):
        self.dir = Path(workdir)
        binary = shutil.which('redis-server')
        assert binary, 'no redis-server (tests/run.sh installs it)'
        port = port or free_port()
        super().__init__([binary, *self.options(port)],
                         self.dir / 'redis.log', cwd=self.dir, port=port)

    @property
    def url(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    def options(self, port) -> list:
        return ['--port', str(port), '--bind', '127.0.0.1', '--save', '',
                '--appendonly', 'no', '--dir', str(self.dir),
                '--protected-mode', 'no']

    start_timeout = 10

    def start(self, timeout=None):
        self.dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def ready(self) -> bool:
        try:
            return self.command('PING').startswith('+PONG')
        except OSError:
            return False

    def command(self, *args, timeout=2.0) -> str:
        """One command in RESP, the raw reply as text (enough for status
        lines and bulk strings like INFO or CLUSTER INFO)."""
        payload = f'*{len(args)}\r\n' + ''.join(
            f'${len(str(a).encode())}\r\n{a}\r\n' for a in args)
        with socket.create_connection(('127.0.0.1', self.port),
                                      timeout) as s:
            s.sendall(payload.encode())
            data = b''
            while True:
                chunk = s.recv(65536)
                data += chunk
                if not chunk or _complete(data):
                    return data.decode(errors='replace')

    def stop(self, sig=signal.SIGTERM, timeout=10) -> int:
        return super().stop(sig, timeout)

    def restart(self, timeout=None):
        """Start again on the same port, empty (nothing is persisted)."""
        self.stop()
        return self.start(timeout)

    def pause(self):
        """SIGSTOP: Redis hangs; connections stay open, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)


def _complete(data: bytes) -> bool:
    if data[:1] in (b'+', b'-', b':'):
        return data.endswith(b'\r\n')
    if data[:1] == b'$':
        head, _, rest = data.partition(b'\r\n')
        size = int(head[1:])
        return size < 0 or len(rest) >= size + 2
    return data.endswith(b'\r\n')


class DeafeningProxy:
    """A TCP proxy in front of ``target`` (host, port), run on the test's
    event loop. ``deafen()`` makes every subscriber connection open at
    that moment (one that sent SUBSCRIBE) deaf: what Redis sends it is
    dropped, while both TCP connections stay open and Redis still counts
    the subscription. This is the listener that silently stops hearing
    (python-socketio issue #1581): nothing fails, nothing arrives.
    ``deafen(new_ones_too=True)`` makes later subscribers deaf as well,
    until ``hear()``."""

    def __init__(self, target):
        self.target = target
        self.port = None
        self._server = None
        self._subscribers = {}  # id -> [deaf] of each subscriber link
        self._writers = set()
        self._links = set()
        self._deaf_from_start = False

    @property
    def url(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    async def start(self):
        self._server = await asyncio.start_server(self._link, '127.0.0.1', 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def deafen(self, new_ones_too=False) -> int:
        """Make the open subscriber connections deaf; returns how many."""
        self._deaf_from_start = new_ones_too
        for state in self._subscribers.values():
            state[0] = True
        return len(self._subscribers)

    def hear(self):
        """Subscribers from now on hear again (deaf ones stay deaf)."""
        self._deaf_from_start = False

    async def close(self):
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._links:
            await asyncio.wait(self._links, timeout=5)
        await self._server.wait_closed()

    async def _link(self, reader, writer):
        self._links.add(asyncio.current_task())
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        state = [False]  # deaf
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, state, True),
                self._pipe(up_reader, writer, state, False))
        except (OSError, asyncio.IncompleteReadError,
                asyncio.CancelledError):
            pass  # a link ends when either side does
        finally:
            self._links.discard(asyncio.current_task())
            self._subscribers.pop(id(state), None)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader, writer, state, upstream):
        while True:
            data = await reader.read(65536)
            if not data:
                writer.close()
                return
            if upstream and b'\r\nSUBSCRIBE\r\n' in data:
                self._subscribers[id(state)] = state
                state[0] = state[0] or self._deaf_from_start
            if not upstream and state[0]:
                continue  # deaf: Redis speaks, nobody hears
            writer.write(data)
            await writer.drain()


# Short timings so tests see presence and recovery quickly.
FAST_REDIS_ENV = {
    'POSTBOX_PRESENCE_GRACE_SECONDS': '0.5',
    'POSTBOX_REDIS_HEARTBEAT_SECONDS': '0.5',
    'POSTBOX_REDIS_RETRY_MAX_SECONDS': '0.5',
    'POSTBOX_REDIS_TIMEOUT_SECONDS': '2',
}
