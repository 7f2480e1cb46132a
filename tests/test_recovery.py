"""Connection state recovery (PROTOCOL v2) with the official JS client, run
by Node: tests/js/recovery_test.js holds the scenarios, this runs them
against a real server (and restarts it with SIGTERM for one of them); a
Python client checks that sockets that did not opt in see no change."""
import os
import random
import subprocess
import threading
import time
import urllib.request

import asyncio

import pytest

from client_demo.postbox_bot.socketio_async_client import RecoveringClient
from tests.kit import (FAST_REDIS_ENV, NO_RATE_LIMITS, Client,
                       ServerProcess, connect, pair, register, start_servers,
                       stop_servers)
from tests.test_js_client import JS_DIR, node_modules  # noqa: F401 fixture

SCRIPT = JS_DIR / 'recovery_test.js'
# Small, so that the tests can go past it.
ENV = {'POSTBOX_RECOVERY_MAX_EVENTS': '6'}


@pytest.fixture
def recovery_server(tmp_path):
    proc = ServerProcess(tmp_path, env=ENV)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


def _node(url, scenario, *more, env=None):
    return subprocess.Popen(['node', str(SCRIPT), url, scenario, *more],
                            cwd=JS_DIR, env={**os.environ, **(env or {})},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(node, server, timeout=150):
    try:
        output, _ = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.kill()
        output, _ = node.communicate()
    return output


def test_js_client_recovers_missed_events_before_connect(
        node_modules, recovery_server):  # noqa: F811
    """Drops, two recoveries in a row, a drop before any event, joined
    rooms restored; unknown, too old or too many: recovered false and sync
    has the gap; a revoked token is refused; a plain socket gets no
    offsets."""
    node = _node(recovery_server.url, 'basic')
    output = _finish(node, recovery_server)
    assert node.returncode == 0 and 'PASS' in output, (
        f'recovery_test.js failed:\n{output}\n'
        f'server log:\n{recovery_server.read_log()}')
    # The metrics count them, fallbacks by reason.
    with urllib.request.urlopen(recovery_server.url + '/metrics') as resp:
        text = resp.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith('postbox_recoveries_total{'):
            labels, value = line.rsplit(' ', 1)
            counts[labels] = float(value)
    assert counts['postbox_recoveries_total{outcome="attempted",reason=""}'] \
        == 9, counts
    assert counts['postbox_recoveries_total{outcome="succeeded",reason=""}'] \
        == 6, counts
    for reason in ('unknown_offset', 'too_many', 'too_old'):
        assert counts['postbox_recoveries_total{outcome="fallback",'
                      f'reason="{reason}"}}'] == 1, counts


def test_js_client_recovers_across_a_sigterm_restart(
        node_modules, tmp_path):  # noqa: F811
    server = ServerProcess(tmp_path, env=ENV).start()
    node = _node(server.url, 'restart')
    try:
        lines = []
        for line in node.stdout:
            lines.append(line)
            if line.startswith('RESTART NOW'):
                break
        else:
            pytest.fail('recovery_test.js ended early:\n' + ''.join(lines))
        assert server.stop() == 0, server.read_log()
        server.start()
        node.stdin.write('go\n')
        node.stdin.flush()
        output = ''.join(lines) + _finish(node, server)
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\n'
            f'server log:\n{server.read_log()}')
    finally:
        if node.poll() is None:
            node.kill()
        assert server.stop() == 0, server.read_log()


def test_js_client_recovers_on_another_process(
        node_modules, tmp_path, redis):  # noqa: F811
    """Two processes, one database, one Redis: a socket dropped on one
    recovers on the other (and back), joined room included."""
    servers = start_servers(tmp_path, 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV, **ENV})
    try:
        node = subprocess.Popen(
            ['node', str(SCRIPT), servers[0].url, 'other', servers[1].url],
            cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        output = _finish(node, servers[0])
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\nserver logs:\n' +
            '\n'.join(s.read_log() for s in servers))
    finally:
        assert stop_servers(servers) == [0, 0], \
            [s.read_log() for s in servers]


def test_js_client_chaos_of_drops_misses_nothing_and_gets_nothing_twice(
        node_modules, tmp_path):  # noqa: F811
    """30 s of random drops and reconnects to one process (sessions kept
    in the process) while messages and edits flow: every seq of the room
    arrives, and no event twice."""
    server = ServerProcess(tmp_path, env={
        **NO_RATE_LIMITS, 'POSTBOX_RECOVERY_MAX_EVENTS': '200'}).start()
    try:
        node = _node(server.url, 'chaos', env={'CHAOS_SECONDS': '30'})
        output = _finish(node, server, timeout=240)
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\n'
            f'server log:\n{server.read_log()}')
    finally:
        assert server.stop() == 0, server.read_log()


