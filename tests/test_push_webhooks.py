"""Bot webhooks and push notifications through the outbox, against real
receivers: an aiohttp server in this test process (on loopback, so the
servers here allow private addresses, except the one that checks they are
refused by default). Signatures are checked with the webhook's secret, Web
Push payloads decrypted with keys the test made, the VAPID JWT verified
with the key from /api/push/vapid."""
import asyncio
import base64
import hashlib
import hmac
import json
import threading
import uuid

import http_ece
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client_demo.bot import Bot
from tests.kit import (NO_RATE_LIMITS, ServerProcess, connect, free_port, http,
                       register, unique_name)

FAST_OUTBOX = {'POSTBOX_WEBHOOK_ALLOW_PRIVATE': 'true',
               'POSTBOX_OUTBOX_POLL_SECONDS': '0.2',
               'POSTBOX_OUTBOX_RETRY_BASE_SECONDS': '0.2',
               'POSTBOX_OUTBOX_RETRY_MAX_SECONDS': '0.5',
               # A member who closed their socket is online this long.
               'POSTBOX_PRESENCE_GRACE_SECONDS': '1',
               **NO_RATE_LIMITS}


class Receiver:
    """An HTTP server on loopback, on its own thread and loop, that
    records every request and answers each path with the statuses queued
    for it (then 200)."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.requests = []  # (path, headers, body)
        self.answers = {}   # path -> [status, ...]
        self.json = {}      # path -> JSON answer of a 200
        self.delays = {}    # path -> seconds before answering
        self.arrived = []   # paths of requests received (answered or not)
        self._cond = threading.Condition()
        self._loop = None

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    async def _handle(self, request):
        body = await request.read()
        path = request.path
        with self._cond:
            self.arrived.append(path)
            self._cond.notify_all()
        await asyncio.sleep(self.delays.get(path, 0))
        with self._cond:
            queued = self.answers.get(path) or []
            status = queued.pop(0) if queued else 200
            self.requests.append((path, dict(request.headers), body,
                                  status))
            self._cond.notify_all()
        if status == 200 and path in self.json:
            return web.json_response(self.json[path])
        return web.Response(status=status)

    def start(self):
        ready = threading.Event()

        def run():
            self._loop = loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route('*', '/{tail:.*}', self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, '127.0.0.1', self.port)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def delivered(self, path):
        """The (headers, body) of the 2xx-answered requests to ``path``."""
        with self._cond:
            return [(h, b) for p, h, b, s in self.requests
                    if p == path and 200 <= s < 300]

    def _wait(self, path, count, timeout):
        with self._cond:
            self._cond.wait_for(
                lambda: len([r for r in self.requests if r[0] == path
                             and 200 <= r[3] < 300]) >= count, timeout)
        return self.delivered(path)

    async def wait(self, path, count=1, timeout=20):
        """The 2xx deliveries to ``path`` once there are ``count``."""
        got = await asyncio.to_thread(self._wait, path, count, timeout)
        assert len(got) >= count, (path, count, self.requests)
        return got

    def _wait_arrival(self, path, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: path in self.arrived,
                                       timeout)

    async def arrival(self, path, timeout=20):
        """Wait until a request to ``path`` came in (answered or not)."""
        assert await asyncio.to_thread(self._wait_arrival, path, timeout)

    def all_to(self, path):
        with self._cond:
            return [r for r in self.requests if r[0] == path]


@pytest.fixture(scope='module')
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope='module')
def hooked(tmp_path_factory, receiver, database_env):
    proc = ServerProcess(
        tmp_path_factory.mktemp('postbox-push'),
        env={**FAST_OUTBOX, **database_env(),
             'POSTBOX_PUSH_GATEWAY_URL': receiver.url + '/gateway'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


async def make_bot(base, owner_token):
    status, data = await http(base, 'POST', '/api/bots', owner_token,
                              json={'username': unique_name('bot')})
    assert status == 201, data
    return data['user'], data['token']


async def set_hook(base, owner_token, bot, url):
    status, data = await http(base, 'PUT',
                              f'/api/bots/{bot["username"]}/webhook',
                              owner_token, json={'url': url})
    assert status == 200, data
    assert data['webhook']['url'] == url
    return data['webhook']['secret']


async def send(client, room_id, body):
    ack = await client.call('send_dm', {'room_id': room_id, 'body': body,
                                        'client_msg_id': str(uuid.uuid4())})
    assert ack['ok'], ack
    return ack['message']


def verify(secret, headers, body):
    """The webhook signature checks out; returns the parsed event."""
    parts = dict(p.split('=', 1) for p in
                 headers['Postbox-Signature'].split(','))
    expected = hmac.new(secret.encode(), f'{parts["t"]}.'.encode() + body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts['v1'], expected)
    event = json.loads(body)
    assert headers['Postbox-Event-Id'] == event['id']
    return event


async def user_and_bot_room(base, receiver, path):
    """A user (connected), their bot with a webhook to ``path``, and a dm
    between them: (client, bot, bot token, secret, room id)."""
    user, token = await register(base)
    bot, bot_token = await make_bot(base, token)
    secret = await set_hook(base, token, bot, receiver.url + path)
    client = await connect(base, token)
    ack = await client.call('open_dm', {'username': bot['username']})
    assert ack['ok'], ack
    return client, bot, bot_token, secret, ack['room']['id']


async def test_webhook_delivery_is_signed(hooked, receiver):
    base = hooked.url
    client, bot, bot_token, secret, room_id = await user_and_bot_room(
        base, receiver, '/hook-signed')
    try:
        message = await send(client, room_id, 'hello bot')
        # The bot's own message is not sent back to it.
        status, _ = await http(base, 'POST', f'/api/rooms/{room_id}/messages',
                               bot_token, json={'body': 'my own',
                                                'client_msg_id': 'b1'})
        assert status == 201
        after = await send(client, room_id, 'after')
        got = await receiver.wait('/hook-signed', 3)
        events = [verify(secret, h, b) for h, b in got]
        # First the new dm itself (seq 0: before its first message).
        room = events.pop(0)
        assert room['type'] == 'room' and room['id'] == f'{room_id}.0'
        assert room['data']['id'] == room_id and room['data']['kind'] == 'dm'
        assert [e['data']['body'] for e in events] == ['hello bot', 'after']
        first = events[0]
        assert first['type'] == 'message'
        assert first['data']['id'] == message['id']
        assert first['data']['room_id'] == room_id
        assert first['created_at']
        assert events[1]['data']['seq'] == after['seq']
    finally:
        await client.close()


async def test_webhook_retries_in_order(hooked, receiver):
    base = hooked.url
    receiver.answers['/hook-retry'] = [500, 503, 502]
    client, bot, _, secret, room_id = await user_and_bot_room(
        base, receiver, '/hook-retry')
    try:
        bodies = [f'm{n}' for n in range(5)]
        for body in bodies:
            await send(client, room_id, body)
        got = await receiver.wait('/hook-retry', 6)
        events = [verify(secret, h, b) for h, b in got]
        assert events[0]['type'] == 'room'
        assert [e['data']['body'] for e in events[1:]] == bodies
        # The 5xx answers were for the first event (the new dm), tried
        # again; the messages waited behind it, in order.
        tried = receiver.all_to('/hook-retry')
        assert [s for *_, s in tried[:4]] == [500, 503, 502, 200]
        assert {json.loads(r[2])['type'] for r in tried[:4]} == {'room'}
    finally:
        await client.close()


async def bot_in_group(base, receiver, path, name, failures=0):
    """A user (connected) and their bot with a webhook to ``path``, whose
    first ``failures`` deliveries are answered 500, in a new group
    ``name``: (user, bot, secret, client, room id)."""
    receiver.answers[path] = [500] * failures
    user, token = await register(base)
    bot, _ = await make_bot(base, token)
    secret = await set_hook(base, token, bot, receiver.url + path)
    client = await connect(base, token)
    ack = await client.call('create_group', {
        'name': name, 'members': [bot['username']]})
    assert ack['ok'], ack
    return user, bot, secret, client, ack['room']['id']


async def test_webhook_gets_edits_and_group_changes(hooked, receiver):
    base = hooked.url
    # The new group's event fails once, so it is delivered after the
    # rename and the removal below: still as the group was created.
    user, bot, secret, client, room_id = await bot_in_group(
        base, receiver, '/hook-group', 'ops', failures=1)
    try:
        message = await send(client, room_id, 'deploy?')
        ack = await client.call('edit_message', {'message_id': message['id'],
                                                 'body': 'deploy now?'})
        assert ack['ok'], ack
        ack = await client.call('rename_group', {'room_id': room_id,
                                                 'name': 'ops-2'})
        assert ack['ok'], ack
        ack = await client.call('remove_member', {
            'room_id': room_id, 'username': bot['username']})
        assert ack['ok'], ack
        got = await receiver.wait('/hook-group', 5)
        events = [verify(secret, h, b) for h, b in got]
        assert [e['type'] for e in events] == [
            'room', 'message', 'message_updated', 'room', 'room_left']
        created = events.pop(0)  # the new group, as the bot was added
        assert created['data']['id'] == room_id
        assert created['data']['name'] == 'ops'
        assert {m['id'] for m in created['data']['members']} == \
            {user['id'], bot['id']}
        assert events[0]['data']['id'] == message['id']
        assert events[1]['data']['body'] == 'deploy now?'
        assert events[2]['data']['name'] == 'ops-2'
        assert events[2]['data']['id'] == room_id
        assert events[3]['data'] == {'room_id': room_id,
                                     'seq': events[2]['data']['last_seq'] + 1}
    finally:
        await client.close()


async def test_a_bot_out_of_the_room_sees_nothing_changed_after(hooked,
                                                                  receiver):
    """A bot removed from a group while its deliveries wait (its endpoint
    failing) still gets what it was owed, but not a message changed after
    it left: that state (an edit, a reaction) is not the bot's to see."""
    base = hooked.url
    user, bot, secret, client, room_id = await bot_in_group(
        base, receiver, '/hook-out', 'g', failures=4)
    try:
        await send(client, room_id, 'before, unchanged')
        changed = await send(client, room_id, 'before, changed later')
        ack = await client.call('remove_member', {
            'room_id': room_id, 'username': bot['username']})
        assert ack['ok'], ack
        for event, data in (
                ('edit_message', {'body': 'EDITED AFTER THE BOT LEFT'}),
                ('react', {'emoji': '🔥', 'on': True})):
            ack = await client.call(event, {'message_id': changed['id'],
                                            **data})
            assert ack['ok'], ack
        got = await receiver.wait('/hook-out', 3)
        events = [verify(secret, h, b) for h, b in got]
        assert [e['type'] for e in events] == ['room', 'message',
                                               'room_left']
        assert events[1]['data']['body'] == 'before, unchanged'
        assert not any(b'EDITED' in r[2] or '🔥'.encode() in r[2]
                       for r in receiver.all_to('/hook-out'))
    finally:
        await client.close()


