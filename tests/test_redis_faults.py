"""Redis faults under load, against a real redis-server and two Postbox
processes sharing one SQLite file: Redis killed and restarted, a listener
that silently stops hearing, a Redis that hangs. Clients follow the
contract (acked sends retried with the same ``client_msg_id``, ``sync``
to catch up), so nothing acked may be lost, doubled or out of order, and
each process must heal by itself, with ``/readyz`` telling the truth."""
import asyncio
import functools
import logging
import re
import time

import pytest
import socketio

from tests.kit import (DeafeningProxy, FAST_REDIS_ENV, NO_RATE_LIMITS,
                       RedisProcess, connect, http, refused, register, rss_kib,
                       start_servers, stop_servers)

log = logging.getLogger(__name__)

FAULT_ENV = {**FAST_REDIS_ENV, **NO_RATE_LIMITS,
             'POSTBOX_REDIS_PROBE_SECONDS': '0.5',
             'POSTBOX_REDIS_PROBE_TIMEOUT_SECONDS': '2'}
PAIRS = 5  # 10 clients: one of each pair on each process
IN_FLIGHT = 4  # sends each client keeps waiting for their ack
# How soon after Redis returns each process must be ready again.
READY_AFTER_RETURN_SECONDS = 5
# How long each outage lasts (at least; 100 sends are acked in it too).
OUTAGE_SECONDS = 2


async def readiness(server):
    status, body = await http(server.url, 'GET', '/readyz')
    return status, body


async def wait_ready(server, ready=True, timeout=20):
    """Poll /readyz until it says ``ready``; returns its body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, body = await readiness(server)
        if (status == 200) == ready:
            return body
        assert loop.time() < deadline, (server.url, status, body)
        await asyncio.sleep(0.05)


async def metric(server, name) -> float:
    status, text = await http(server.url, 'GET', '/metrics')
    assert status == 200
    found = re.search(rf'^{name} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


class Readiness:
    """Polls /readyz of every server in the background and keeps what it
    saw: (monotonic time, server index, status, body)."""

    def __init__(self, servers):
        self.servers = servers
        self.seen = []
        self._task = None

    async def _poll(self):
        while True:
            for i, server in enumerate(self.servers):
                try:
                    status, body = await readiness(server)
                except Exception as exc:  # a timeout is a not-ready answer
                    status, body = None, repr(exc)
                self.seen.append((time.monotonic(), i, status, body))
            await asyncio.sleep(0.05)

    def __enter__(self):
        self._task = asyncio.get_running_loop().create_task(self._poll())
        return self

    def __exit__(self, *exc):
        self._task.cancel()

    def between(self, start, end, i):
        return [(t, s, b) for t, j, s, b in self.seen
                if j == i and start <= t <= end]


class Pair:
    """Two users in one dm, one on each process, both sending acked
    messages to each other as fast as their acks come back."""

    def __init__(self, n, clients, room_id):
        self.n = n
        self.clients = clients  # (on p1, on p2)
        self.room_id = room_id
        self.acked = {}  # client_msg_id -> (seq, acked at)
        self.live = [set(), set()]  # client_msg_ids each side got live
        self.live_at = [{}, {}]  # client_msg_id -> monotonic time received
        for side, client in enumerate(clients):
            client.sio.on('message', self._receiver(side))

    def _receiver(self, side):
        async def on_message(m):
            if m['room_id'] == self.room_id:
                self.live[side].add(m['client_msg_id'])
                self.live_at[side][m['client_msg_id']] = time.monotonic()
        return on_message

    async def send(self, side, worker, stop):
        client, k = self.clients[side], 0
        while not stop.is_set():
            k += 1
            cmid = f'p{self.n}-s{side}-w{worker}-{k}'
            payload = {'room_id': self.room_id, 'body': cmid,
                       'client_msg_id': cmid}
            while True:  # retry with the same id until acked
                try:
                    ack = await client.call('send_dm', payload, timeout=10)
                except socketio.exceptions.TimeoutError:
                    continue
                if ack['ok']:
                    break
                assert ack['error']['code'] in ('unavailable',
                                                'rate_limited'), ack
                await asyncio.sleep(0.05)
            self.acked[cmid] = (ack['message']['seq'], time.monotonic())

    async def check_stored(self):
        """Read the room back with ``sync``: every acked message once, seqs
        1..N without a gap."""
        events, since = [], 0
        while True:
            ack = await self.clients[0].call(
                'sync', {'rooms': {str(self.room_id): since}})
            assert ack['ok'], ack
            mine = [e for e in ack['events'] if e['room_id'] == self.room_id]
            events += mine
            if not ack['has_more']:
                break
            since = max(e['seq'] for e in mine)
        seqs = [e['seq'] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), 'gap or reorder'
        stored = [e['message']['client_msg_id'] for e in events]
        assert len(stored) == len(set(stored)), 'duplicated message'
        assert set(self.acked) - set(stored) == set(), 'acked message lost'
        for cmid, (seq, _) in self.acked.items():
            assert events[seq - 1]['message']['client_msg_id'] == cmid

    def missed_live(self):
        """Acked messages the other side did not get live."""
        return sum(1 for cmid in self.acked
                   if cmid not in self.live[1 - int(cmid.split('-s')[1][0])])


async def make_pairs(p1, p2):
    pairs = []
    for n in range(PAIRS):
        (_, ta), (ub, tb) = await register(p1.url), await register(p1.url)
        a = await connect(p1.url, ta)
        b = await connect(p2.url, tb)
        ack = await a.call('open_dm', {'username': ub['username']})
        assert ack['ok'], ack
        pairs.append(Pair(n, (a, b), ack['room']['id']))
    return pairs


async def live_again(pairs, since, timeout=15):
    """Wait until, in every pair and both directions, a message acked
    after ``since`` arrived live on the other process."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        missing = [(p.n, side) for p in pairs for side in (0, 1)
                   if not any(at > since and
                              int(cmid.split('-s')[1][0]) != side and
                              cmid in p.live[side]
                              for cmid, (_, at) in p.acked.items())]
        if not missing:
            return
        assert loop.time() < deadline, f'no live delivery for {missing}'
        await asyncio.sleep(0.05)


