"""A real redis-server for tests: on a free port, in a temp dir, nothing
persisted, stoppable, killable and restartable on the same port; and a
TCP proxy in front of it that can make subscriber connections deaf."""
import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import ServerProcess, free_port


class RedisProcess:
    def __init__(self, workdir, port=None):
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    def start(self, timeout=10):
        binary = shutil.which('redis-server')
        assert binary, 'no redis-server (tests/run.sh installs it)'
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / 'redis.log', 'ab')
        self.proc = subprocess.Popen(
            [binary, '--port', str(self.port), '--bind', '127.0.0.1',
             '--save', '', '--appendonly', 'no', '--dir', str(self.dir),
             '--protected-mode', 'no'],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('redis-server exited: ' + self.read_log())
            try:
                with socket.create_connection(('127.0.0.1', self.port),
                                              0.2) as s:
                    s.sendall(b'PING\r\n')
                    if s.recv(16).startswith(b'+PONG'):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError('redis-server did not start: ' + self.read_log())

    def read_log(self) -> str:
        try:
            return (self.dir / 'redis.log').read_text()
        except FileNotFoundError:
            return ''

    def stop(self):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.proc = None

    def kill(self):
        """SIGKILL: a crash, nothing said to the clients (the kernel
        resets their connections)."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self._log.close()
        self.proc = None

    def restart(self, timeout=10):
        """Start again on the same port, empty (nothing is persisted)."""
        self.stop()
        return self.start(timeout)

    def pause(self):
        """SIGSTOP: Redis hangs; connections stay open, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)


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


def start_servers(data_dir, count, env):
    """``count`` Postbox processes sharing one data dir (so one SQLite file
    unless ``env`` names another database) with the settings in ``env``."""
    servers = []
    try:
        for _ in range(count):
            servers.append(ServerProcess(data_dir, env=env).start())
    except Exception:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers):
    """Stop every server; returns their exit codes."""
    return [s.stop() for s in servers]


# Short timings so tests see presence and recovery quickly.
FAST_REDIS_ENV = {
    'POSTBOX_PRESENCE_GRACE_SECONDS': '0.5',
    'POSTBOX_REDIS_HEARTBEAT_SECONDS': '0.5',
    'POSTBOX_REDIS_RETRY_MAX_SECONDS': '0.5',
    'POSTBOX_REDIS_TIMEOUT_SECONDS': '2',
}
