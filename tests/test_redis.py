"""Several Postbox processes joined by a real redis-server, sharing one
SQLite file: users on different processes talk as if there were one."""
import asyncio
import os
import random
import re
import signal
import subprocess
import sys

import pytest

from tests.kit import (FAST_REDIS_ENV, ROOT, RedisProcess, ServerProcess,
                       connect, dm_across, http, pair, register,
                       running_servers, start_servers, stop_servers)


@pytest.fixture(scope='module')
def cluster(tmp_path_factory, redis):
    """Three processes, one SQLite file, one Redis."""
    with running_servers(tmp_path_factory.mktemp('cluster'), 3, {
            'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV}) as servers:
        yield servers


async def wait_ready(server, ready=True, timeout=20):
    """Poll /readyz until it says ``ready``; returns its body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, body = await http(server.url, 'GET', '/readyz')
        if (status == 200) == ready:
            return body
        assert loop.time() < deadline, (status, body)
        await asyncio.sleep(0.1)


async def test_ready_reports_redis(cluster):
    for server in cluster:
        body = await wait_ready(server)
        assert body['checks']['redis'] is True


async def test_dm_between_processes(cluster):
    p1, p2, _ = cluster
    alice, bob, a, b, room = await dm_across(p1.url, p2.url)
    reply = await b.call('send_dm', {'room_id': room['id'], 'body': 'hey',
                                     'client_msg_id': 'c2'})
    assert reply['ok']
    got = await a.next('message', where=lambda m: m['body'] == 'hey')
    assert got['seq'] == 2
    # Each message arrives once, not once per process.
    await a.nothing('message', 0.3, where=lambda m: m['body'] == 'hey')
    await b.nothing('message', 0.3, where=lambda m: m['body'] == 'hi bob')
    await a.close()
    await b.close()


async def test_messages_cross_processes_after_redis_lost_its_scripts(
        cluster, redis):
    """A Redis restarted empty (here: SCRIPT FLUSH) no longer knows the
    routing script the processes send by its sha: the next message still
    reaches the other process, once."""
    p1, p2, _ = cluster
    *_, a, b, _ = await dm_across(p1.url, p2.url)
    redis.command('SCRIPT', 'FLUSH')
    *_, a2, b2, _ = await dm_across(p1.url, p2.url)
    await b2.nothing('message', 0.3, where=lambda m: m['body'] == 'hi bob')
    for client in (a, b, a2, b2):
        await client.close()


async def test_user_on_two_processes_gets_every_message_on_both(cluster):
    p1, p2, p3 = cluster
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    a = await connect(p1.url, ta)
    b_here = await connect(p2.url, tb)
    b_there = await connect(p3.url, tb)
    a_other = await connect(p3.url, ta)
    for i in range(5):
        ack = await a.call('send_dm', {'to': bob['username'], 'body': f'm{i}',
                                       'client_msg_id': f'k{i}'})
        assert ack['ok']
    for client in (b_here, b_there, a_other):
        bodies = [(await client.next('message'))['body'] for _ in range(5)]
        assert bodies == [f'm{i}' for i in range(5)]
        await client.nothing('message', 0.2)
    for client in (a, b_here, b_there, a_other):
        await client.close()


async def published(server) -> float:
    """How many messages ``server`` has handed to Redis (its metric)."""
    status, text = await http(server.url, 'GET', '/metrics')
    assert status == 200
    found = re.search(r'^postbox_redis_published_total (\S+)$', text, re.M)
    return float(found.group(1))


async def settled_published(server):
    """``published`` once it stops moving (presence changes of earlier
    tests' users may still be on their way out)."""
    last = await published(server)
    while True:
        await asyncio.sleep(0.7)
        now = await published(server)
        if now == last:
            return now
        last = now


async def test_local_dms_skip_redis_and_a_new_device_elsewhere_gets_them(
        cluster):
    """Messages whose recipients are all on one process never go to
    Redis; the moment the recipient connects on another process as well,
    the very next message reaches that socket too, and once it leaves,
    messages stay local again."""
    p1, p2, p3 = cluster
    _, _, a, b, room = await pair(p1.url)
    room_id = room['id']
    before = await settled_published(p1)
    for i in range(5):
        ack = await a.call('send_dm', {'room_id': room_id, 'body': f'l{i}',
                                       'client_msg_id': f'l{i + 1}'})
        assert ack['ok']
        assert (await b.next('message'))['body'] == f'l{i}'
    assert await published(p1) == before

    # A new device on another process gets the message sent right after
    # it is connected: no process may still think bob is only on p1.
    for n, elsewhere in enumerate((p2, p3, p2, p3)):
        device = await connect(elsewhere.url, b.token)
        body = f'new device {n}'
        ack = await a.call('send_dm', {'room_id': room_id, 'body': body,
                                       'client_msg_id': f'd{n}'})
        assert ack['ok']
        got = await device.next('message')
        assert got['body'] == body and got['seq'] == ack['message']['seq']
        assert (await b.next('message'))['body'] == body
        await device.close()

    # With every other device gone, messages are local again.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    n = 0
    while True:
        start = await published(p1)
        n += 1
        ack = await a.call('send_dm', {'room_id': room_id, 'body': 'back',
                                       'client_msg_id': f'b{n}'})
        assert (await b.next('message'))['body'] == 'back'
        if await published(p1) == start:
            break
        assert loop.time() < deadline, 'p1 still publishes for bob'
        await asyncio.sleep(0.2)
    await a.close()
    await b.close()


async def test_connecting_elsewhere_waits_until_the_other_process_knows(
        cluster):
    """While a process holding bob does not yet know that bob connected
    on another one (here: it is frozen), that connection is not reported
    connected: a message that process sent meanwhile could skip it."""
    p1, p2, _ = cluster
    _, _, a, b, room = await pair(p1.url)
    os.kill(p1.proc.pid, signal.SIGSTOP)
    try:
        device = asyncio.create_task(connect(p2.url, b.token))
        # Well under the processes' 1 s liveness TTL, so p1 counts as
        # alive, and far more than a connect takes.
        await asyncio.sleep(0.3)
        waited = not device.done()
    finally:
        os.kill(p1.proc.pid, signal.SIGCONT)
    device = await device
    assert waited, 'the connect finished while p1 could not know of it'
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'there?',
                                   'client_msg_id': 'w1'})
    assert (await device.next('message'))['body'] == 'there?'
    assert (await b.next('message'))['body'] == 'there?'
    assert ack['ok']
    for sock in (a, b, device):
        await sock.close()


async def test_devices_hopping_between_processes_miss_no_live_message(
        cluster):
    """Recipients' devices keep connecting to random processes while their
    partners send: every message sent after a device finished connecting,
    and acked before it decided to leave, reaches that device live (rooms
    entered and left all the time exercise what each process knows of the
    others). Runs at least 6 s and until 60 such messages were checked
    (fewer are sent in that time on a loaded machine)."""
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    stop, give_up = loop.time() + 6, loop.time() + 60
    sent, missed = [], []  # (user, body, issued, acked); (user, body)
    checked = 0

    def done() -> bool:
        return loop.time() >= give_up or (loop.time() >= stop and
                                          checked >= 60)

    async def device(token, user_id):
        nonlocal checked
        while not done():
            sock = await connect(rng.choice(cluster).url, token)
            connected = loop.time()
            await asyncio.sleep(rng.uniform(0.3, 1.5))  # the device's stay
            left = loop.time()
            due = {body for to, body, issued, acked in sent
                   if to == user_id and connected < issued and acked < left}
            received = set()
            try:
                while due - received:
                    received.add((await sock.next('message', 10))['body'])
            except asyncio.TimeoutError:
                missed.extend((user_id, body) for body in due - received)
            await sock.close()
            checked += len(due)

    async def sender(token, username, user_id):
        sock = await connect(rng.choice(cluster).url, token)
        room = (await sock.call('open_dm', {'username': username}))['room']
        n = 0
        while not done():
            n += 1
            body = f'{user_id}-{n}'
            issued = loop.time()
            ack = await sock.call('send_dm', {
                'room_id': room['id'], 'body': body, 'client_msg_id': body})
            assert ack['ok'], ack
            sent.append((user_id, body, issued, loop.time()))
            await asyncio.sleep(0.1)  # within the default send rate
        await sock.close()

    tasks = []
    for _ in range(4):
        (_, ts), (reader, tr) = (await register(cluster[0].url),
                                 await register(cluster[0].url))
        tasks += [sender(ts, reader['username'], reader['id']),
                  device(tr, reader['id']), device(tr, reader['id'])]
    await asyncio.gather(*tasks)
    assert checked >= 60, 'too little overlap to mean anything'
    assert missed == []


async def test_burst_to_many_processes_arrives_intact_and_once(cluster):
    """Sends that leave one process together (one publish batch, several
    rooms, several target processes, multi-byte bodies) each reach their
    own recipient, whole and once."""
    p1, p2, p3 = cluster
    senders = [await register(p1.url) for _ in range(3)]
    readers = [await register(p.url) for p in (p2, p3, p2)]
    out = [await connect(p1.url, token) for _, token in senders]
    into = [await connect(p.url, token)
            for p, (_, token) in zip((p2, p3, p2), readers)]
    bodies = {}
    calls = []
    for i, (sock, (user, _)) in enumerate(zip(out, readers)):
        for n in range(10):
            body = f'héllo {i}.{n} 🙂 ' + 'ü' * (n * 7)
            bodies.setdefault(user['id'], []).append(body)
            calls.append(sock.call('send_dm', {
                'to': user['username'], 'body': body,
                'client_msg_id': f'burst-{i}-{n}'}))
    acks = await asyncio.gather(*calls)
    assert all(ack['ok'] for ack in acks), acks
    for i, (sock, (user, _)) in enumerate(zip(into, readers)):
        mine = sorted((ack['message'] for ack in acks[i * 10:i * 10 + 10]),
                      key=lambda m: m['seq'])
        assert sorted(m['body'] for m in mine) == sorted(bodies[user['id']])
        got = [(await sock.next('message'))['body'] for _ in range(10)]
        assert got == [m['body'] for m in mine]  # in seq order
        await sock.nothing('message', 0.3)
    for sock in out + into:
        await sock.close()


async def test_group_typing_and_read_markers_between_processes(cluster):
    p1, p2, p3 = cluster
    (alice, ta), (bob, tb), (carol, tc) = [await register(p1.url)
                                           for _ in range(3)]
    a = await connect(p1.url, ta)
    a_elsewhere = await connect(p2.url, ta)  # alice's other device
    b = await connect(p2.url, tb)
    c = await connect(p3.url, tc)
    ack = await a.call('create_group', {
        'name': 'trio', 'members': [bob['username'], carol['username']]})
    assert ack['ok'], ack
    room = ack['room']
    assert (await b.next('room'))['id'] == room['id']
    assert (await c.next('room'))['id'] == room['id']
    for client in (a, a_elsewhere, b, c):
        assert (await client.call('join_room', {'room_id': room['id']}))['ok']
    await a.call('typing', {'room_id': room['id'], 'typing': True})
    for client in (b, c):
        got = await client.next('typing')
        assert got == {'room_id': room['id'], 'user': alice,
                       'typing': True}
    # The typist's own sockets, on any process, do not hear themselves.
    await a_elsewhere.nothing('typing', 0.3)
    sent = await a.call('send_dm', {'room_id': room['id'], 'body': 'all',
                                    'client_msg_id': 'g1'})
    for client in (b, c):
        assert (await client.next('message'))['id'] == sent['message']['id']
        assert (await client.next('typing'))['typing'] is False
    ack = await c.call('mark_read', {'room_id': room['id'], 'seq': 1})
    assert ack['ok'] and ack['unread'] == 0
    for client in (a, b):
        got = await client.next('read')
        assert got == {'room_id': room['id'], 'user_id': carol['id'],
                       'seq': 1}
    # After leave_room, bob's process stops getting the room's typing.
    await b.call('leave_room', {'room_id': room['id']})
    await c.call('typing', {'room_id': room['id'], 'typing': True})
    assert (await a.next('typing'))['user']['id'] == carol['id']
    await b.nothing('typing', 0.3)
    for client in (a, a_elsewhere, b, c):
        await client.close()


async def test_presence_between_processes(cluster):
    p1, p2, p3 = cluster
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    a = await connect(p1.url, ta)
    ack = await a.call('open_dm', {'username': bob['username']})
    assert ack['ok']
    b = await connect(p2.url, tb)
    got = await a.next('presence',
                       where=lambda p: p['user']['id'] == bob['id'])
    assert got['online'] is True
    ask = await a.call('presence', {'usernames': [bob['username']]})
    assert ask['presence'][bob['username']]['online'] is True
    # A second socket on another process, then the first one goes: still
    # online, no flap.
    b2 = await connect(p3.url, tb)
    await b.close()
    await a.nothing('presence', 1.5,
                    where=lambda p: p['user']['id'] == bob['id'])
    ask = await p_presence(p3, ta, bob)
    assert ask['online'] is True
    # The last socket goes: offline after the grace period, seen everywhere.
    await b2.close()
    got = await a.next('presence', 10,
                       where=lambda p: p['user']['id'] == bob['id'])
    assert got['online'] is False and got['last_seen']
    for server in cluster:
        status = await p_presence(server, ta, bob)
        assert status == {'online': False, 'last_seen': got['last_seen']}
    await a.close()


async def p_presence(server, token, user):
    client = await connect(server.url, token)
    ack = await client.call('presence', {'usernames': [user['username']]})
    await client.close()
    assert ack['ok'], ack
    return ack['presence'][user['username']]


async def test_crashed_process_users_go_offline(tmp_path, redis, cluster):
    p1 = cluster[0]
    [doomed] = start_servers(tmp_path, 1, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
        'POSTBOX_DATABASE_URL': p1.env.get(
            'POSTBOX_DATABASE_URL',
            'sqlite:///' + str(p1.data_dir / 'postbox.db'))})
    try:
        alice, ta = await register(p1.url)
        bob, tb = await register(p1.url)
        a = await connect(p1.url, ta)
        await a.call('open_dm', {'username': bob['username']})
        b = await connect(doomed.url, tb)
        got = await a.next('presence',
                           where=lambda p: p['user']['id'] == bob['id'])
        assert got['online'] is True
        doomed.stop(signal.SIGKILL)
        got = await a.next('presence', 15,
                           where=lambda p: p['user']['id'] == bob['id'])
        assert got['online'] is False
        assert (await p_presence(p1, ta, bob))['online'] is False
        await b.sio.disconnect()
        await a.close()
    finally:
        doomed.stop(signal.SIGKILL)


