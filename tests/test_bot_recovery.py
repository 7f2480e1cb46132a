"""The bot SDK's connection state recovery (PROTOCOL v2) against a real
server: a bot whose transport drops resumes its session and gets what it
missed replayed before its live events, without ``sync``, any number of
times; an unknown session falls back to ``sync``; a group made while the
bot was away comes from its start. Every message is handled exactly once
either way. (The SIGTERM restart is test_bots.py's
test_bot_survives_a_server_restart.) And the drift test of the SDK's one
python-socketio override."""
import ast
import asyncio
import hashlib
import importlib.metadata
import inspect
import re
import tomllib

from packaging.requirements import Requirement

from client_demo.postbox_bot import Bot, socketio_async_client
from tests.helpers import ROOT, connect, register
from tests.test_bots import bot_and_partner, dm


class Away:
    """``async with Away(bot):`` drops the bot's transport (as a network
    drop would) and holds its reconnect until the block ends, so that what
    is sent inside is missed for sure; on exit waits until the bot is
    back and caught up (recovered or synced)."""

    def __init__(self, bot):
        self.bot = bot
        self.back = asyncio.Event()
        self.gate = asyncio.Event()

    async def __aenter__(self):
        bot, connect = self.bot, self.bot._connect

        async def gated():
            await self.gate.wait()
            bot._connect = connect
            await connect()
        bot._connect = gated
        bot.on('ready')(self.back.set)
        await bot.sio.eio.disconnect(abort=True)
        return self

    async def __aexit__(self, *exc):
        self.gate.set()
        if exc[0] is None:
            await asyncio.wait_for(self.back.wait(), 20)


async def away_and_back(bot, seen, client, room_id, count):
    """``count`` messages sent to ``room_id`` while the bot is away, then
    one more once it is back; returns their ids once it handled them."""
    async with Away(bot):
        sent = [(await dm(client, f'while away {i}', room_id=room_id))['id']
                for i in range(count)]
    sent.append((await dm(client, 'back', room_id=room_id))['id'])
    await seen.until(sent[-1], timeout=20)
    return sent


async def test_dropped_transport_is_recovered_without_sync(base):
    bot, seen, client, first = await bot_and_partner(base)
    try:
        assert (bot.syncs, bot.recoveries) == (1, 0)
        sent = await away_and_back(bot, seen, client, first['room_id'], 5)
        assert seen.seen == [first['id']] + sent
        # The server replayed the gap; the bot did not sync again.
        assert bot.recovered is True
        assert (bot.connects, bot.recoveries, bot.syncs) == (2, 1, 1)
        assert bot.replayed == 5
        # And again: a session recovers any number of times.
        again = await away_and_back(bot, seen, client, first['room_id'], 2)
        assert seen.seen == [first['id']] + sent + again
        assert (bot.connects, bot.recoveries, bot.syncs) == (3, 2, 1)
        assert bot.replayed == 7
    finally:
        await client.close()
        await bot.stop()


async def test_unknown_session_falls_back_to_sync(base):
    bot, seen, client, first = await bot_and_partner(base)
    try:
        # A session the server does not know (as after a SIGKILL).
        bot._pid = 'no-such-session'
        sent = await away_and_back(bot, seen, client, first['room_id'], 3)
        assert seen.seen == [first['id']] + sent
        assert bot.recovered is False
        assert (bot.connects, bot.recoveries, bot.syncs) == (2, 0, 2)
        assert bot.replayed == 0
    finally:
        await client.close()
        await bot.stop()


async def test_rooms_made_while_away_come_once(base):
    """The replay brings rooms the bot did not know: a dm from someone new
    comes whole from the replay; a group is taken from its start by a
    catch-up after it (where the bot's part of a group starts is in the
    inbox). Each message once."""
    bot, seen, client, first = await bot_and_partner(base)
    stranger = None
    try:
        user, token = await register(base)
        stranger = await connect(base, token)
        async with Away(bot):
            new_dm = [await dm(stranger, f'new dm {i}',
                               to=bot.user['username'])
                      for i in range(2)]
            ack = await client.call('create_group', {
                'name': 'while away', 'members': [bot.user['username']]})
            assert ack['ok'], ack
            group = ack['room']
            in_group = [await dm(client, f'group {i}', room_id=group['id'])
                        for i in range(3)]
        await seen.until(in_group[-1]['id'], timeout=20)
        assert sorted(seen.seen) == sorted(
            m['id'] for m in [first] + new_dm + in_group)
        assert [m for m in seen.seen if m in {n['id'] for n in new_dm}] == [
            m['id'] for m in new_dm]
        assert bot.is_dm(new_dm[0]['room_id'])
        assert bot.rooms[group['id']]['kind'] == 'group'
        # Recovered, then the catch-up that places the new group.
        assert bot.recovered is True
        assert (bot.recoveries, bot.syncs) == (1, 2)
    finally:
        await client.close()
        if stranger is not None:
            await stranger.close()
        await bot.stop()


