"""The bot SDK and the example bots against a real server: a bot account made
with POST /api/bots, the echo and remind bots answering a real user's dms,
catching up exactly once after a stop or a dropped connection, resuming from
the state file, and the webhook script posting over HTTP."""
import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid

import pytest

from client_demo.bot import Bot, BotError, LoginFailed
from client_demo.bot import echo_bot, remind_bot
from tests.helpers import (ROOT, ServerProcess, connect, http, refused,
                           register, unique_name)


async def make_bot(base, owner_token):
    """A bot account owned by a fresh user; returns (bot user, token)."""
    status, data = await http(base, 'POST', '/api/bots', owner_token,
                              json={'username': unique_name('bot')})
    assert status == 201, data
    assert data['user']['is_bot'] is True
    return data['user'], data['token']


async def dm(client, body, to=None, room_id=None):
    """Send a dm from a test client; returns the stored message."""
    target = {'to': to} if to else {'room_id': room_id}
    ack = await client.call('send_dm', {**target, 'body': body,
                                        'client_msg_id': str(uuid.uuid4())})
    assert ack['ok'], ack
    return ack['message']


def from_user(user_id):
    return lambda m: m['sender']['id'] == user_id


class Recorder:
    """Attach to a Bot: every message handled, in order, on a queue."""

    def __init__(self, bot):
        self.seen = []
        self.queue = asyncio.Queue()

        @bot.on_message
        async def record(message):
            self.seen.append(message['id'])
            self.queue.put_nowait(message)

    async def until(self, message_id, timeout=10):
        """Wait until the message ``message_id`` has been handled."""
        while True:
            message = await asyncio.wait_for(self.queue.get(), timeout)
            if message['id'] == message_id:
                return


def readiness(bot) -> asyncio.Event:
    """An event set each time the bot is caught up after a connect
    (recovered or synced); clear it before a drop, wait for it after."""
    ready = asyncio.Event()
    bot.on('ready')(ready.set)
    return ready


async def bot_and_partner(base, **options):
    """A started bot (``options`` for Bot) with a Recorder, and a user
    who wrote to it once (handled): (bot, recorder, the user's client,
    that first message)."""
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = Bot(base, token, backoff=0.2, backoff_max=1.0, **options)
    seen = Recorder(bot)
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    first = await dm(client, 'first', to=bot_user['username'])
    await seen.until(first['id'])
    return bot, seen, client, first


async def test_echo_bot_answers_a_dm(base):
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = echo_bot.setup(Bot(base, token))
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        sent = await dm(client, 'hello echo', to=bot_user['username'])
        echo = await client.next('message', where=from_user(bot_user['id']))
        assert echo['body'] == 'hello echo'
        assert echo['reply_to'] == sent['id']
        assert echo['sender']['is_bot'] is True
        # The bot ignores its own echo: the next thing it says answers the
        # next message, not its own previous one.
        second = await dm(client, 'second', room_id=sent['room_id'])
        echo2 = await client.next('message', where=from_user(bot_user['id']))
        assert (echo2['body'], echo2['reply_to']) == ('second', second['id'])
    finally:
        await client.close()
        await bot.stop()


async def test_remind_bot_replies_later(base):
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = remind_bot.setup(Bot(base, token))
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        ask = await dm(client, 'remind me in 2 seconds ping',
                       to=bot_user['username'])
        ok = await client.next('message', where=from_user(bot_user['id']))
        assert ok['body'] == 'OK, I will remind you in 2 seconds.'
        # While that reminder waits the bot keeps answering.
        await dm(client, 'what can you do', room_id=ask['room_id'])
        help_ = await client.next('message', where=from_user(bot_user['id']))
        assert help_['body'] == remind_bot.HELP
        reminder = await client.next('message', timeout=15,
                                     where=from_user(bot_user['id']))
        assert reminder['body'] == 'Reminder: ping'
        assert reminder['reply_to'] == ask['id']
    finally:
        await client.close()
        await bot.stop()