def test_js_client_chaos_of_drops_restarts_and_switches_across_processes(
        node_modules, tmp_path, redis):  # noqa: F811
    """60 s, two processes with Redis: the receiver's transport drops at
    random and it reconnects to either process, while the test restarts
    the processes with SIGTERM in turn and a partner sends and edits (and
    resends across its own server's restarts). In the end the receiver
    holds every seq of the room once, whether each reconnect recovered or
    fell back to sync."""
    seconds = 60
    servers = start_servers(tmp_path, 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV, **NO_RATE_LIMITS,
        'POSTBOX_RECOVERY_MAX_EVENTS': '200'})
    restarts, failures = [], []
    done = threading.Event()

    def restart_at_random():
        started, turn = time.monotonic(), 0
        while not done.wait(random.uniform(4, 9)) and \
                time.monotonic() - started < seconds - 10:
            server = servers[turn % 2]
            turn += 1
            code = server.stop()
            if code != 0:
                failures.append((server.url, code, server.read_log()))
            server.start()
            restarts.append(server.url)

    restarter = threading.Thread(target=restart_at_random)
    try:
        node = _node(servers[0].url, 'chaos', servers[1].url,
                     env={'CHAOS_SECONDS': str(seconds)})
        restarter.start()
        output = _finish(node, servers[0], timeout=300)
        done.set()
        restarter.join()
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\nserver logs:\n' +
            '\n'.join(s.read_log() for s in servers))
        print(output.strip().splitlines()[-2])
        assert not failures, failures
        assert len(restarts) >= 2, restarts
    finally:
        done.set()
        if restarter.is_alive():
            restarter.join()
        assert stop_servers(servers) == [0, 0], \
            [s.read_log() for s in servers]


async def test_offsets_only_for_sockets_that_opt_in(base):
    """An opted-in socket gets each message with a string offset after it
    (and the offset event at connect); a socket that did not opt in gets
    the message alone, so a handler taking one argument keeps working."""
    alice, bob, a, b, room = await pair(base)
    opted = Client(base, b.token)
    await opted.sio.connect(base, auth={'token': b.token, 'recover': True},
                            transports=['websocket'], wait_timeout=10)
    try:
        assert await opted.next('offset', timeout=10) == '0'
        ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'hi',
                                       'client_msg_id': 'r1'})
        assert ack['ok'], ack
        plain = await b.next('message', timeout=10)
        assert plain['body'] == 'hi'
        message, offset = await opted.next('message', timeout=10)
        assert message == plain and offset == '1'
    finally:
        await opted.close()
        await a.close()
        await b.close()


class _Opted:
    """A Python socket that opts in to recovery as the JS client does: it
    keeps the CONNECT reply's pid (the bot SDK's ``RecoveringClient``) and
    the last offset it saw, and reconnects naming both. ``replay`` holds
    the ``(event, payload, offset)`` that came before the CONNECT reply,
    ``events`` everything of the last connection."""

    def __init__(self, base, token):
        self.base, self.token = base, token
        self.pid = self.offset = self.sio = None
        self.replay, self.events = [], []

    async def connect(self) -> bool:
        """Connect (naming the last session, if any); True if it was
        recovered."""
        sio = self.sio = RecoveringClient(reconnection=False)
        replay, events = self.replay, self.events = [], []

        async def record(event, *args):
            offset = args[-1] if args and isinstance(args[-1], str) else None
            if offset is not None:
                self.offset = offset
            item = (event, args[0] if args else None, offset)
            events.append(item)
            if not sio.replied:
                replay.append(item)
        sio.on('*', record)
        auth = {'token': self.token, 'recover': True}
        if self.pid is not None:
            auth.update(pid=self.pid, offset=self.offset)
        await sio.connect(self.base, auth=auth, transports=['websocket'],
                          wait_timeout=10)
        recovered = self.pid is not None and sio.pid == self.pid
        self.pid = sio.pid
        return recovered

    async def until(self, what, check, timeout=10):
        for _ in range(int(timeout / 0.05)):
            if any(check(*item) for item in self.events):
                return
            await asyncio.sleep(0.05)
        pytest.fail(f'no {what}: {self.events}')

    async def close(self):
        await self.sio.disconnect()


def _room_events(replay):
    return [(room, offset) for event, room, offset in replay
            if event == 'room']


async def test_rooms_made_while_away_are_replayed_without_a_message(base):
    """A group made with b and a dm opened to b while b's socket is away,
    neither with a message yet (no seq, nothing in the log): the recovery
    replays the room event of each, with its offset, before connect. A
    room b's session already heard of is not sent again."""
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = _Opted(base, tb)
    try:
        assert not await b.connect()
        heard = (await a.call('create_group', {
            'name': 'heard live', 'members': [bob['username']]}))['room']
        await b.until('live room', lambda event, room, _: event == 'room'
                      and room['id'] == heard['id'])
        await b.close()
        ack = await a.call('create_group', {
            'name': 'made while away', 'members': [bob['username']]})
        assert ack['ok'], ack
        group = ack['room']
        ack = await a.call('open_dm', {'username': bob['username']})
        assert ack['ok'], ack
        dm = ack['room']
        assert await b.connect(), 'same pid: recovered'
        replayed = _room_events(b.replay)
        assert sorted(room['id'] for room, _ in replayed) == \
            sorted([group['id'], dm['id']]), b.replay
        assert all(room['last_seq'] == 0 and offset for room, offset
                   in replayed), replayed
        # The session now knows both: a drop replays nothing again.
        await b.close()
        assert await b.connect()
        assert b.replay == []
    finally:
        await a.close()
        await b.close()