async def test_two_bots_deliveries_of_one_seq_stay_apart(hooked, receiver):
    """Two bots' rows of one seq, claimed together, each get their own
    event: the removed bot neither the other's view of a message edited
    after it left, nor the other's room; the one still in no room_left."""
    base = hooked.url
    user, token = await register(base)
    bots = []
    for path in ('/two-stays', '/two-goes'):
        # Slow answers: each bot's next rows are claimed together, after
        # the removal and the edit below.
        receiver.delays[path] = 1
        bot, _ = await make_bot(base, token)
        bots.append((bot, await set_hook(base, token, bot,
                                         receiver.url + path), path))
    client = await connect(base, token)
    try:
        ack = await client.call('create_group', {
            'name': 'g', 'members': [b['username'] for b, _, _ in bots]})
        assert ack['ok'], ack
        room_id = ack['room']['id']
        message = await send(client, room_id, 'hello')
        ack = await client.call('remove_member', {
            'room_id': room_id, 'username': bots[1][0]['username']})
        assert ack['ok'], ack
        ack = await client.call('edit_message', {
            'message_id': message['id'], 'body': 'SECRET after it left'})
        assert ack['ok'], ack
        (stays, stays_secret, stays_path) = bots[0]
        (goes, goes_secret, goes_path) = bots[1]
        got = [verify(stays_secret, h, b)
               for h, b in await receiver.wait(stays_path, 4)]
        assert [e['type'] for e in got] == [
            'room', 'message', 'room', 'message_updated']
        assert got[2]['data']['members'] and \
            goes['id'] not in {m['id'] for m in got[2]['data']['members']}
        got = [verify(goes_secret, h, b)
               for h, b in await receiver.wait(goes_path, 2)]
        assert [e['type'] for e in got] == ['room', 'room_left']
        assert got[1]['data'] == {'room_id': room_id, 'seq': 2}
        assert not any(b'SECRET' in r[2] for r in receiver.all_to(goes_path))
    finally:
        await client.close()