async def test_redis_outage_loses_nothing_and_recovers(tmp_path_factory):
    redis = RedisProcess(tmp_path_factory.mktemp('redis-outage')).start()
    try:
        p1, p2 = start_servers(tmp_path_factory.mktemp('outage'), 2, {
            'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
            'POSTBOX_SEND_RATE_PER_SECOND': '100000',
            'POSTBOX_SEND_BURST': '100000'})
    except Exception:
        redis.stop()
        raise
    try:
        alice, ta = await register(p1.url)
        bob, tb = await register(p2.url)
        a = await connect(p1.url, ta)
        a_local = await connect(p1.url, ta)
        b = await connect(p2.url, tb)
        first = await a.call('send_dm', {'to': bob['username'], 'body': 'm0',
                                         'client_msg_id': 'o0'})
        room_id = first['message']['room_id']
        assert (await b.next('message'))['body'] == 'm0'

        # Traffic runs while Redis stops.
        async def traffic(start, count):
            acks = []
            for i in range(start, start + count):
                acks.append(await a.call('send_dm', {
                    'room_id': room_id, 'body': f'm{i}',
                    'client_msg_id': f'o{i}'}))
            return acks

        sending = asyncio.create_task(traffic(1, 30))
        redis.stop()
        acks = await sending
        acks += await traffic(31, 10)  # surely while Redis is down
        assert [ack for ack in acks if not ack['ok']] == []
        for server in (p1, p2):
            body = await wait_ready(server, ready=False)
            assert body['checks'] == {**body['checks'], 'redis': False,
                                      'database': True}
        # Local delivery goes on: alice's other socket on p1 got them all.
        bodies = [(await a_local.next('message'))['body'] for _ in range(41)]
        assert bodies == [f'm{i}' for i in range(41)]

        # The outage is counted where operators look.
        status, text = await http(p1.url, 'GET', '/metrics')
        assert status == 200
        for name in ('publish_failures', 'listen_failures'):
            found = re.search(rf'^postbox_redis_{name}_total (\S+)$', text,
                              re.M)
            assert found and float(found.group(1)) > 0, name

        redis.start()
        for server in (p1, p2):
            await wait_ready(server)
        # Bob, following sync, has every acked message.
        synced = await b.call('sync', {'rooms': {str(room_id): 0}})
        assert synced['ok'] and not synced['has_more']
        seqs = [e['seq'] for e in synced['events']
                if e['room_id'] == room_id]
        assert seqs == list(range(1, 42))
        # Cross-process delivery is back without any restart.
        ack = await a.call('send_dm', {'room_id': room_id, 'body': 'back',
                                       'client_msg_id': 'o-back'})
        got = await b.next('message', where=lambda m: m['body'] == 'back')
        assert got['seq'] == ack['message']['seq'] == 42
        reply = await b.call('send_dm', {'room_id': room_id, 'body': 'yes',
                                         'client_msg_id': 'o-yes'})
        assert reply['ok']
        assert (await a.next('message',
                             where=lambda m: m['body'] == 'yes'))['seq'] == 43
        for client in (a, a_local, b):
            await client.close()
    finally:
        codes = stop_servers([p1, p2])
        redis.stop()
    assert codes == [0, 0]