async def test_each_replayed_change_carries_its_own_seq(base):
    """A message edited, then reacted to, while the socket is away: the
    recovery replays both changes, each ``message_updated`` with its own
    change's seq in ``update_seq`` (the message as it is now), not twice
    the latest seq with the first one missing."""
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = _Opted(base, tb)
    try:
        assert not await b.connect()
        ack = await a.call('open_dm', {'username': bob['username']})
        room_id = ack['room']['id']
        ack = await a.call('send_dm', {'room_id': room_id, 'body': 'v1',
                                       'client_msg_id': 'edit-me'})
        message = ack['message']
        await b.until('the message', lambda event, m, _: event == 'message'
                      and m['id'] == message['id'])
        await b.close()
        edited = await a.call('edit_message', {'message_id': message['id'],
                                               'body': 'v2'})
        reacted = await a.call('react', {'message_id': message['id'],
                                         'emoji': '👍', 'on': True})
        seqs = [edited['message']['update_seq'],
                reacted['message']['update_seq']]
        assert seqs[1] == seqs[0] + 1
        assert await b.connect(), 'same pid: recovered'
        updates = [m for event, m, _ in b.replay
                   if event == 'message_updated']
        assert [m['update_seq'] for m in updates] == seqs, b.replay
        assert all(m['body'] == 'v2' and m['reactions'] == {'👍': [alice['id']]}
                   for m in updates), updates
    finally:
        await a.close()
        await b.close()


async def test_too_many_rooms_made_while_away_fall_back_to_sync(
        recovery_server):
    """Rooms made while away count against ``recovery_max_events`` (6
    here) like any missed event: 6 are replayed, 7 are a fallback."""
    base = recovery_server.url
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = _Opted(base, tb)

    async def groups(count):
        for i in range(count):
            ack = await a.call('create_group', {
                'name': f'g{i}', 'members': [bob['username']]})
            assert ack['ok'], ack
    try:
        assert not await b.connect()
        await b.close()
        await groups(6)
        assert await b.connect()
        assert len(_room_events(b.replay)) == 6, b.replay
        await b.close()
        await groups(7)
        assert not await b.connect(), 'more than the cap: a new session'
    finally:
        await a.close()
        await b.close()


def _applied(replay):
    """The messages a client following the contract applies from a
    replay: a room's ``last_seq`` counts as applied, and a (room_id, seq)
    at or below what it has is skipped."""
    have, shown = {}, []
    for event, payload, _ in replay:
        if event == 'room':
            room_id = payload['id']
            have[room_id] = max(have.get(room_id, 0), payload['last_seq'])
        elif event == 'message':
            room_id, seq = payload['room_id'], payload['seq']
            if seq > have.get(room_id, 0):
                have[room_id] = seq
                shown.append(payload['body'])
    return shown


async def test_replayed_new_room_does_not_claim_the_seqs_replayed_after_it(
        base):
    """A group made with b while away, with a message in it, and a group b
    is added to while away, after and before messages: the room event that
    introduces each says nothing of the seqs the replay then carries, so a
    client that takes ``last_seq`` as applied shows every message."""
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = _Opted(base, tb)

    async def send(room_id, body):
        ack = await a.call('send_dm', {'room_id': room_id, 'body': body,
                                       'client_msg_id': body})
        assert ack['ok'], ack
    try:
        assert not await b.connect()
        await b.close()
        made = (await a.call('create_group', {
            'name': 'with b', 'members': [bob['username']]}))['room']
        await send(made['id'], 'made 1')
        joined = (await a.call('create_group', {
            'name': 'without b', 'members': []}))['room']
        await send(joined['id'], 'before b')
        ack = await a.call('add_members', {'room_id': joined['id'],
                                           'members': [bob['username']]})
        assert ack['ok'], ack
        await send(joined['id'], 'after b')
        assert await b.connect()
        assert sorted(_applied(b.replay)) == \
            ['after b', 'before b', 'made 1'], b.replay
        firsts = {}
        for event, payload, _ in b.replay:
            if event == 'room':
                firsts.setdefault(payload['id'], payload['last_seq'])
        assert firsts == {made['id']: 0, joined['id']: 0}, b.replay
    finally:
        await a.close()
        await b.close()