async def test_slow_receiver_holds_up_only_itself(hooked, receiver):
    base = hooked.url
    receiver.delays['/hook-slow'] = 4
    slow, _, _, _, slow_room = await user_and_bot_room(base, receiver,
                                                        '/hook-slow')
    fast, _, _, _, fast_room = await user_and_bot_room(base, receiver,
                                                        '/hook-fast')
    try:
        await send(slow, slow_room, 'slow one')
        await receiver.arrival('/hook-slow')
        # While that receiver takes its time, another bot's event goes.
        await send(fast, fast_room, 'fast one')
        await receiver.wait('/hook-fast', 1)
        assert receiver.delivered('/hook-slow') == []
        await receiver.wait('/hook-slow', 1)
    finally:
        await slow.close()
        await fast.close()


async def test_bad_requests_get_clear_errors(hooked, receiver):
    base = hooked.url
    owner, token = await register(base)
    other, other_token = await register(base)
    bot, _ = await make_bot(base, token)
    hook = f'/api/bots/{bot["username"]}/webhook'
    for who, path, body, status, code in (
            (other_token, hook, {'url': receiver.url + '/x'}, 403,
             'forbidden'),
            (token, f'/api/bots/{other["username"]}/webhook',
             {'url': receiver.url + '/x'}, 404, 'not_found'),
            (token, hook, {'url': 'not a url'}, 400, 'invalid'),
            (token, hook, {'url': 12}, 400, 'invalid')):
        got, data = await http(base, 'PUT', path, who, json=body)
        assert (got, data['error']['code']) == (status, code), data
    keys = Browser().keys()
    for body in ({'kind': 'sms'}, {'kind': 'webpush', 'endpoint': 'x',
                                   'keys': keys},
                 {'kind': 'webpush', 'endpoint': receiver.url + '/k',
                  'keys': {**keys, 'p256dh': _b64(b'short')}},
                 # The right length, but not a point of the curve: it
                 # would fail only when a push is encrypted for it.
                 {'kind': 'webpush', 'endpoint': receiver.url + '/k',
                  'keys': {**keys, 'p256dh': _b64(b'\x04' + b'\0' * 64)}},
                 {'kind': 'webpush', 'endpoint': receiver.url + '/k',
                  'keys': {**keys, 'auth': '!!'}},
                 {'kind': 'webpush', 'endpoint': receiver.url + '/k'},
                 {'kind': 'gateway', 'app_id': 'a', 'pushkey': ''},
                 # Spaces would let two subscriptions share one key.
                 {'kind': 'gateway', 'app_id': 'a b', 'pushkey': 'c'},
                 {'kind': 'gateway', 'app_id': 'a', 'pushkey': 'b\x00'}):
        got, data = await http(base, 'POST', '/api/push/subscriptions',
                               token, json=body)
        assert (got, data['error']['code']) == (400, 'invalid'), body
    for n in range(20):
        await subscribe(base, token, {'kind': 'gateway', 'app_id': 'a',
                                      'pushkey': f'key{n}'})
    got, data = await http(base, 'POST', '/api/push/subscriptions', token,
                           json={'kind': 'gateway', 'app_id': 'a',
                                 'pushkey': 'one-too-many'})
    assert (got, data['error']['code']) == (413, 'too_large'), data
    # Someone else's subscription is not there for you to remove.
    status, listed = await http(base, 'GET', '/api/push/subscriptions', token)
    sub_id = listed['subscriptions'][0]['id']
    got, data = await http(base, 'DELETE',
                           f'/api/push/subscriptions/{sub_id}', other_token)
    assert (got, data['error']['code']) == (404, 'not_found')
    client = await connect(base, other_token)
    try:
        ack = await client.call('mute_room', {'room_id': 1, 'muted': 'yes'})
        assert ack['error']['code'] == 'invalid'
        ack = await client.call('mute_room', {'room_id': 2**40,
                                              'muted': True})
        assert ack['error']['code'] == 'not_found'
    finally:
        await client.close()