async def test_restarted_bot_handles_each_missed_message_once(base, tmp_path):
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    state = tmp_path / 'bot-state.json'
    bot = Bot(base, token, state_path=state)
    first = Recorder(bot)
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        before = await dm(client, 'before the stop', to=bot_user['username'])
        await first.until(before['id'])
        await bot.stop()
        saved = json.loads(state.read_text())
        assert saved['seqs'][str(before['room_id'])] == before['seq']

        missed = [await dm(client, f'missed {i}', room_id=before['room_id'])
                  for i in range(7)]
        edited = await client.call('edit_message', {
            'message_id': missed[2]['id'], 'body': 'missed 2, edited'})
        assert edited['ok'], edited

        # A new process would build a new Bot from the same state file.
        bot = Bot(base, token, state_path=state)
        second = Recorder(bot)
        updates = []
        bot.on('message_updated')(updates.append)
        await bot.start(timeout=10)
        after = await dm(client, 'after the restart', room_id=before['room_id'])
        await second.until(after['id'])
        # Every missed message exactly once, in order, then the live one;
        # nothing from before the stop again.
        assert second.seen == [m['id'] for m in missed] + [after['id']]
        assert [(u['id'], u['body']) for u in updates] == [
            (missed[2]['id'], 'missed 2, edited')]
    finally:
        await client.close()
        await bot.stop()


async def test_dropped_connection_catches_up_exactly_once(base):
    """Without recovery (``recover=False``) the bot catches up with sync
    after a reconnect (test_bot_recovery.py has it with recovery)."""
    bot, seen, client, first = await bot_and_partner(base, recover=False)
    try:
        # Drop the bot's socket; the SDK reconnects by itself and catches up
        # whatever was sent in between.
        await bot.sio.disconnect()
        missed = [await dm(client, f'while away {i}', room_id=first['room_id'])
                  for i in range(5)]
        last = await dm(client, 'last', room_id=first['room_id'])
        await seen.until(last['id'], timeout=20)
        assert seen.seen == [first['id']] + [m['id'] for m in missed] + [
            last['id']]
        assert (bot.connects, bot.recoveries, bot.syncs) == (2, 0, 2)
        # Sending still works on the new connection, and is idempotent.
        reply = await bot.send(room_id=first['room_id'], body='back',
                               client_msg_id='bot-back-1')
        again = await bot.send(room_id=first['room_id'], body='back',
                               client_msg_id='bot-back-1')
        assert again['id'] == reply['id']
        got = await client.next('message', where=from_user(bot.user['id']))
        assert got['id'] == reply['id']
        await client.nothing('message', where=from_user(bot.user['id']))
    finally:
        await client.close()
        await bot.stop()


async def test_bot_survives_a_server_restart(tmp_path):
    """The server goes away (SIGTERM) and comes back: the bot retries with
    backoff, reconnects by itself, its recovery session (saved by the
    server at the SIGTERM) resumes, and it handles what was sent meanwhile
    exactly once, without sync."""
    # stop() and start() block, so they run in a thread: the bot's event
    # loop must keep running to answer the server's clean shutdown.
    server = await asyncio.to_thread(ServerProcess(tmp_path / 'server').start)
    base = server.url
    bot = None
    try:
        bot, seen, client, first = await bot_and_partner(base)
        await client.close()
        reconnected = readiness(bot)
        assert await asyncio.to_thread(server.stop) == 0, server.read_log()
        await asyncio.to_thread(server.start)
        # Sent over HTTP while the bot may still be reconnecting.
        posted = []
        for i in range(4):
            status, data = await http(
                base, 'POST', f'/api/rooms/{first["room_id"]}/messages',
                client.token, json={'body': f'after restart {i}',
                                    'client_msg_id': str(uuid.uuid4())})
            assert status == 201, data
            posted.append(data['message']['id'])
        await seen.until(posted[-1], timeout=30)
        await asyncio.wait_for(reconnected.wait(), 30)
        assert seen.seen == [first['id']] + posted
        assert bot.connects >= 2
        assert bot.recovered is True
        assert bot.recoveries == 1 and bot.syncs == 1
    finally:
        if bot is not None:
            await bot.stop()
        assert await asyncio.to_thread(server.stop) == 0, server.read_log()


