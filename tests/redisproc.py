"""A real redis-server for tests: on a free port, in a temp dir, nothing
persisted, stoppable and restartable on the same port."""
import shutil
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