async def test_sdk_webhook_mode(hooked):
    base = hooked.url
    user, token = await register(base)
    bot_user, bot_token = await make_bot(base, token)
    bot = Bot(base, token=bot_token)
    got = asyncio.Queue()

    @bot.on_message
    async def on_message(message):
        got.put_nowait(message['body'])
        # Replies go over HTTP: no socket needed in webhook mode.
        await bot.http('POST', f'/api/rooms/{message["room_id"]}/messages',
                       json={'body': 'echo: ' + message['body'],
                             'client_msg_id': f'echo-{message["id"]}'})

    rooms = asyncio.Queue()

    @bot.on_room
    async def on_room(room):
        rooms.put_nowait(room['id'])

    port = free_port()
    app = web.Application()
    secret_box = {}  # the secret comes with the webhook, set below

    async def hook(request):
        return await bot.webhook_handler(secret_box['secret'])(request)

    app.router.add_post('/hook', hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', port).start()
    client = None
    try:
        secret_box['secret'] = await set_hook(
            base, token, bot_user, f'http://127.0.0.1:{port}/hook')
        client = await connect(base, token)
        ack = await client.call('open_dm', {'username': bot_user['username']})
        room_id = ack['room']['id']
        await send(client, room_id, 'ping')
        # The new dm first (its event has seq 0), then the message.
        assert await asyncio.wait_for(rooms.get(), 20) == room_id
        assert await asyncio.wait_for(got.get(), 20) == 'ping'
        assert room_id in bot.rooms
        echo = await client.next('message', 20,
                                 where=lambda m: m['sender']['id'] ==
                                 bot_user['id'])
        assert echo['body'] == 'echo: ping'
        # A request not signed with the secret is refused.
        status, _ = await http(f'http://127.0.0.1:{port}', 'POST', '/hook',
                               json={'id': f'{room_id}.99'},
                               headers={'Postbox-Signature': 't=1,v1=00'})
        assert status == 401
        assert got.empty()
    finally:
        if client is not None:
            await client.close()
        await runner.cleanup()
        await bot.stop()


async def test_private_webhook_url_refused_by_default(tmp_path):
    proc = ServerProcess(tmp_path).start()
    try:
        _, token = await register(proc.url)
        bot, _ = await make_bot(proc.url, token)
        for url in ('http://127.0.0.1:9/hook', 'http://10.1.2.3/hook',
                    'http://169.254.169.254/latest', 'http://localhost/x',
                    'ftp://example.com/x', 'http://x..y/hook',
                    'http://' + 'a' * 64 + '.example/hook',
                    # IPv4 inside IPv6: NAT64 (the metadata service and a
                    # private host), 6to4, IPv4-compatible, Teredo.
                    'http://[64:ff9b::a9fe:a9fe]/latest',
                    'http://[64:ff9b::a00:1]/', 'http://[2002:7f00:1::]/',
                    'http://[::7f00:1]/', 'http://[::a9fe:a9fe]/',
                    'http://[::ffff:0:a9fe:a9fe]/',
                    'http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/',
                    'http://1.1.1.1/a\r\nX-Evil: 1', 'http://1.1.1.1/a b'):
            status, data = await http(
                proc.url, 'PUT', f'/api/bots/{bot["username"]}/webhook',
                token, json={'url': url})
            assert status == 400, (url, data)
            assert data['error']['code'] == 'invalid'
            if url in ('http://127.0.0.1:9/hook', 'http://10.1.2.3/hook'):
                # The refusal names the setting that allows it.
                assert 'webhook_allow_private' in data['error']['message']
        # A push endpoint too: plain http is refused, saying how to allow it.
        status, data = await http(
            proc.url, 'POST', '/api/push/subscriptions', token, json={
                'kind': 'webpush', 'endpoint': 'http://push.example/x',
                'keys': {'p256dh': 'x', 'auth': 'y'}})
        assert status == 400 and data['error']['code'] == 'invalid', data
        assert 'https' in data['error']['message'] and \
            'webhook_allow_private' in data['error']['message']
        # An endpoint that is not a URL at all: refused, not a 500.
        for endpoint in ('https://[1.1.1.1]/', 'https://[bad/',
                         'https://[::1', 'https://[64:ff9b::7f00:1]/'):
            status, data = await http(
                proc.url, 'POST', '/api/push/subscriptions', token, json={
                    'kind': 'webpush', 'endpoint': endpoint,
                    'keys': {'p256dh': 'x', 'auth': 'y'}})
            assert (status, data['error']['code']) == (400, 'invalid'), \
                (endpoint, data)
    finally:
        assert await proc.astop() == 0, proc.read_log()


async def test_pending_webhooks_survive_sigkill(tmp_path, database_env):
    down = free_port()  # nobody listens here until the restart
    proc = ServerProcess(tmp_path, env={
        **FAST_OUTBOX, **database_env(),
        'POSTBOX_OUTBOX_CLAIM_SECONDS': '2'}).start()
    receiver = None
    try:
        client, bot, _, secret, room_id = await user_and_bot_room(
            proc.url, Receiver(down), '/hook-kill')
        bodies = [f'k{n}' for n in range(4)]
        for body in bodies:
            await send(client, room_id, body)
        await client.close()
        proc.kill()
        receiver = Receiver(down).start()
        proc.start()
        try:
            got = await receiver.wait('/hook-kill', 5)
        except AssertionError as exc:
            # Seen once in CI (2 of 5 within 20 s), never reproduced: keep
            # what the server said for the next one.
            raise AssertionError(f'{exc}\n--- server log ---\n'
                                 f'{proc.read_log()[-20000:]}') from None
        events = [verify(secret, h, b) for h, b in got]
        assert events[0]['type'] == 'room'
        assert [e['data']['body'] for e in events[1:]] == bodies
        # Once each: nothing more comes after a few more dispatch rounds.
        marker_client, _, _, marker_secret, marker_room = \
            await user_and_bot_room(proc.url, receiver, '/hook-marker')
        await send(marker_client, marker_room, 'marker')
        await receiver.wait('/hook-marker', 2)
        await marker_client.close()
        assert len(receiver.all_to('/hook-kill')) == 5
    finally:
        if receiver is not None:
            receiver.stop()
        assert proc.stop() == 0, proc.read_log()[-20000:]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + '=' * (-len(text) % 4))