async def test_password_bot_logs_in_again_after_logout_everywhere(base, caplog):
    """A bot run with a username and password whose tokens are revoked
    (logout everywhere closes its socket) logs in again and carries on."""
    # The SDK's steps (refusals, logins, connects, catch-up) and its
    # Socket.IO client's: shown on failure.
    for logger in ('client_demo.postbox_bot', 'socketio.client',
                   'engineio.client'):
        caplog.set_level(logging.DEBUG, logger=logger)
    user, _ = await register(base, password='bot password 2')
    bot = Bot(base, username=user['username'], password='bot password 2',
              backoff=0.2)
    seen = Recorder(bot)
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        first = await dm(client, 'one', to=user['username'])
        await seen.until(first['id'])
        old_token = bot.token
        status, data = await http(base, 'POST', '/api/logout', old_token,
                                  json={'all': True})
        assert status == 200, data
        second = await dm(client, 'two', room_id=first['room_id'])
        await seen.until(second['id'], timeout=20)
        assert bot.token != old_token
        assert seen.seen == [first['id'], second['id']]
        reply = await bot.send(room_id=first['room_id'], body='still here')
        got = await client.next('message', where=from_user(user['id']))
        assert got['id'] == reply['id']
    finally:
        await client.close()
        await bot.stop()


async def test_login_with_password_and_errors(base):
    user, _ = await register(base, password='bot password 1')
    bot = Bot(base, username=user['username'], password='bot password 1')
    await bot.start(timeout=10)
    try:
        assert bot.user['id'] == user['id']
        with pytest.raises(BotError) as refused:
            await bot.send(to='nobody_' + uuid.uuid4().hex[:8], body='hi')
        assert refused.value.code == 'not_found'
    finally:
        await bot.stop()

    wrong = Bot(base, username=user['username'], password='not the password')
    with pytest.raises(LoginFailed):
        await wrong.start(timeout=10)
    bad_token = Bot(base, 'not-a-token')
    with pytest.raises(BotError) as refused:
        await bad_token.start(timeout=10)
    assert refused.value.code == 'unauthorized'


def run_script(module, *args, env=None, input=None):
    return subprocess.run(
        [sys.executable, '-m', module, *args], cwd=ROOT, input=input,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})})


async def test_webhook_post_is_delivered_live(base):
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        hello = await dm(client, 'notify me here', to=bot_user['username'])
        done = await asyncio.to_thread(
            run_script, 'client_demo.bot.webhook_post', '--url', base,
            '--room', str(hello['room_id']), '--body', 'build 841 passed',
            env={'POSTBOX_TOKEN': token})
        assert done.returncode == 0, done.stderr
        posted = json.loads(done.stdout)
        got = await client.next('message', where=from_user(bot_user['id']))
        assert got['id'] == posted['id']
        assert got['body'] == 'build 841 passed'

        # --to finds the dm, the body comes from stdin, and a retry with the
        # same client_msg_id posts nothing twice.
        for _ in range(2):
            done = await asyncio.to_thread(
                run_script, 'client_demo.bot.webhook_post', '--to',
                alice['username'], '--client-msg-id', 'deploy-17',
                env={'POSTBOX_URL': base, 'POSTBOX_TOKEN': token},
                input='deploy done\n')
            assert done.returncode == 0, done.stderr
        got = await client.next('message', where=from_user(bot_user['id']))
        assert got['body'] == 'deploy done'
        await client.nothing('message', where=from_user(bot_user['id']))

        done = await asyncio.to_thread(
            run_script, 'client_demo.bot.webhook_post', '--url', base,
            '--token', 'bad', '--room', str(hello['room_id']), '--body', 'x')
        assert done.returncode == 1
        assert 'unauthorized' in done.stderr
    finally:
        await client.close()


