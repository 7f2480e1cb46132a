"""The bot SDK in webhook mode against a real server delivering to a real
aiohttp receiver in this process: a handler that raises gets the event
again, sends go over HTTP, ``is_dm`` knows the rooms after a restart, and
concurrent deliveries all save the state file."""
import asyncio
import json
import uuid

import pytest
from aiohttp import web

from client_demo.postbox_bot import Bot
from tests.kit import (NO_RATE_LIMITS, ServerProcess, connect, free_port,
                       http, register)
from tests.test_bots import dm, from_user, make_bot

FAST_OUTBOX = {'POSTBOX_WEBHOOK_ALLOW_PRIVATE': 'true',
               'POSTBOX_OUTBOX_POLL_SECONDS': '0.2',
               'POSTBOX_OUTBOX_RETRY_BASE_SECONDS': '0.2',
               'POSTBOX_OUTBOX_RETRY_MAX_SECONDS': '0.5',
               **NO_RATE_LIMITS}


@pytest.fixture(scope='module')
def hooked(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp('postbox-hooks'),
                         env=FAST_OUTBOX)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


async def until(condition, timeout=20):
    """Wait until ``condition()`` is true (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, 'timed out'
        await asyncio.sleep(0.05)


class Hook:
    """An aiohttp app on loopback serving the webhook of whichever bot is
    in ``bot`` (a restart swaps it), recording each answer's status."""

    def __init__(self):
        self.bot = None
        self.secret = None
        self.statuses = []
        self.port = free_port()

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}/hook'

    async def _handle(self, request):
        response = await self.bot.webhook_handler(self.secret)(request)
        self.statuses.append(response.status)
        return response

    async def start(self, base, owner_token, bot_user):
        app = web.Application()
        app.router.add_post('/hook', self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, '127.0.0.1', self.port).start()
        status, data = await http(
            base, 'PUT', f'/api/bots/{bot_user["username"]}/webhook',
            owner_token, json={'url': self.url})
        assert status == 200, data
        self.secret = data['webhook']['secret']
        return self

    async def stop(self):
        await self.runner.cleanup()


async def test_webhook_mode_retries_sends_over_http_and_knows_dms(
        hooked, tmp_path):
    base = hooked.url
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    state = tmp_path / 'bot.json'
    calls = []

    def webhook_bot():
        bot = Bot(base, token, state_path=state)

        @bot.on_message
        async def echo(message):
            calls.append((message['body'], bot.is_dm(message['room_id'])))
            if message['body'] == 'fail once' and \
                    calls.count(calls[-1]) == 1:
                raise RuntimeError('a bug, fixed by the next delivery')
            # No socket: send goes over HTTP.
            await bot.send(room_id=message['room_id'],
                           body='echo: ' + message['body'],
                           client_msg_id=f'echo-{message["id"]}')
        return bot

    hook = Hook()
    hook.bot = webhook_bot()
    await hook.start(base, owner_token, bot_user)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        sent = await dm(client, 'fail once', to=bot_user['username'])
        got = await client.next('message', timeout=20,
                                where=from_user(bot_user['id']))
        assert got['body'] == 'echo: fail once'
        # Raised, answered 500, delivered again: handled then.
        assert calls == [('fail once', True), ('fail once', True)]
        await until(lambda: hook.statuses[-1:] == [204])  # after the send
        assert hook.statuses == [204, 500, 204]  # the room, then the message
        saved = json.loads(state.read_text())
        assert saved['seqs'][str(sent['room_id'])] == sent['seq']
        assert saved['user_id'] == bot_user['id']

        # A restart: a new Bot on the same state file knows the dm.
        await hook.bot.close()
        hook.bot = webhook_bot()
        await dm(client, 'after a restart', room_id=sent['room_id'])
        got = await client.next('message', timeout=20,
                                where=from_user(bot_user['id']))
        assert got['body'] == 'echo: after a restart'
        assert calls[-1] == ('after a restart', True)

        # And one without any state reads the room over HTTP.
        await hook.bot.close()
        state.unlink()
        hook.bot = webhook_bot()
        await dm(client, 'no state', room_id=sent['room_id'])
        got = await client.next('message', timeout=20,
                                where=from_user(bot_user['id']))
        assert got['body'] == 'echo: no state'
        assert calls[-1] == ('no state', True)
        await client.nothing('message', where=from_user(bot_user['id']))
    finally:
        await client.close()
        await hook.stop()
        await hook.bot.close()


