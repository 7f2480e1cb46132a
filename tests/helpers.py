"""Test helpers: a real Postbox server in a subprocess on a free port, HTTP
calls over real sockets, and a Socket.IO client that records events."""
import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import socketio

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count(1)
# Server settings for load-shaped tests: many events from one user.
NO_RATE_LIMITS = {'POSTBOX_SEND_RATE_PER_SECOND': '1000000',
                  'POSTBOX_SEND_BURST': '1000000',
                  'POSTBOX_EVENT_RATE_PER_SECOND': '1000000',
                  'POSTBOX_EVENT_BURST': '1000000'}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def unique_name(prefix='u') -> str:
    return f'{prefix}{os.getpid() % 1000}_{next(_names)}_{uuid.uuid4().hex[:6]}'


class ServerProcess:
    """``python -m server`` with its own data dir and port; ``env`` adds or
    overrides POSTBOX_* settings."""

    def __init__(self, data_dir, env=None, port=None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.env = dict(os.environ)
        self.env.update({'POSTBOX_HOST': '127.0.0.1',
                         'POSTBOX_PORT': str(self.port),
                         'POSTBOX_DATA_DIR': str(self.data_dir),
                         'POSTBOX_SECRET': 'test-secret-' + 'x' * 32,
                         # Every test registers its users from 127.0.0.1;
                         # the tests of the throttle set their own.
                         'POSTBOX_REGISTRATIONS_PER_IP': '1000000',
                         'POSTBOX_LOG_LEVEL': 'WARNING'})
        self.env.update(env or {})
        self.proc = None
        self.log_path = self.data_dir / f'server-{self.port}.log'

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def start(self, timeout=20):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'server'], cwd=ROOT, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'server exited: {self.read_log()}')
            try:
                with socket.create_connection(('127.0.0.1', self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f'server did not start: {self.read_log()}')

    def read_log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ''

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        self.proc = None
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    async def astop(self, sig=signal.SIGTERM, timeout=30) -> int:
        """``stop`` without blocking the event loop, so that clients in the
        same loop can answer the server's goodbye."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.stop, sig, timeout)


async def http(base, method, path, token=None, json=None, **kwargs):
    """One HTTP request; returns (status, parsed JSON or text)."""
    headers = kwargs.pop('headers', {})
    if token:
        headers['Authorization'] = f'Bearer {token}'
    async with aiohttp.ClientSession() as session:
        async with session.request(method, base + path, json=json,
                                   headers=headers, **kwargs) as resp:
            if resp.content_type == 'application/json':
                return resp.status, await resp.json()
            return resp.status, await resp.text()


async def register(base, username=None, password='correct horse'):
    """Register a fresh user; returns (user dict, token)."""
    username = username or unique_name()
    status, data = await http(base, 'POST', '/api/register',
                              json={'username': username,
                                    'password': password})
    assert status == 201, data
    return data['user'], data['token']


async def upload(base, token, data, filename, content_type='text/plain'):
    """POST /api/attachments with ``data`` as the ``file`` field, the
    file name sent as a browser does (raw UTF-8, only '"', CR and LF
    percent-encoded)."""
    form = aiohttp.MultipartWriter('form-data')
    name = (filename.replace('"', '%22').replace('\r', '%0D')
            .replace('\n', '%0A'))
    form.append(data, {'Content-Type': content_type,
                       'Content-Disposition':
                       f'form-data; name="file"; filename="{name}"'})
    return await http(base, 'POST', '/api/attachments', token=token,
                      data=form)


class Client:
    """A real ``socketio.AsyncClient`` that queues every server event, so a
    test can wait for one with a timeout instead of sleeping."""

    def __init__(self, base, token, transports=None):
        self.base = base
        self.token = token
        self.transports = transports
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events = {}
        self.sio.on('*', self._record)

    async def _record(self, event, *args):
        self._queue(event).put_nowait(args[0] if len(args) == 1 else args)

    def _queue(self, event) -> asyncio.Queue:
        return self.events.setdefault(event, asyncio.Queue())

    async def connect(self):
        await self.sio.connect(self.base, auth={'token': self.token},
                               transports=self.transports or ['websocket'],
                               wait_timeout=10)
        return self

    async def call(self, event, data=None, timeout=10):
        """Emit ``event`` and return its ack."""
        return await self.sio.call(event, data, timeout=timeout)

    async def next(self, event, timeout=5, where=None):
        """The next ``event`` (matching ``where`` if given)."""
        queue = self._queue(event)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            item = await asyncio.wait_for(queue.get(), max(remaining, 0.001))
            if where is None or where(item):
                return item

    async def nothing(self, event, timeout=0.5, where=None):
        """Assert that no ``event`` (matching ``where``) arrives in
        ``timeout`` seconds; returns True."""
        try:
            item = await self.next(event, timeout, where)
        except asyncio.TimeoutError:
            return True
        raise AssertionError(f'unexpected {event}: {item}')

    def drain(self, event) -> list:
        queue = self._queue(event)
        items = []
        while not queue.empty():
            items.append(queue.get_nowait())
        return items

    async def close(self):
        await self.sio.disconnect()


async def connect(base, token, **kwargs) -> Client:
    return await Client(base, token, **kwargs).connect()


async def pair(base):
    """Two connected users with a dm room between them:
    (alice, bob, alice's Client, bob's Client, room)."""
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = await connect(base, tb)
    ack = await a.call('open_dm', {'username': bob['username']})
    assert ack['ok'], ack
    return alice, bob, a, b, ack['room']


async def refused(base, token):
    """Connect with ``token`` (None: no auth at all), expect a refusal, and
    return what ``connect_error`` said."""
    sio = socketio.AsyncClient(reconnection=False)
    errors = []
    sio.on('connect_error', lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(base, auth={'token': token} if token is not None
                          else None, transports=['websocket'],
                          wait_timeout=5)
    return errors[0]