async def test_webhook_post_opens_a_dm_with_someone_new(base):
    """The README's walkthrough: a bot nobody wrote to posts to alice by
    name; she gets the dm (``room``) and the message live; an unknown name
    or one who blocks the bot is refused, saying so."""
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        done = await asyncio.to_thread(
            run_script, 'client_demo.bot.webhook_post', '--url', base,
            '--token', token, '--to', alice['username'],
            input='deploy finished\n')
        assert done.returncode == 0, done.stderr
        posted = json.loads(done.stdout)
        room = await client.next('room')
        assert room['id'] == posted['room_id'] and room['kind'] == 'dm'
        got = await client.next('message', where=from_user(bot_user['id']))
        assert (got['id'], got['body']) == (posted['id'], 'deploy finished')

        # Over HTTP directly: room_id or to, not both, not neither.
        for data in ({'room_id': posted['room_id'], 'to': alice['username']},
                     {}):
            status, answer = await http(base, 'POST', '/api/messages', token,
                                        json={'body': 'x',
                                              'client_msg_id': 'x', **data})
            assert status == 400 and answer['error']['code'] == 'invalid'
        done = await asyncio.to_thread(
            run_script, 'client_demo.bot.webhook_post', '--url', base,
            '--token', token, '--to', unique_name('nobody'), '--body', 'x')
        assert done.returncode == 1 and 'not_found' in done.stderr
        carol, carol_token = await register(base)
        assert (await http(base, 'POST', '/api/messages', carol_token, json={
            'to': bot_user['username'], 'body': 'hi',
            'client_msg_id': 'c1'}))[0] == 201
        blocker = await connect(base, carol_token)
        ack = await blocker.call('block', {'username': bot_user['username']})
        await blocker.close()
        assert ack['ok'], ack
        status, answer = await http(base, 'POST', '/api/messages', token,
                                    json={'to': carol['username'],
                                          'body': 'still there?',
                                          'client_msg_id': 'c2'})
        assert status == 403 and answer['error']['code'] == 'forbidden'
    finally:
        await client.close()


class ScriptBot:
    """An example bot run as ``python -m ...`` with ``-v``; its log lines
    are collected so a test can wait for "caught up"."""

    def __init__(self, module, env):
        self.module = module
        self.env = env
        self.lines = []
        self.caught_up = asyncio.Queue()

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, '-m', self.module, '-v', cwd=ROOT, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        async for line in self.proc.stdout:
            line = line.decode(errors='replace')
            self.lines.append(line)
            if 'caught up' in line:
                self.caught_up.put_nowait(line)

    async def ready(self, timeout=20):
        await asyncio.wait_for(self.caught_up.get(), timeout)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self.reader
        return code

    def output(self) -> str:
        return ''.join(self.lines)


async def test_echo_bot_runs_as_a_script(base, tmp_path):
    """``python -m client_demo.bot.echo_bot`` configured by environment
    answers a dm, stops cleanly on SIGTERM, and once restarted answers what
    came in while it was down."""
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    env = {**os.environ, 'POSTBOX_URL': base, 'POSTBOX_TOKEN': token,
           'POSTBOX_STATE': str(tmp_path / 'echo.json')}
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    script = await ScriptBot('client_demo.bot.echo_bot', env).start()
    try:
        # A bot's first start begins at the present (skip_history).
        await script.ready()
        sent = await dm(client, 'ping script', to=bot_user['username'])
        echo = await client.next('message', timeout=20,
                                 where=from_user(bot_user['id']))
        assert (echo['body'], echo['reply_to']) == ('ping script', sent['id'])
        assert await script.stop() == 0, script.output()

        while_down = await dm(client, 'while down', room_id=sent['room_id'])
        script = await ScriptBot('client_demo.bot.echo_bot', env).start()
        echo = await client.next('message', timeout=20,
                                 where=from_user(bot_user['id']))
        assert (echo['body'], echo['reply_to']) == ('while down',
                                                    while_down['id'])
    finally:
        await client.close()
        code = await script.stop()
    assert code == 0, script.output()


async def bot_socket_closed(base, token):
    """A live socket of a bot: (client, event set when it is closed)."""
    client = await connect(base, token)
    gone = asyncio.Event()
    client.sio.on('disconnect', lambda *args: gone.set())
    return client, gone