async def test_an_event_that_always_fails_does_not_hold_up_the_room(
        hooked, tmp_path):
    """The server keeps a room's webhook events in order: an event whose
    handler always raises is delivered again a few times, then given up,
    and the room's next events come."""
    from client_demo.postbox_bot.webhook import WEBHOOK_HANDLER_TRIES
    base = hooked.url
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = Bot(base, token, state_path=tmp_path / 'bot.json')
    handled = []

    @bot.on_message
    async def handle(message):
        if message['body'] == 'poison':
            raise KeyError('a bug this message always hits')
        handled.append(message['body'])

    hook = Hook()
    hook.bot = bot
    await hook.start(base, owner_token, bot_user)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        poison = await dm(client, 'poison', to=bot_user['username'])
        await dm(client, 'next', room_id=poison['room_id'])
        await until(lambda: handled == ['next'], timeout=30)
        # The room event, the poison's tries, then the next message.
        assert hook.statuses == [204] + [500] * (WEBHOOK_HANDLER_TRIES - 1) \
            + [204, 204]
    finally:
        await client.close()
        await hook.stop()
        await bot.close()


async def test_concurrent_webhook_deliveries_save_the_state(hooked,
                                                            tmp_path):
    """Deliveries of many rooms at once (the server sends several in
    parallel): every one is handled and answered 204, and the state file
    ends with every room's seq."""
    base = hooked.url
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    state = tmp_path / 'bot.json'
    bot = Bot(base, token, state_path=state)
    handled = asyncio.Queue()
    bot.on_message(handled.put_nowait)
    hook = Hook()
    hook.bot = bot
    await hook.start(base, owner_token, bot_user)
    users = [await register(base) for _ in range(12)]
    try:
        async def post(user_token, body):
            status, data = await http(base, 'POST', '/api/messages',
                                      user_token, json={
                                          'to': bot_user['username'],
                                          'body': body,
                                          'client_msg_id': str(uuid.uuid4())})
            assert status == 201, data
            return data['message']
        for rounds in range(3):
            sent = await asyncio.gather(*(
                post(user_token, f'round {rounds}')
                for _, user_token in users))
            got = [await asyncio.wait_for(handled.get(), 20) for _ in sent]
            assert sorted(m['id'] for m in got) == sorted(
                m['id'] for m in sent)
        # Each room's "room" event and its three messages, answered.
        await until(lambda: len(hook.statuses) >= 4 * len(users))
        assert hook.statuses == [204] * 4 * len(users), hook.statuses
        saved = json.loads(state.read_text())
        for message in sent:
            assert saved['seqs'][str(message['room_id'])] == message['seq']
            assert saved['kinds'][str(message['room_id'])] == 'dm'
        assert not list(tmp_path.glob('*.tmp'))
    finally:
        await hook.stop()
        await bot.close()


async def test_state_saves_at_once_all_land(tmp_path):
    """Many saves of the state file at once (as concurrent webhook
    deliveries make): none fails, and the file has the last state."""
    state = tmp_path / 'bot.json'
    bot = Bot('http://127.0.0.1:9', 'token', state_path=state)

    async def save(i):
        bot.seqs[i] = i
        await bot._save_state()
    await asyncio.gather(*(save(i) for i in range(1, 101)))
    saved = json.loads(state.read_text())
    assert saved['seqs'] == {str(i): i for i in range(1, 101)}
    assert not list(tmp_path.glob('*.tmp'))