class Browser:
    """A push subscription's keys, as a browser makes them."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = uuid.uuid4().bytes  # 16 random bytes

    def keys(self):
        return {'p256dh': _b64(self.key.public_key().public_bytes(
            serialization.Encoding.X962,
            serialization.PublicFormat.UncompressedPoint)),
            'auth': _b64(self.auth)}

    def decrypt(self, body):
        return json.loads(http_ece.decrypt(
            body, private_key=self.key, auth_secret=self.auth,
            version='aes128gcm'))


async def subscribe(base, token, body):
    status, data = await http(base, 'POST', '/api/push/subscriptions', token,
                              json=body)
    assert status == 201, data
    return data['subscription']


async def offline_pair(base):
    """A connected sender and a member who never connects, with a dm:
    (sender client, sender, member, member token, room id)."""
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    ack = await a.call('open_dm', {'username': bob['username']})
    assert ack['ok'], ack
    return a, alice, bob, tb, ack['room']['id']


async def test_webpush_payload_is_encrypted_and_vapid_signed(hooked,
                                                             receiver):
    base = hooked.url
    a, alice, bob, tb, room_id = await offline_pair(base)
    try:
        browser = Browser()
        sub = await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-payload',
            'keys': browser.keys()})
        assert sub['kind'] == 'webpush' and sub['id'] and sub['created_at']
        # The same endpoint again updates it.
        again = await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-payload',
            'keys': browser.keys()})
        assert again['id'] == sub['id']
        status, listed = await http(base, 'GET', '/api/push/subscriptions',
                                    tb)
        assert [s['id'] for s in listed['subscriptions']] == [sub['id']]
        message = await send(a, room_id, 'are you there?')
        (headers, body), = await receiver.wait('/wp-payload', 1)
        payload = browser.decrypt(body)
        assert payload == {
            'type': 'message', 'room_id': room_id, 'seq': message['seq'],
            'message_id': message['id'], 'sender': alice,
            'body': 'are you there?', 'unread': 1}
        assert headers['Content-Encoding'] == 'aes128gcm'
        status, vapid = await http(base, 'GET', '/api/push/vapid', tb)
        assert status == 200
        scheme, _, params = headers['Authorization'].partition(' ')
        assert scheme == 'vapid'
        fields = dict(p.split('=', 1) for p in params.split(','))
        assert fields['k'] == vapid['public_key']
        point = _unb64(vapid['public_key'])
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                           point)
        claims = jwt.decode(fields['t'], key, algorithms=['ES256'],
                            audience=receiver.url)
        assert claims['sub'].startswith('mailto:')
    finally:
        await a.close()


async def test_no_push_while_connected_or_muted(hooked, receiver):
    base = hooked.url
    a, alice, bob, tb, room_id = await offline_pair(base)
    carol, tc = await register(base)
    c = await connect(base, tc)
    try:
        ack = await c.call('open_dm', {'username': bob['username']})
        muted_room = ack['room']['id']
        browser = Browser()
        await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-quiet',
            'keys': browser.keys()})
        b = await connect(base, tb)
        ack = await b.call('mute_room', {'room_id': muted_room,
                                         'muted': True})
        assert ack['ok'], ack
        ack = await b.call('rooms', {})
        assert {e['room']['id']: e['muted'] for e in ack['rooms']} == {
            muted_room: True, room_id: False}
        await send(a, room_id, 'while connected')
        await b.next('message')
        await b.close()
        await send(c, muted_room, 'in a muted room')
        await send(a, room_id, 'while away')
        got = await receiver.wait('/wp-quiet', 1)
        # A later push would have had its own round by now: one more
        # message's push arrives, and still none of the two others.
        await send(a, room_id, 'again')
        got = await receiver.wait('/wp-quiet', 2)
        bodies = sorted(browser.decrypt(b)['body'] for _, b in got)
        assert bodies == ['again', 'while away']
    finally:
        await a.close()
        await c.close()


async def test_no_push_of_what_a_room_says_after_the_user_left(hooked,
                                                                 receiver):
    """A push still waiting (its endpoint failing) when its user is
    removed from the room is not sent: the message may have changed since
    (here, edited), and the room is not theirs to read any more."""
    base = hooked.url
    receiver.answers['/wp-left'] = [500] * 4
    a, alice, bob, tb, dm_id = await offline_pair(base)
    try:
        browser = Browser()
        await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-left',
            'keys': browser.keys()})
        ack = await a.call('create_group', {'name': 'g',
                                            'members': [bob['username']]})
        assert ack['ok'], ack
        group_id = ack['room']['id']
        message = await send(a, group_id, 'original')
        await receiver.arrival('/wp-left')  # the push failed once
        ack = await a.call('remove_member', {'room_id': group_id,
                                             'username': bob['username']})
        assert ack['ok'], ack
        ack = await a.call('edit_message', {
            'message_id': message['id'], 'body': 'EDITED AFTER REMOVAL'})
        assert ack['ok'], ack
        # A push of the dm comes through the same failing endpoint; by the
        # time it is in, and one retry later, the group's had its turns.
        await send(a, dm_id, 'marker')
        await receiver.wait('/wp-left', 1)
        await asyncio.sleep(1)
        bodies = [browser.decrypt(body)['body']
                  for _, _, body, _ in receiver.all_to('/wp-left')]
        assert 'EDITED AFTER REMOVAL' not in bodies
        assert [browser.decrypt(b)['body']
                for _, b in receiver.delivered('/wp-left')] == ['marker']
    finally:
        await a.close()


async def test_push_right_after_the_last_socket_closed(hooked, receiver):
    base = hooked.url
    a, alice, bob, tb, room_id = await offline_pair(base)
    try:
        browser = Browser()
        await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-just-left',
            'keys': browser.keys()})
        b = await connect(base, tb)
        await b.close()
        # Presence still counts bob online (grace period), but no socket
        # of his is open: he gets the push.
        await send(a, room_id, 'just missed you')
        (_, body), = await receiver.wait('/wp-just-left', 1)
        assert browser.decrypt(body)['body'] == 'just missed you'
    finally:
        await a.close()


async def test_gone_subscription_is_removed(hooked, receiver):
    base = hooked.url
    a, alice, bob, tb, room_id = await offline_pair(base)
    try:
        receiver.answers['/wp-gone'] = [410]
        sub = await subscribe(base, tb, {
            'kind': 'webpush', 'endpoint': receiver.url + '/wp-gone',
            'keys': Browser().keys()})
        await send(a, room_id, 'anyone?')
        for _ in range(100):
            status, listed = await http(base, 'GET',
                                        '/api/push/subscriptions', tb)
            if not listed['subscriptions']:
                break
            await asyncio.sleep(0.1)
        assert listed['subscriptions'] == []
        assert [r[3] for r in receiver.all_to('/wp-gone')] == [410]
        status, _ = await http(base, 'DELETE',
                               f'/api/push/subscriptions/{sub["id"]}', tb)
        assert status == 404
    finally:
        await a.close()


async def test_gateway_notification(hooked, receiver):
    base = hooked.url
    a, alice, bob, tb, room_id = await offline_pair(base)
    try:
        pushkey = 'pk-' + uuid.uuid4().hex
        receiver.json['/gateway'] = {'rejected': []}
        sub = await subscribe(base, tb, {'kind': 'gateway',
                                         'app_id': 'chat.postbox.ios',
                                         'pushkey': pushkey})
        assert sub['kind'] == 'gateway'
        message = await send(a, room_id, 'to the phone')
        got = await receiver.wait('/gateway', 1)
        bodies = [json.loads(b) for _, b in got]
        mine = [n['notification'] for n in bodies
                if n['notification']['devices'][0]['pushkey'] == pushkey]
        assert mine == [{
            'event_id': str(message['id']), 'room_id': str(room_id),
            'type': 'm.room.message', 'sender': alice['username'],
            'sender_display_name': alice['display_name'],
            'content': {'body': 'to the phone'}, 'counts': {'unread': 1},
            'devices': [{'app_id': 'chat.postbox.ios', 'pushkey': pushkey}]}]
        status, _ = await http(base, 'DELETE',
                               f'/api/push/subscriptions/{sub["id"]}', tb)
        assert status == 204
    finally:
        await a.close()


async def test_outbox_connections_resolve_only_to_public_addresses():
    """The outbox's connections resolve names again: a name that answers
    a public address to the URL check and a private one to the connection
    (DNS rebinding) gets no private address (private URLs not allowed)."""
    from server.services.webhooks import PublicResolver
    resolver = PublicResolver()
    with pytest.raises(OSError):
        await resolver.resolve('localhost', 80)
    with pytest.raises(OSError):
        await resolver.resolve('127.0.0.1', 80)


async def test_an_endpoint_serves_only_its_latest_user(hooked, receiver):
    """One endpoint is one browser or device: subscribed by another user
    (the first signed out without unsubscribing), it is the new user's
    only; the first user's pushes no longer go there."""
    base = hooked.url
    first, t1 = await register(base)
    second, t2 = await register(base)
    endpoint = receiver.url + '/wp-shared'
    for token in (t1, t2):
        await subscribe(base, token, {'kind': 'webpush',
                                      'endpoint': endpoint,
                                      'keys': Browser().keys()})
    status, listed = await http(base, 'GET', '/api/push/subscriptions', t1)
    assert status == 200 and listed['subscriptions'] == []
    status, listed = await http(base, 'GET', '/api/push/subscriptions', t2)
    assert len(listed['subscriptions']) == 1