def children_of(pid):
    """Pids of the live child processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != 'Z':
            found.append(int(entry))
    return found


async def test_workers_serve_one_port_and_stop_cleanly(tmp_path, redis):
    server = ServerProcess(tmp_path, env={
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
        'POSTBOX_REDIS_CHANNEL': 'pb-workers', 'POSTBOX_WORKERS': '2'})
    server.start()
    try:
        assert len(children_of(server.proc.pid)) == 2
        alice, ta = await register(server.url)
        a = await connect(server.url, ta)
        # Enough users that the kernel puts some on each worker.
        others = [await register(server.url) for _ in range(8)]
        clients = [await connect(server.url, token) for _, token in others]
        for (user, _), client in zip(others, clients):
            ack = await a.call('send_dm', {'to': user['username'],
                                           'body': 'hello',
                                           'client_msg_id': user['username']})
            assert ack['ok'], ack
            got = await client.next('message')
            assert got['sender']['id'] == alice['id']
            reply = await client.call('send_dm', {
                'room_id': got['room_id'], 'body': 'back',
                'client_msg_id': 'r'})
            assert reply['ok']
            back = await a.next('message', where=lambda m: m['body'] == 'back')
            assert back['room_id'] == got['room_id']
        assert len(children_of(server.proc.pid)) == 2
        for client in clients + [a]:
            await client.close()
    finally:
        pid = server.proc.pid
        code = server.stop()
    assert code == 0, server.read_log()
    assert children_of(pid) == []


def test_workers_without_redis_are_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'server', '--workers', '2'], cwd=ROOT,
        env={**os.environ, 'POSTBOX_DATA_DIR': str(tmp_path),
             'POSTBOX_REDIS_URL': ''},
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert 'needs Redis' in result.stderr


async def test_logout_everywhere_closes_sockets_on_every_process(cluster):
    p1, p2, p3 = cluster
    user, token = await register(p1.url)
    here = await connect(p1.url, token)
    there = await connect(p2.url, token)
    assert there.sio.connected
    disconnected = asyncio.Event()
    there.sio.on('disconnect', lambda *args: disconnected.set())
    status, data = await http(p3.url, 'POST', '/api/logout', token=token,
                              json={'all': True})
    assert status == 200, data
    await asyncio.wait_for(disconnected.wait(), 10)
    assert not there.sio.connected
    await here.sio.disconnect()
    status, _ = await http(p2.url, 'GET', '/api/me', token=token)
    assert status == 401


async def test_failed_logins_count_across_processes(cluster):
    """A guesser spreading tries over the processes gets the allowance of
    one (login_failures_per_username, 10 by default), not one each."""
    user, _ = await register(cluster[0].url)
    statuses = []
    for attempt in range(10):
        status, _ = await http(cluster[attempt % 3].url, 'POST', '/api/login',
                               json={'username': user['username'],
                                     'password': f'guess {attempt}'})
        statuses.append(status)
    assert statuses == [401] * 10
    for server in cluster:
        status, body = await http(server.url, 'POST', '/api/login', json={
            'username': user['username'], 'password': 'correct horse'})
        assert status == 429, body
        assert body['error']['code'] == 'rate_limited'
        assert body['error']['retry_after'] > 0