async def acked_after(pairs, since, count=20, timeout=20):
    """Wait until ``count`` more messages have been acked after ``since``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(1 for p in pairs for _, at in p.acked.values()
              if at > since) < count:
        assert loop.time() < deadline, 'sends stopped being acked'
        await asyncio.sleep(0.05)


@pytest.fixture
def redis_proc(tmp_path):
    proc = RedisProcess(tmp_path / 'redis').start()
    yield proc
    proc.stop()


async def test_redis_killed_under_load_heals_without_restart(tmp_path,
                                                            redis_proc):
    """SIGKILL Redis twice while 10 clients send acked dms across the two
    processes: nothing acked is lost or doubled, both processes say 503
    while Redis is away and 200 within seconds of its return, live
    delivery between them resumes by itself, the pool never runs dry
    ("No connection available") and memory stays bounded."""
    redis = redis_proc
    p1, p2 = servers = start_servers(tmp_path / 'pb', 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAULT_ENV})
    stop = asyncio.Event()
    try:
        for server in servers:
            await wait_ready(server)
        pairs = await make_pairs(p1, p2)
        senders = [asyncio.create_task(p.send(side, worker, stop))
                   for p in pairs for side in (0, 1)
                   for worker in range(IN_FLIGHT)]
        await acked_after(pairs, 0, 200)
        rss_before = [rss_kib(s.pid) for s in servers]
        with Readiness(servers) as seen:
            for drill in range(2):
                await acked_after(pairs, time.monotonic(), 200)
                killed = time.monotonic()
                redis.kill()
                for server in servers:
                    body = await wait_ready(server, ready=False)
                    assert body['checks']['redis'] is False
                    assert body['checks']['database'] is True
                down = time.monotonic()
                # Sends go on being stored and acked while Redis is away.
                await acked_after(pairs, down, 100)
                await asyncio.sleep(max(0, down + OUTAGE_SECONDS -
                                        time.monotonic()))
                redis.restart()  # same port, empty
                back = time.monotonic()
                # Each process ready again, without a restart, within
                # seconds of Redis's return.
                await asyncio.gather(*(
                    wait_ready(server, timeout=READY_AFTER_RETURN_SECONDS)
                    for server in servers))
                ready = time.monotonic()
                await live_again(pairs, ready)
                resumed = time.monotonic()
                for i in range(2):
                    # Honest while Redis was away: never 200.
                    assert [s for _, s, _ in seen.between(down, back, i)
                            if s == 200] == []
                log.warning('drill %s: 503 %.2fs after kill, ready %.2fs '
                            'after restart, live again %.2fs after restart',
                            drill, down - killed, ready - back,
                            resumed - back)
            await acked_after(pairs, time.monotonic(), 200)
            # Once ready, both stayed ready.
            for i in range(2):
                assert [s for _, s, _ in seen.between(
                    ready + 1, time.monotonic(), i) if s != 200] == []
        stop.set()
        await asyncio.gather(*senders)
        rss_after = [rss_kib(s.pid) for s in servers]
        for pair in pairs:
            await pair.check_stored()
        total = sum(len(p.acked) for p in pairs)
        missed = sum(p.missed_live() for p in pairs)
        deaf = [await metric(s, 'postbox_redis_deaf_total') for s in servers]
        log.warning('%s messages acked, %s missed live (all in sync); '
                    'RSS %s -> %s KB; deaf %s', total, missed, rss_before,
                    rss_after, deaf)
        for before, after in zip(rss_before, rss_after):
            assert after - before < 60_000, (rss_before, rss_after)
        for server in servers:
            text = server.read_log()
            assert 'No connection available' not in text
            # Trouble is reported, not flooded at the message rate (the
            # readiness polls above log one line each).
            lines = [line for line in text.splitlines()
                     if 'readiness check' not in line]
            assert len(lines) < 200, '\n'.join(lines[-50:])
        for pair in pairs:
            for client in pair.clients:
                await client.close()
    finally:
        stop.set()
        codes = stop_servers(servers)
    assert codes == [0, 0], [s.read_log()[-3000:] for s in servers]


async def live_message(sender, receiver, room_id, tag, timeout=20):
    """Send from ``sender`` until one message arrives live at
    ``receiver`` (each send acked); returns how many were sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    n = 0
    while True:
        n += 1
        body = f'{tag}-{n}'
        ack = await sender.call('send_dm', {'room_id': room_id, 'body': body,
                                            'client_msg_id': body})
        assert ack['ok'], ack
        try:
            await receiver.next('message', timeout=0.5,
                                where=lambda m: m['body'] == body)
            return n
        except asyncio.TimeoutError:
            assert loop.time() < deadline, f'{tag}: nothing arrives live'