async def test_logout_everywhere_forgets_push_subscriptions(hooked, receiver):
    """Signed out everywhere, no device may show the user's messages: the
    subscriptions go (a plain logout of one token keeps them)."""
    base = hooked.url
    user, token = await register(base)
    await subscribe(base, token, {
        'kind': 'webpush', 'endpoint': receiver.url + '/wp-signed-out',
        'keys': Browser().keys()})
    status, _ = await http(base, 'POST', '/api/logout', token=token, json={})
    status, listed = await http(base, 'GET', '/api/push/subscriptions', token)
    assert status == 200 and len(listed['subscriptions']) == 1, listed
    # A password change keeps them: this device goes on with a new token.
    status, changed = await http(base, 'POST', '/api/password', token=token,
                                 json={'old_password': 'correct horse',
                                       'new_password': 'correct horse 2'})
    assert status == 200, changed
    token = changed['token']
    status, listed = await http(base, 'GET', '/api/push/subscriptions', token)
    assert status == 200 and len(listed['subscriptions']) == 1, listed
    status, _ = await http(base, 'POST', '/api/logout', token=token,
                           json={'all': True})
    assert status == 200
    status, login = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': 'correct horse 2'})
    assert status == 200, login
    status, listed = await http(base, 'GET', '/api/push/subscriptions',
                                login['token'])
    assert status == 200 and listed['subscriptions'] == [], listed
