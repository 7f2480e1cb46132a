"""Postbox on a real Redis Cluster (three primaries, a replica each): two
processes sharing one SQLite file talk through sharded pub/sub, share
presence and connection limits, and live through a primary's failover."""
import asyncio

import pytest

from tests.kit import (FAST_REDIS_ENV, NO_RATE_LIMITS, connect, dm_across,
                       http, refused, register, running_servers)
from tests.kit.redis_cluster import RedisCluster
from tests.test_durability import check_stored
from tests.test_redis import p_presence, wait_ready


@pytest.fixture(scope='module')
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp('rediscluster')).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope='module')
def servers(tmp_path_factory, redis_cluster):
    env = {'POSTBOX_REDIS_URL': redis_cluster.url, **FAST_REDIS_ENV,
           **NO_RATE_LIMITS, 'POSTBOX_MAX_CONNECTIONS_PER_USER': '3'}
    with running_servers(tmp_path_factory.mktemp('postbox'), 2,
                         env) as servers:
        yield servers


async def test_ready_on_the_cluster(servers, redis_cluster):
    for server in servers:
        body = await wait_ready(server)
        assert body['checks']['redis'] is True
    # Every shared key is on the shard of the hash tag.
    tagged = redis_cluster.primary_for('{postbox}')
    for slot in (0, 8000, 16383):
        node = redis_cluster.primary_for_slot(slot)
        keys = int(node.command('DBSIZE')[1:])
        assert keys > 0 if node is tagged else keys == 0, (slot, keys)


async def test_dm_between_processes_live_once(servers):
    p1, p2 = servers
    alice, bob, a, b, room = await dm_across(p1.url, p2.url)
    for i in range(20):
        sender, receiver = (b, a) if i % 2 else (a, b)
        ack = await sender.call('send_dm', {
            'room_id': room['id'], 'body': f'm{i}',
            'client_msg_id': f'n{i}'})
        assert ack['ok'], ack
        got = await receiver.next('message',
                                  where=lambda m, i=i: m['body'] == f'm{i}')
        assert got['seq'] == ack['message']['seq']
    # Each arrived once, not once per process or per shard.
    await a.nothing('message', 0.5, where=lambda m: m['body'] == 'm0')
    await b.nothing('message', 0.5, where=lambda m: m['body'] == 'm1')
    await a.close()
    await b.close()


async def test_presence_across_processes(servers):
    p1, p2 = servers
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    a = await connect(p1.url, ta)
    assert (await a.call('open_dm', {'username': bob['username']}))['ok']
    b = await connect(p2.url, tb)
    got = await a.next('presence', 10,
                       where=lambda p: p['user']['id'] == bob['id'])
    assert got['online'] is True
    assert (await p_presence(p1, ta, bob))['online'] is True
    await b.close()
    got = await a.next('presence', 10,
                       where=lambda p: p['user']['id'] == bob['id'])
    assert got['online'] is False and got['last_seen']
    for server in servers:
        status = await p_presence(server, ta, bob)
        assert status == {'online': False, 'last_seen': got['last_seen']}
    await a.close()


async def test_connection_limit_across_processes(servers):
    p1, p2 = servers
    _, token = await register(p1.url)
    held = [await connect(p1.url, token), await connect(p1.url, token),
            await connect(p2.url, token)]
    for server in servers:
        error = await refused(server.url, token)
        assert error['data']['code'] == 'rate_limited', error
    await held[0].close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:  # the release reaches the shared count
        try:
            held[0] = await connect(p2.url, token)
            break
        except Exception:
            assert loop.time() < deadline
            await asyncio.sleep(0.2)
    for client in held:
        await client.close()


async def test_failed_logins_count_across_processes(servers):
    """The login throttle's buckets (two keys per try: the name's and
    the address's) are shared: 10 wrong guesses spread over both
    processes use up the name's allowance on both."""
    user, _ = await register(servers[0].url)
    for attempt in range(10):
        status, _ = await http(servers[attempt % 2].url, 'POST',
                               '/api/login',
                               json={'username': user['username'],
                                     'password': f'guess {attempt}'})
        assert status == 401
    for server in servers:
        status, body = await http(server.url, 'POST', '/api/login', json={
            'username': user['username'], 'password': 'correct horse'})
        assert status == 429, body
        assert body['error']['code'] == 'rate_limited'