async def test_deaf_listener_is_noticed_and_recreated(tmp_path, redis_proc):
    """A process whose subscription stays connected but stops hearing
    (here: a proxy drops what Redis sends it; Redis, the connection and
    every command work) notices it by its own probe, counts it, subscribes
    afresh, and live delivery to it resumes; while it cannot hear, its
    /readyz says 503 with the reason."""
    proxy = await DeafeningProxy(('127.0.0.1', redis_proc.port)).start()
    # Started and stopped off the event loop, which runs the proxy.
    blocking = functools.partial(asyncio.get_running_loop().run_in_executor,
                                 None)
    p1, = await blocking(start_servers, tmp_path / 'p1', 1, {
        'POSTBOX_REDIS_URL': proxy.url, **FAULT_ENV})
    p2, = await blocking(start_servers, tmp_path / 'p2', 1, {
        'POSTBOX_REDIS_URL': redis_proc.url, **FAULT_ENV,
        'POSTBOX_DATABASE_URL': f'sqlite:///{tmp_path / "p1" / "postbox.db"}'})
    servers = [p1, p2]
    try:
        for server in servers:
            await wait_ready(server)
        (_, ta), (ub, tb) = await register(p1.url), await register(p1.url)
        a = await connect(p1.url, ta)
        b = await connect(p2.url, tb)
        room_id = (await a.call('open_dm', {'username': ub['username']})
                   )['room']['id']
        assert await live_message(b, a, room_id, 'before') == 1
        deaf_before = await metric(p1, 'postbox_redis_deaf_total')

        # Deaf once: noticed, re-created, delivery resumes by itself.
        assert proxy.deafen() == 1
        sent = await live_message(b, a, room_id, 'once')
        assert sent > 1, 'the listener was not deaf'
        assert await metric(p1, 'postbox_redis_deaf_total') > deaf_before
        await wait_ready(p1, timeout=READY_AFTER_RETURN_SECONDS)
        assert await live_message(a, b, room_id, 'other way') == 1

        # Deaf for a while (every new subscription too): /readyz says so,
        # with the reason, until a probe comes back.
        proxy.deafen(new_ones_too=True)
        body = await wait_ready(p1, ready=False)
        assert 'deaf' in body['errors']['redis'], body
        deaf_during = await metric(p1, 'postbox_redis_deaf_total')
        # Still not ready after the next re-created subscription.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while await metric(p1, 'postbox_redis_deaf_total') <= deaf_during:
            assert loop.time() < deadline, 'deafness not noticed again'
            await asyncio.sleep(0.1)
        status, body = await readiness(p1)
        assert status == 503 and body['errors']['redis'], body
        proxy.hear()
        await wait_ready(p1, timeout=20)
        assert await live_message(b, a, room_id, 'after') >= 1
        # p2 heard all along.
        assert await metric(p2, 'postbox_redis_deaf_total') == 0
        for client in (a, b):
            await client.close()
        # Everything acked is stored once, in order.
        a = await connect(p1.url, ta)
        synced = await a.call('sync', {'rooms': {str(room_id): 0}})
        bodies = [e['message']['body'] for e in synced['events']]
        assert len(bodies) == len(set(bodies)) and not synced['has_more']
        assert [e['seq'] for e in synced['events']] == \
            list(range(1, len(bodies) + 1))
        await a.close()
    finally:
        codes = await blocking(stop_servers, servers)
        await proxy.close()
    assert codes == [0, 0], [s.read_log()[-3000:] for s in servers]