async def test_catch_up_pages_the_inbox(base):
    """The catch-up reads the inbox a page at a time: a new Bot for an
    account in five dms, two rooms a page, knows all five."""
    bot, seen, client, first = await bot_and_partner(base)
    other = None
    try:
        users = [await register(base) for _ in range(4)]
        rooms = [first['room_id']] + [
            (await bot.send(to=user['username'], body='hi'))['room_id']
            for user, _ in users]
        other = Bot(base, bot.token)
        other.inbox_page = 2
        await other.start(timeout=10)
        assert sorted(other.rooms) == sorted(rooms)
        assert all(other.is_dm(room_id) for room_id in rooms)
    finally:
        await client.close()
        await bot.stop()
        if other is not None:
            await other.stop()


def _upstream_has(cls, name) -> bool:
    """Whether the upstream class has ``name``: as an attribute, or one
    its code (or a base's) sets on ``self``."""
    pattern = re.compile(rf'\bself\.{re.escape(name)}\s*[=:]')
    return hasattr(cls, name) or any(
        pattern.search(inspect.getsource(klass))
        for klass in cls.__mro__ if klass is not object)


def _private_names(source) -> set:
    """Private (not dunder) attribute and method names in ``source``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        name = node.attr if isinstance(node, ast.Attribute) else \
            node.name if isinstance(node, (ast.FunctionDef,
                                           ast.AsyncFunctionDef)) else ''
        if name.startswith('_') and not name.startswith('__'):
            names.add(name)
    return names


def test_the_python_socketio_override_has_not_drifted():
    """The SDK's override of python-socketio (fenced as server/upstream/
    is): its declared private names exist in the installed version, none
    of the upstream class's private names is used undeclared, the code it
    relies on hashes as it did, and the installed version is within the
    SDK's pin."""
    module = socketio_async_client
    upstream = module.UPSTREAM
    declared = {dotted.rpartition('.')[2] for dotted in module.PRIVATE_NAMES}
    assert all(dotted.startswith('socketio.async_client.AsyncClient.')
               for dotted in module.PRIVATE_NAMES)
    assert [n for n in sorted(declared) if not _upstream_has(upstream, n)] \
        == []
    used = _private_names(inspect.getsource(module))
    assert [n for n in sorted(used - declared)
            if _upstream_has(upstream, n)] == []
    for dotted, expected in module.COPIED.items():
        owner, _, name = dotted.rpartition('.')
        assert owner == 'socketio.async_client.AsyncClient'
        source = inspect.getsource(getattr(upstream, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == expected, \
            f'{dotted} changed upstream: re-read the override'
    project = tomllib.loads((ROOT / 'client_demo' / 'postbox_bot' /
                             'pyproject.toml').read_text())['project']
    pins = {r.name: r.specifier for r in map(Requirement,
                                             project['dependencies'])}
    assert pins['python-socketio'].contains(
        importlib.metadata.version('python-socketio'))


async def test_a_gap_longer_than_a_sync_page_is_recovered(tmp_path):
    """The replay reads the log page after page: with sync pages of 2,
    seven missed messages still come back by recovery, each once."""
    from tests.kit import ServerProcess
    server = ServerProcess(tmp_path, env={'POSTBOX_SYNC_PAGE_SIZE': '2'})
    await asyncio.to_thread(server.start)
    try:
        bot, seen, client, first = await bot_and_partner(server.url)
        try:
            sent = await away_and_back(bot, seen, client, first['room_id'], 7)
            assert seen.seen == [first['id']] + sent
            assert bot.recovered is True and bot.replayed == 7
        finally:
            await client.close()
            await bot.stop()
    finally:
        assert await server.astop() == 0, server.read_log()
