"""Clients of a real Postbox server: HTTP calls over real sockets, users
registered through the API, and a Socket.IO client that queues every event
so a test waits for one with a timeout instead of sleeping."""
import asyncio
import itertools
import os
import uuid

import aiohttp
import pytest
import socketio

_names = itertools.count(1)


def unique_name(prefix='u') -> str:
    return (f'{prefix}{os.getpid() % 1000}_{next(_names)}_'
            f'{uuid.uuid4().hex[:6]}')


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


async def dm_across(url_a, url_b):
    """Alice, connected to ``url_a``, writes "hi bob" to Bob by username
    (a new dm room); Bob, connected to ``url_b``, gets the room and the
    message. Returns (alice, bob, alice's Client, bob's Client, room)."""
    alice, ta = await register(url_a)
    bob, tb = await register(url_b)
    a = await connect(url_a, ta)
    b = await connect(url_b, tb)
    ack = await a.call('send_dm', {'to': bob['username'], 'body': 'hi bob',
                                   'client_msg_id': 'c1'})
    assert ack['ok'], ack
    room = await b.next('room')
    assert room['id'] == ack['message']['room_id']
    got = await b.next('message')
    assert got['body'] == 'hi bob' and got['sender']['id'] == alice['id']
    assert got['room_id'] == room['id']
    return alice, bob, a, b, room


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


async def closed_as_protocol_error(session, base, frame, times):
    """Open a raw Engine.IO websocket (no Socket.IO connect), send
    ``frame`` ``times`` times, and assert the server closes it as a
    protocol error (1002)."""
    ws = await session.ws_connect(
        base + '/socket.io/?EIO=4&transport=websocket')
    assert (await ws.receive_str(timeout=5)).startswith('0')
    for _ in range(times):
        await ws.send_str(frame)
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE, (frame, msg)
    assert msg.data == aiohttp.WSCloseCode.PROTOCOL_ERROR, (frame, msg)
    await ws.close()


async def all_events(client, known=None):
    """Page through ``sync`` from ``known`` ({room id: seq}, as strings
    or ints) until ``has_more`` is false; every event, in order."""
    known = {str(room): seq for room, seq in (known or {}).items()}
    events = []
    while True:
        ack = await client.call('sync', {'rooms': known}, timeout=30)
        assert ack['ok'], ack
        events.extend(ack['events'])
        for e in ack['events']:
            known[str(e['room_id'])] = e['seq']
        if not ack['has_more']:
            return events