async def test_hung_redis_does_not_hold_up_clients(tmp_path, redis_proc):
    """Redis stops answering without closing anything (SIGSTOP): /readyz
    says 503 with the reason, new connections and sends on each process
    still work at once (local delivery, stored, acked) instead of each
    waiting for Redis timeouts in turn, and once Redis answers again the
    sockets that connected meanwhile get messages from the other process
    live."""
    p1, p2 = servers = start_servers(tmp_path / 'pb', 2, {
        'POSTBOX_REDIS_URL': redis_proc.url, **FAULT_ENV})
    paused = False
    try:
        for server in servers:
            await wait_ready(server)
        # Users registered before: registration throttles use Redis too.
        users = [await register(p1.url) for _ in range(8)]
        far, far_token = await register(p1.url)
        there = await connect(p2.url, far_token)
        redis_proc.pause()
        paused = True
        for server in servers:
            body = await wait_ready(server, ready=False)
            assert body['errors']['redis'], body
        # Eight clients connect at once and talk in pairs on p1. Each
        # connect used to wait for Redis timeouts (2 s here) one after
        # another under the room registration lock.
        clients = await asyncio.wait_for(asyncio.gather(*(
            connect(p1.url, token) for _, token in users)), 8)
        acks = await asyncio.wait_for(asyncio.gather(*(
            clients[i].call('send_dm', {'to': users[i + 1][0]['username'],
                                        'body': f'hung {i}',
                                        'client_msg_id': f'hung-{i}'})
            for i in range(0, 8, 2))), 8)
        assert all(ack['ok'] for ack in acks), acks
        for i in range(1, 8, 2):
            got = await clients[i].next('message', timeout=8)
            assert got['body'] == f'hung {i - 1}'
        # Once Redis is known to hang, a connect waits for it no more: one
        # after another, each well within the Redis timeout (2 s here;
        # each used to wait it out giving back its session's place).
        for k, server in enumerate(servers * 2):
            clients.append(await asyncio.wait_for(
                connect(server.url, users[k][1]), 1.5))
        # Honest all along.
        for server in servers:
            status, body = await readiness(server)
            assert status == 503, body
        redis_proc.resume()
        paused = False
        await asyncio.gather(*(
            wait_ready(server, timeout=READY_AFTER_RETURN_SECONDS)
            for server in servers))
        # The sockets that connected while Redis hung are known to the
        # other process again: its messages reach them live.
        room = (await there.call('open_dm', {
            'username': users[0][0]['username']}))['room']
        assert await live_message(there, clients[0], room['id'], 'back') >= 1
        for client in clients + [there]:
            await client.close()
    finally:
        if paused:
            redis_proc.resume()
        codes = stop_servers(servers)
    assert codes == [0, 0], [s.read_log()[-3000:] for s in servers]


