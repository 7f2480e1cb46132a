"""The bot SDK under the conditions a newcomer's review met, against real
servers: a connection cut while a reply is in flight, many sends at once
under the server's rate limit, tokens that expire within seconds, a
handler that raises (its name in the log), two bots in one dm, and the
example bots run from an installed SDK and through ``postbox_bot.cli``."""
import asyncio
import logging
import os
import sys
import uuid

from client_demo.bot import echo_bot
from client_demo.postbox_bot import Bot
from tests.kit import ROOT, ServerProcess, connect, http, register
from tests.test_bots import Recorder, dm, from_user, make_bot


class CuttableProxy:
    """A TCP proxy on loopback in front of a server. ``hold()`` stops
    passing what the server sends (a stalled link: a request's answer is
    kept back); ``cut()`` closes every connection through it, as a
    network blip does, and passes everything again."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.holding = False
        self.conns = set()

    async def start(self):
        self.server = await asyncio.start_server(self._serve, '127.0.0.1', 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    async def _serve(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(
                '127.0.0.1', self.target_port)
        except OSError:
            writer.close()
            return
        conn = (writer, up_writer)
        self.conns.add(conn)

        async def pipe(src, dst, from_server):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if from_server and self.holding:
                        continue  # held back: this connection is cut next
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False),
                                 pipe(up_reader, writer, True))
        except asyncio.CancelledError:
            pass  # the proxy is closing
        self.conns.discard(conn)

    def hold(self):
        self.holding = True

    def cut(self):
        for writer, up_writer in list(self.conns):
            writer.transport.abort()
            up_writer.transport.abort()
        self.conns.clear()
        self.holding = False

    async def close(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def test_a_cut_connection_fails_the_send_in_flight_at_once(base):
    """The connection drops while a reply's ack is on its way: the send
    fails at once and is retried on the next connection (the same
    client_msg_id: stored once), and the next message is handled long
    before the request timeout (120 s here) would have ended the wait."""
    port = int(base.rsplit(':', 1)[1])
    proxy = await CuttableProxy(port).start()
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = Bot(proxy.url, token, request_timeout=120, backoff=0.2,
              backoff_max=1.0)
    seen = Recorder(bot)
    replies = []

    @bot.on_message
    async def answer(message):
        if message['body'] == 'ask':
            proxy.hold()  # the ack of this send will not come through
            replies.append(await bot.send(
                room_id=message['room_id'], body='answer',
                client_msg_id=f'answer-{message["id"]}'))

    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        ask = await dm(client, 'ask', to=bot_user['username'])
        # The server stored the reply (alice has it): only its ack is held.
        stored = await client.next('message', timeout=10,
                                   where=from_user(bot_user['id']))
        proxy.cut()
        after = await dm(client, 'after the cut', room_id=ask['room_id'])
        # Before: the send waited out its request timeout first.
        await seen.until(after['id'], timeout=40)
        assert [r['id'] for r in replies] == [stored['id']]
        assert seen.seen == [ask['id'], after['id']]
        await client.nothing('message', where=from_user(bot_user['id']))
    finally:
        await client.close()
        await bot.stop()
        await proxy.close()


async def test_concurrent_sends_ride_out_the_rate_limit(base):
    """45 sends at once (the server allows a burst of 30, then 10 a
    second): each one is retried after retry_after with a growing random
    spread until it goes through, none gives up."""
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = Bot(base, token)
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        first = await dm(client, 'hi', to=bot_user['username'])
        sent = await asyncio.wait_for(asyncio.gather(*(
            bot.send(room_id=first['room_id'], body=f'burst {i}')
            for i in range(45))), 60)
        assert len({m['id'] for m in sent}) == 45
    finally:
        await client.close()
        await bot.stop()


async def test_the_bot_outlives_its_token(tmp_path):
    """Tokens that live 6 seconds: the bot refreshes its token before it
    expires, reconnects with it, and handles every message for three
    lifetimes, each once and in order; the new token is in the state
    file."""
    server = ServerProcess(tmp_path / 'server',
                           env={'POSTBOX_TOKEN_TTL_SECONDS': '6'})
    await asyncio.to_thread(server.start)
    base = server.url
    bot = None
    try:
        owner, owner_token = await register(base)
        bot_user, token = await make_bot(base, owner_token)
        state = tmp_path / 'bot.json'
        bot = Bot(base, token, state_path=state, backoff=0.2,
                  backoff_max=1.0)
        seen = Recorder(bot)
        await bot.start(timeout=10)
        alice, _ = await register(base, password='alice password')

        async def post(body, **target):
            # Alice's tokens expire too: a fresh login for each message.
            status, data = await http(base, 'POST', '/api/login', json={
                'username': alice['username'], 'password': 'alice password'})
            assert status == 200, data
            status, data = await http(base, 'POST', '/api/messages',
                                      data['token'], json={
                                          'body': body, **target,
                                          'client_msg_id': str(uuid.uuid4())})
            assert status == 201, data
            return data['message']

        first = await post('first', to=bot_user['username'])
        await seen.until(first['id'], timeout=20)
        sent = [first['id']]
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * 6 + 2
        while loop.time() < until:
            await asyncio.sleep(1.5)
            sent.append((await post(f'at {len(sent)}',
                                    room_id=first['room_id']))['id'])
            await seen.until(sent[-1], timeout=20)
        assert seen.seen == sent
        assert bot.token != token
        assert f'"token": "{bot.token}"' in state.read_text()
        assert (await http(base, 'GET', '/api/me', bot.token))[0] == 200
    finally:
        if bot is not None:
            await bot.stop()
        assert await server.astop() == 0, server.read_log()


async def test_a_failing_handler_is_logged_by_its_name(base, caplog):
    caplog.set_level(logging.ERROR, logger='client_demo.postbox_bot')
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    bot = Bot(base, token)

    @bot.on_message
    async def explode_on_purpose(message):
        raise RuntimeError('boom')

    seen = Recorder(bot)  # runs after the failing one: the bot goes on
    await bot.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        sent = await dm(client, 'hi', to=bot_user['username'])
        await seen.until(sent['id'])
        failures = [r for r in caplog.records if 'failed' in r.getMessage()]
        assert failures, caplog.text
        assert 'explode_on_purpose' in failures[0].getMessage()
    finally:
        await client.close()
        await bot.stop()


async def test_the_echo_bot_does_not_answer_a_bot(base):
    """Two bots in a dm must not echo each other forever: the echo bot
    answers people only."""
    owner, owner_token = await register(base)
    echo_user, echo_token = await make_bot(base, owner_token)
    other_user, other_token = await make_bot(base, owner_token)
    echo = echo_bot.setup(Bot(base, echo_token))
    other = Bot(base, other_token)
    heard = asyncio.Queue()
    other.on_message(heard.put_nowait)
    await echo.start(timeout=10)
    await other.start(timeout=10)
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    try:
        await other.send(to=echo_user['username'], body='hello bot')
        # A person still gets the echo; by then the bot's dm was handled.
        await dm(client, 'hello person', to=echo_user['username'])
        got = await client.next('message', timeout=10,
                                where=from_user(echo_user['id']))
        assert got['body'] == 'hello person'
        await asyncio.sleep(1)
        assert heard.empty(), heard.get_nowait()
    finally:
        await client.close()
        await echo.stop()
        await other.stop()


async def run_echo(argv, env, cwd, base, bot_username, client):
    """Run an echo bot process (``argv`` after the interpreter), have it
    answer one dm, then stop it with SIGTERM; returns its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines = []
    caught_up = asyncio.Event()

    async def read():
        async for line in proc.stdout:
            lines.append(line.decode(errors='replace'))
            if 'caught up' in lines[-1]:
                caught_up.set()
    reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(caught_up.wait(), 30)
        sent = await dm(client, f'ping {uuid.uuid4().hex[:6]}',
                        to=bot_username)
        got = await client.next('message', timeout=20,
                                where=lambda m: m.get('reply_to') ==
                                sent['id'])
        assert got['body'] == sent['body']
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        raise AssertionError(''.join(lines))
    finally:
        if proc.returncode is None:
            proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 30)
        await reader
    assert code == 0, ''.join(lines)
    return ''.join(lines)


