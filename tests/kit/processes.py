"""Processes for tests and benchmarks: a subprocess on a free loopback port
with its output in a log file, started until it is ready and stopped with
a signal; a Postbox server (``python -m server``) built on it, and groups of
Postbox processes sharing a deployment."""
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
# Server settings for load-shaped tests: many events from one user.
NO_RATE_LIMITS = {'POSTBOX_SEND_RATE_PER_SECOND': '1000000',
                  'POSTBOX_SEND_BURST': '1000000',
                  'POSTBOX_EVENT_RATE_PER_SECOND': '1000000',
                  'POSTBOX_EVENT_BURST': '1000000'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rss_kib(pid, peak=False) -> int:
    """The resident memory of process ``pid`` in KiB: now, or with
    ``peak`` the most it has had (VmHWM)."""
    field = 'VmHWM:' if peak else 'VmRSS:'
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise AssertionError(f'no {field} for {pid}')


class Process:
    """The subprocess ``argv`` whose output goes to ``log_path``. ``start``
    waits until ``ready()`` and raises with the log if it exits first:
    ready when ``port`` accepts TCP connections, or with ``ready_path``
    when a GET of it answers 2xx. ``pin`` runs it on CPU 0 only (the
    benchmarks keep their load generators off that CPU)."""

    name = 'process'
    start_timeout = 20
    # Every one started and not stopped yet, in this interpreter: the test
    # session stops those left over at its end (a test that failed before
    # its own stop would leave its server running after pytest exits).
    live = set()

    def __init__(self, argv, log_path, cwd=ROOT, env=None, port=None,
                 pin=False, ready_path=None):
        self.argv = [str(c) for c in argv]
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(os.environ, **(env or {}))
        self.port = port or free_port()
        self.pin = pin
        self.ready_path = ready_path
        self.proc = None
        self._log = None

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        try:
            if self.ready_path is not None:
                with urllib.request.urlopen(self.url + self.ready_path,
                                            timeout=1):
                    return True
            with socket.create_connection(('127.0.0.1', self.port), 0.2):
                return True
        except OSError:  # refused, or an HTTP error status
            return False

    def start(self, timeout=None):
        timeout = timeout or self.start_timeout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, 'ab')
        pin = self.pin

        def preexec():
            if pin:  # threads started later inherit the mask
                os.sched_setaffinity(0, {0})
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT, preexec_fn=preexec if pin else None)
        Process.live.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                # Left as it is: stop() returns the exit code.
                raise RuntimeError(f'{self.name} exited: {self.read_log()}')
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f'{self.name} did not start: {self.read_log()}')

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    # A SIGTERM drain may take the server's DRAIN_SECONDS (20) for events
    # in flight, then its cleanup; on a loaded CI machine 30 s was seen
    # to be too short once. Past this the stacks are dumped and it is
    # killed (the test then fails on the exit code).
    STOP_SECONDS = 60

    def stop(self, sig=signal.SIGTERM, timeout=STOP_SECONDS) -> int:
        """Send ``sig`` and wait up to ``timeout`` s for the exit (then
        SIGKILL); returns the exit code (0 if it was not running)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        elif self.proc.returncode:
            # Dead before it was told to stop (a crash, the OOM killer):
            # not to be mistaken for a kill after a stop timeout.
            self._log.write(f'\n--- {self.name} had exited with '
                            f'{self.proc.returncode} before its stop\n'
                            .encode())
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._log_stacks(f'did not exit within {timeout} s of {sig!r}')
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        self.proc = None
        Process.live.discard(self)
        return code

    def _log_stacks(self, why):
        """Append where every thread of the process is (``py-spy dump``,
        when installed) to its log: a process killed for not exiting
        leaves a trace of what it waited on."""
        spy = shutil.which('py-spy')
        dump = 'no py-spy to show its stacks'
        if spy:
            try:
                dump = subprocess.run(
                    [spy, 'dump', '--pid', str(self.proc.pid)],
                    capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                dump = f'py-spy failed: {exc}'
        self._log.write(f'\n--- {self.name} {why}; killed. Its threads:\n'
                        f'{dump}\n'.encode())
        self._log.flush()

    def kill(self) -> int:
        """SIGKILL: a crash, nothing said to the clients."""
        return self.stop(signal.SIGKILL)

    async def astop(self, sig=signal.SIGTERM, timeout=STOP_SECONDS) -> int:
        """``stop`` without blocking the event loop, so that clients in the
        same loop can answer the server's goodbye."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.stop, sig, timeout)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


class ServerProcess(Process):
    """``python -m server`` with its own data dir and port; ``env`` adds or
    overrides POSTBOX_* settings."""

    name = 'server'
    # Ready in a second or two alone, but a loaded machine (a full test
    # run on two cores) has taken more than 20 s.
    start_timeout = 60

    def __init__(self, data_dir, env=None, port=None, pin=False,
                 ready_path=None):
        self.data_dir = Path(data_dir)
        port = port or free_port()
        super().__init__(
            [sys.executable, '-m', 'server'],
            self.data_dir / f'server-{port}.log', port=port, pin=pin,
            ready_path=ready_path, env={
                'POSTBOX_HOST': '127.0.0.1',
                'POSTBOX_PORT': str(port),
                'POSTBOX_DATA_DIR': str(self.data_dir),
                'POSTBOX_SECRET': 'test-secret-' + 'x' * 32,
                # Every test registers its users from 127.0.0.1; the tests
                # of the throttle set their own.
                'POSTBOX_REGISTRATIONS_PER_IP': '1000000',
                'POSTBOX_LOG_LEVEL': 'WARNING', **(env or {})})

    def _log_stacks(self, why):
        """The threads (py-spy), then the server's asyncio tasks: SIGUSR2
        makes it log them (server/logs.py). Threads first: a process past
        its loop's close would die of the signal."""
        super()._log_stacks(why)
        try:
            self.proc.send_signal(signal.SIGUSR2)
            time.sleep(1)
        except OSError:
            pass


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


@contextlib.contextmanager
def running_servers(data_dir, count, env):
    """``start_servers`` for a ``with`` block (or a fixture that yields
    from one): at its end every server is stopped and must have exited
    cleanly (code 0; SIGTERM drains), else the assertion shows the logs."""
    servers = start_servers(data_dir, count, env)
    try:
        yield servers
    finally:
        codes = stop_servers(servers)
    assert codes == [0] * count, [s.read_log() for s in servers]


def stop_servers(servers):
    """Stop every server; returns their exit codes."""
    return [s.stop() for s in servers]


async def astop_servers(servers):
    """``stop_servers`` without blocking the event loop."""
    return [await s.astop() for s in servers]