async def test_connection_limit_holds_again_after_redis_restart(
        tmp_path, redis_proc):
    """Connections per user count across processes in Redis. Redis comes
    back empty after a crash: each process puts its counts back, so the
    limit holds across processes again (it used to forget every socket
    connected before the crash)."""
    p1, p2 = servers = start_servers(tmp_path / 'pb', 2, {
        'POSTBOX_REDIS_URL': redis_proc.url, **FAULT_ENV,
        'POSTBOX_MAX_CONNECTIONS_PER_USER': '3'})
    try:
        for server in servers:
            await wait_ready(server)
        _, token = await register(p1.url)
        here = [await connect(p1.url, token) for _ in range(2)]
        redis_proc.kill()
        for server in servers:
            await wait_ready(server, ready=False)
        redis_proc.restart()
        await asyncio.gather(*(
            wait_ready(server, timeout=READY_AFTER_RETURN_SECONDS)
            for server in servers))
        there = await connect(p2.url, token)  # the third: allowed
        error = await refused(p2.url, token)  # the fourth, anywhere
        assert error['data']['code'] == 'rate_limited', error
        error = await refused(p1.url, token)
        assert error['data']['code'] == 'rate_limited', error
        # A socket that goes frees its place everywhere.
        await here[0].close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                again = await connect(p2.url, token)
                break
            except socketio.exceptions.ConnectionError:
                assert loop.time() < deadline, 'the place was not freed'
                await asyncio.sleep(0.1)
        for client in [*here[1:], there, again]:
            await client.close()
    finally:
        codes = stop_servers(servers)
    assert codes == [0, 0], [s.read_log()[-3000:] for s in servers]


async def test_what_redis_missed_is_caught_up_when_it_returns(tmp_path,
                                                              redis_proc):
    """A logout everywhere and a group removal made while Redis is down
    cannot reach the other processes then. Once it is back, each process
    checks its sockets against the database: the revoked socket is
    closed, and the removed member's joined socket gets room_left and no
    more of the group's typing."""
    p1, p2 = servers = start_servers(tmp_path / 'pb', 2, {
        'POSTBOX_REDIS_URL': redis_proc.url, **FAULT_ENV})
    try:
        for server in servers:
            await wait_ready(server)
        owner, owner_token = await register(p1.url)
        gone, gone_token = await register(p1.url)
        out, out_token = await register(p1.url)
        a = await connect(p1.url, owner_token)
        revoked = await connect(p2.url, gone_token)
        b = await connect(p2.url, out_token)
        closed = asyncio.Event()
        revoked.sio.on('disconnect', lambda *args: closed.set())
        ack = await a.call('create_group', {
            'name': 'g', 'members': [out['username']]})
        assert ack['ok'], ack
        room_id = ack['room']['id']
        await b.next('room')
        assert (await b.call('join_room', {'room_id': room_id}))['ok']
        assert (await a.call('join_room', {'room_id': room_id}))['ok']

        redis_proc.kill()
        for server in servers:
            await wait_ready(server, ready=False)
        status, data = await http(p1.url, 'POST', '/api/logout',
                                  token=gone_token, json={'all': True})
        assert status == 200, data
        ack = await a.call('remove_member', {'room_id': room_id,
                                             'username': out['username']})
        assert ack['ok'], ack
        assert revoked.sio.connected  # nothing could tell p2 yet

        redis_proc.restart()
        await asyncio.gather(*(
            wait_ready(server, timeout=READY_AFTER_RETURN_SECONDS)
            for server in servers))
        await asyncio.wait_for(closed.wait(), 10)
        assert (await b.next('room_left', timeout=10))['room_id'] == room_id
        assert (await a.call('typing', {'room_id': room_id,
                                        'typing': True}))['ok']
        await b.nothing('typing', timeout=1)
        for client in (a, b):
            await client.close()
    finally:
        codes = stop_servers(servers)
    assert codes == [0, 0], [s.read_log()[-3000:] for s in servers]