async def test_example_bots_run_from_an_installed_sdk(base, tmp_path):
    """With ``postbox_bot`` importable (as after ``pip install``; here a
    link on PYTHONPATH) and no Postbox checkout on the path, echo_bot.py
    runs as a file, and through ``python -m postbox_bot.cli``."""
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'postbox_bot').symlink_to(ROOT / 'client_demo' / 'postbox_bot')
    owner, owner_token = await register(base)
    bot_user, token = await make_bot(base, owner_token)
    env = {**os.environ, 'PYTHONPATH': str(site), 'POSTBOX_URL': base,
           'POSTBOX_TOKEN': token}
    alice, alice_token = await register(base)
    client = await connect(base, alice_token)
    script = str(ROOT / 'client_demo' / 'bot' / 'echo_bot.py')
    try:
        for argv in ([script, '-v'],
                     ['-m', 'postbox_bot.cli', '-v', script]):
            output = await run_echo(argv, env, tmp_path, base,
                                    bot_user['username'], client)
            # The installed package's loggers: the SDK came from there.
            assert ' postbox_bot.events INFO caught up' in output, output
    finally:
        await client.close()


async def test_a_request_right_after_start_waits_for_the_socket(base):
    """``start`` without waiting, then a socket request at once: it waits
    for the connection instead of failing as if no socket were used."""
    owner, owner_token = await register(base)
    _, token = await make_bot(base, owner_token)
    bot = Bot(base, token)
    await bot.start()
    try:
        assert (await bot.call('rooms'))['ok']
    finally:
        await bot.stop()