async def test_failover_of_the_shared_shard_under_load(servers,
                                                      redis_cluster):
    """SIGKILL the primary that holds every shared key while two users on
    different processes send to each other: /readyz says 503 until its
    replica took over, then 200; nothing acked is lost and live delivery
    between the processes resumes."""
    p1, p2 = servers
    for server in servers:
        await wait_ready(server)
    alice, ta = await register(p1.url)
    bob, tb = await register(p2.url)
    a = await connect(p1.url, ta)
    b = await connect(p2.url, tb)
    room = (await a.call('open_dm', {'username': bob['username']}))['room']
    acked, stop = {}, asyncio.Event()

    async def sender(client, tag):
        i = 0
        while not stop.is_set():
            i += 1
            ack = await client.call('send_dm', {
                'room_id': room['id'], 'body': f'{tag}{i}',
                'client_msg_id': f'{tag}{i}'}, timeout=10)
            if ack['ok']:
                acked[f'{tag}{i}'] = ack['message']['id']
            await asyncio.sleep(0.02)

    senders = [asyncio.create_task(sender(a, 'a')),
               asyncio.create_task(sender(b, 'b'))]
    await b.next('message', where=lambda m: m['body'].startswith('a'))
    # Its replica has a copy to take over with.
    await asyncio.to_thread(redis_cluster.wait_ok)
    doomed = redis_cluster.primary_for('{postbox}')
    await asyncio.to_thread(doomed.kill)
    for server in servers:
        body = await wait_ready(server, ready=False, timeout=20)
        assert body['checks']['redis'] is not True, body
    for server in servers:
        await wait_ready(server, timeout=60)
    assert redis_cluster.primary_for('{postbox}') not in (None, doomed)
    # Live delivery resumes both ways.
    for sender_client, receiver, body in ((a, b, 'after-a'),
                                          (b, a, 'after-b')):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        n = 0
        while True:
            n += 1
            ack = await sender_client.call('send_dm', {
                'room_id': room['id'], 'body': f'{body}{n}',
                'client_msg_id': f'{body}{n}'})
            assert ack['ok'], ack
            try:
                await receiver.next('message', 1,
                                    where=lambda m: m['body'] == f'{body}{n}')
                break
            except (TimeoutError, asyncio.TimeoutError):
                assert loop.time() < deadline, 'live delivery did not resume'
    stop.set()
    await asyncio.gather(*senders)
    assert len(acked) > 20
    # Nothing acked was lost: sync returns every one, once.
    assert await check_stored(p1.url, ta, room['id'], acked) > len(acked)
    await a.close()
    await b.close()
    # The killed node comes back as a replica; the cluster is whole again.
    await asyncio.to_thread(doomed.start)
    await asyncio.to_thread(redis_cluster.wait_ok)


async def test_graceful_failover_of_a_process_channel_shard(servers,
                                                           redis_cluster):
    """CLUSTER FAILOVER of the shard holding a process's own channel (not
    the shared keys): Redis takes the channel from that process's
    subscription (sunsubscribe); it subscribes on the new primary and
    messages to its users arrive live again."""
    p1, p2 = servers
    for server in servers:
        await wait_ready(server)
    shared = redis_cluster.primary_for('{postbox}')
    holding = [n for n in redis_cluster.nodes if n.proc is not None
               and n is not shared
               and 'postbox:host:' in n.command('PUBSUB', 'SHARDCHANNELS',
                                                'postbox:host:*')]
    if not holding:  # both channels are on the shared keys' shard
        holding = [shared]
    primary = holding[0]
    replica = redis_cluster.replica_of(primary)
    alice, ta = await register(p1.url)
    bob, tb = await register(p2.url)
    a = await connect(p1.url, ta)
    b = await connect(p2.url, tb)
    room = (await a.call('open_dm', {'username': bob['username']}))['room']
    acked = {}
    await asyncio.to_thread(redis_cluster.failover, replica)
    for sender_client, receiver, body in ((a, b, 'to-b'), (b, a, 'to-a')):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        n = 0
        while True:
            n += 1
            ack = await sender_client.call('send_dm', {
                'room_id': room['id'], 'body': f'{body}{n}',
                'client_msg_id': f'{body}{n}'})
            assert ack['ok'], ack
            acked[f'{body}{n}'] = ack['message']['id']
            try:
                await receiver.next('message', 1,
                                    where=lambda m: m['body'] == f'{body}{n}')
                break
            except (TimeoutError, asyncio.TimeoutError):
                assert loop.time() < deadline, 'live delivery did not resume'
    # The channel now lives on the former replica.
    channels = replica.command('PUBSUB', 'SHARDCHANNELS', 'postbox:host:*')
    assert 'postbox:host:' in channels, channels
    for server in servers:
        await wait_ready(server)
    await check_stored(p1.url, ta, room['id'], acked)
    await a.close()
    await b.close()