@pytest.mark.parametrize('how', ['logout_all', 'password'])
async def test_owner_logout_everywhere_revokes_bot_tokens(base, how):
    """A leaked bot token must not outlive its owner's 'log me out
    everywhere' or password change: the bot's tokens stop working and its
    live socket closes; another owner's bot is untouched."""
    owner, owner_token = await register(base, password='owner password')
    _, other_token = await register(base)
    bot, bot_token = await make_bot(base, owner_token)
    _, other_bot_token = await make_bot(base, other_token)
    live, gone = await bot_socket_closed(base, bot_token)
    if how == 'logout_all':
        status, data = await http(base, 'POST', '/api/logout', owner_token,
                                  json={'all': True})
    else:
        status, data = await http(base, 'POST', '/api/password', owner_token,
                                  json={'old_password': 'owner password',
                                        'new_password': 'owner password 2'})
    assert status == 200, data
    await asyncio.wait_for(gone.wait(), 10)
    status, data = await http(base, 'GET', '/api/me', bot_token)
    assert status == 401 and data['error']['code'] == 'unauthorized'
    assert (await refused(base, bot_token))['data'] == {
        'code': 'unauthorized'}
    assert (await http(base, 'GET', '/api/me', other_bot_token))[0] == 200


async def test_owner_rotates_a_bot_token(base):
    owner, owner_token = await register(base)
    bot, old_token = await make_bot(base, owner_token)
    live, gone = await bot_socket_closed(base, old_token)
    status, data = await http(base, 'POST',
                              f'/api/bots/{bot["username"]}/token',
                              owner_token)
    assert status == 200 and set(data) == {'token'}, data
    new_token = data['token']
    await asyncio.wait_for(gone.wait(), 10)
    assert (await http(base, 'GET', '/api/me', old_token))[0] == 401
    assert (await refused(base, old_token))['data'] == {
        'code': 'unauthorized'}
    status, me = await http(base, 'GET', '/api/me', new_token)
    assert status == 200 and me['user']['id'] == bot['id']
    again = await connect(base, new_token)
    assert (await again.call('rooms', {}))['ok']
    # Rotating again revokes the token from the first rotation.
    status, data = await http(base, 'POST',
                              f'/api/bots/{bot["username"].upper()}/token',
                              owner_token)
    assert status == 200
    assert (await http(base, 'GET', '/api/me', new_token))[0] == 401
    assert (await http(base, 'GET', '/api/me', data['token']))[0] == 200
    await again.close()


async def test_only_the_owner_rotates_a_bot_token(base):
    owner, owner_token = await register(base)
    stranger, stranger_token = await register(base)
    bot, bot_token = await make_bot(base, owner_token)
    path = f'/api/bots/{bot["username"]}/token'
    for token in (stranger_token, bot_token):
        status, data = await http(base, 'POST', path, token)
        assert status == 403 and data['error']['code'] == 'forbidden', data
    # Not a bot, or nobody at all: not found.
    for name in (stranger['username'], 'nobody_' + uuid.uuid4().hex[:8]):
        status, data = await http(base, 'POST', f'/api/bots/{name}/token',
                                  owner_token)
        assert status == 404 and data['error']['code'] == 'not_found', data
    status, data = await http(base, 'POST', path)
    assert status == 401
    # Nothing was revoked by the refused tries.
    assert (await http(base, 'GET', '/api/me', bot_token))[0] == 200


async def test_bot_uploads_sends_and_downloads_a_file(base, tmp_path):
    """The SDK's attachments: upload (a path, or bytes), send with a
    message, download; a refused type is a BotError saying why."""
    bot, seen, client, first = await bot_and_partner(base)
    try:
        report = tmp_path / 'report.csv'
        report.write_bytes(b'day,messages\nmon,12\ntue,30\n')
        stored = await bot.upload(report)
        assert (stored['filename'], stored['size']) == (
            'report.csv', len(report.read_bytes()))
        sent = await bot.send('the report', room_id=first['room_id'],
                              attachments=[stored['id']])
        got = await client.next('message', where=lambda m: m['id'] ==
                                sent['id'])
        assert [a['id'] for a in got['attachments']] == [stored['id']]
        # Back as bytes, whole (not None, not decoded as JSON).
        assert await bot.download(stored['id']) == report.read_bytes()
        # Bytes need a name; a type the server refuses says why.
        with pytest.raises(ValueError):
            await bot.upload(b'no name')
        with pytest.raises(BotError) as no:
            await bot.upload(b'<!DOCTYPE html><html><script>x()</script>',
                             filename='page.txt')
        assert (no.value.code, no.value.status) == ('invalid', 415)
        assert no.value.message
    finally:
        await client.close()
        await bot.stop()
