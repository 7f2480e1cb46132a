"""Fast tests of the cluster's parts without a Postbox process: the Lua
scripts against a real redis-server, and the connection counting and
throttle interfaces in both their local and Redis forms."""
import asyncio
import uuid
from types import SimpleNamespace

import pytest

from server.cluster import Cluster
from server.cluster.fanout import Fanout
from server.cluster.scripts import HOLDER_SCRIPT, PRESENCE_ADD_SCRIPT, \
    PRESENCE_REAP_SCRIPT, PRESENCE_REMOVE_SCRIPT, PRESENCE_STATUS_SCRIPT, \
    PUBLISH_SCRIPT, script_arguments
from server.errors import RateLimited
from server.services.limits import LocalConnections, TooManyConnections, \
    login_throttle
from server.services.limits_redis import RedisConnections, RedisThrottle
from server.services.live import LocalPresence
from server.services.outbox import Dispatcher
from server.services.presence_redis import RedisPresence
from server.services.ratelimit import Limiter
from tests.redisproc import RedisProcess


@pytest.fixture(scope='module')
def redis_url(tmp_path_factory):
    proc = RedisProcess(tmp_path_factory.mktemp('redis'))
    proc.start()
    yield proc.url
    proc.stop()


class Hosts:
    """Processes of one cluster (a fresh channel per test): ``add()``
    gives a live one; ``kill(c)`` lets its liveness key go."""

    def __init__(self, url):
        self.url = url
        self.channel = f'u{uuid.uuid4().hex[:8]}'
        self.all = []

    async def add(self) -> Cluster:
        cluster = Cluster(self.url, self.channel)
        await cluster.redis.set(cluster.alive_key, 1)
        self.all.append(cluster)
        return cluster

    async def kill(self, cluster):
        await cluster.redis.delete(cluster.alive_key)

    async def close(self):
        for cluster in self.all:
            await cluster.redis.aclose()
            await cluster.sub_redis.aclose()


@pytest.fixture
async def hosts(redis_url):
    kit = Hosts(redis_url)
    yield kit
    await kit.close()


def text(values):
    return sorted(v.decode() if isinstance(v, bytes) else v for v in values)


async def test_holder_script_finds_live_holders_and_drops_dead_ones(hosts):
    a, b, c = await hosts.add(), await hosts.add(), await hosts.add()
    key = a.key('room:/:room:1')
    await a.redis.sadd(key, b.host_id, c.host_id)
    await hosts.kill(c)
    script = a.script(HOLDER_SCRIPT)
    head = [a.host_id, a.host_channel_prefix, a.alive_prefix]
    others = await script(keys=[key], args=[*head, '1', ''])
    assert text(others) == [b.host_id]
    assert text(await a.redis.smembers(key)) == sorted([a.host_id,
                                                        b.host_id])
    # leaving takes a out, and still reports b
    others = await script(keys=[key], args=[*head, '', ''])
    assert text(others) == [b.host_id]
    assert text(await a.redis.smembers(key)) == [b.host_id]


async def test_publish_script_routes_each_message_once_per_live_host(hosts):
    a, b, c, dead = [await hosts.add() for _ in range(4)]
    await hosts.kill(dead)
    room1, room2 = a.key('room:/:r1'), a.key('room:/:r2')
    await a.redis.sadd(room1, a.host_id, b.host_id, dead.host_id)
    await a.redis.sadd(room2, b.host_id, c.host_id)
    keys, (index, blob) = script_arguments([
        ([room1], '{"n":1}'), ([room1, room2], '{"n":2}'),
        ([room2], '{"n":3}')])
    script = a.script(PUBLISH_SCRIPT)
    head = [a.host_id, a.host_channel_prefix, a.alive_prefix]
    raw = await script(keys=keys, args=[*head, index, '', '1'])
    by_host = {raw[i].decode(): raw[i + 1].decode()
               for i in range(0, len(raw), 2)}
    # b holds both rooms: messages 1, 2 and 3, message 2 once; c only
    # room 2; a (the sender) and the dead host nothing
    assert by_host == {b.host_id: '1,2,3', c.host_id: '2,3'}
    assert text(await a.redis.smembers(room1)) == sorted([a.host_id,
                                                          b.host_id])
    # publishing: one JSON list per live host, on its host channel
    pubsub = c.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(c.host_channel)
    assert await script(keys=keys, args=[*head, index, blob, '']) == 2
    message = None
    async with asyncio.timeout(10):
        while message is None:
            message = await pubsub.get_message(timeout=1)
    assert message['data'] == b'[{"n":2},{"n":3}]'
    await pubsub.aclose()


async def test_presence_scripts_count_live_processes_only(hosts):
    a, b = await hosts.add(), await hosts.add()
    online, seen = a.key('online:7'), a.key('seen:7')
    users = a.key('users:')
    add, remove = a.script(PRESENCE_ADD_SCRIPT), a.script(
        PRESENCE_REMOVE_SCRIPT)
    status = a.script(PRESENCE_STATUS_SCRIPT)
    reap = a.script(PRESENCE_REAP_SCRIPT)
    hosts_key = a.key('hosts')
    for me in (a, b):
        await add(keys=[online, users + me.host_id, hosts_key],
                  args=[me.host_id, a.alive_prefix, 7])
    # a lets go: b still holds the user, so no last seen is written
    assert await remove(keys=[online, users + a.host_id, seen],
                        args=[a.host_id, a.alive_prefix, 7, 1000, 60]) == 1
    assert await a.redis.get(seen) is None
    assert await status(keys=[online, a.key('online:8')],
                        args=[a.alive_prefix]) == [1, 0]
    # b dies: the user is offline, and the reaper (on a) reports them
    await hosts.kill(b)
    assert await status(keys=[online], args=[a.alive_prefix]) == [0]
    gone = await reap(keys=[hosts_key], args=[
        a.alive_prefix, users, a.key('online:'), a.key('seen:'), 2000, 60,
        a.host_id])
    assert text(gone) == ['7']
    assert await a.redis.get(seen) == b'2000'
    assert text(await a.redis.smembers(hosts_key)) == [a.host_id]


@pytest.fixture(params=['local', 'redis'])
async def presence_forms(request, hosts):
    """Three processes' presence (local or Redis) and the changes they
    announce, as (process number, user id, online)."""
    changes = []

    def announce(n):
        async def on_change(user_id, online, last_seen):
            changes.append((n, user_id, online))
        return on_change
    forms = []
    for n in range(3):
        if request.param == 'local':
            forms.append(LocalPresence(None, 60, announce(n)))
        else:
            forms.append(RedisPresence(None, 60, announce(n),
                                       await hosts.add()))
    yield request.param, forms, changes
    for presence in forms:
        await presence.close()


async def test_a_user_comes_online_once(presence_forms):
    form, (one, two, three), changes = presence_forms
    await one.connected(7)
    await one.connected(7)  # a second socket: nothing new
    await two.connected(7)
    if form == 'redis':
        # the first process announced it; the others see it online
        assert changes == [(0, 7, True)]
        assert (await three.status([7]))[7][0] is True
    else:
        # every process is on its own
        assert changes == [(0, 7, True), (1, 7, True)]
    assert (await one.status([7]))[7][0] is True
    assert one.held() == {7}


@pytest.fixture(params=['local', 'redis'])
async def connection_forms(request, hosts):
    """Two processes' connection counts, 2 sockets per user and 3 per
    address: local ones (independent) or Redis ones (shared)."""
    if request.param == 'local':
        return request.param, [LocalConnections(2, 3), LocalConnections(2, 3)]
    return request.param, [RedisConnections(2, 3, await hosts.add()),
                           RedisConnections(2, 3, await hosts.add())]


async def test_connection_limits_per_user_and_address(connection_forms):
    form, (one, two) = connection_forms
    await one.acquire(1, '10.0.0.1')
    await one.acquire(1, '10.0.0.2')
    with pytest.raises(TooManyConnections, match='for this user'):
        await one.acquire(1, '10.0.0.3')
    await one.acquire_address('10.0.0.1')
    await one.acquire(2, '10.0.0.1')
    with pytest.raises(TooManyConnections, match='from this address'):
        await one.acquire(3, '10.0.0.1')
    with pytest.raises(TooManyConnections, match='from this address'):
        await one.acquire_address('10.0.0.1')
    # the refusals counted nothing: one release makes room for one more
    await one.release_address('10.0.0.1')
    await one.acquire(3, '10.0.0.1')
    # another process: the same limits when shared, its own when local
    if form == 'redis':
        with pytest.raises(TooManyConnections, match='for this user'):
            await two.acquire(1, '10.0.0.9')
        await one.release(1, '10.0.0.2')
        await two.acquire(1, '10.0.0.9')
    else:
        await two.acquire(1, '10.0.0.9')
        await two.acquire(1, '10.0.0.9')


async def test_a_dead_process_counts_no_connections(hosts):
    one = RedisConnections(1, 10, await hosts.add())
    two = RedisConnections(1, 10, await hosts.add())
    await one.acquire(1, '10.0.0.1')
    with pytest.raises(TooManyConnections):
        await two.acquire(1, '10.0.0.2')
    await hosts.kill(one.cluster)
    await two.acquire(1, '10.0.0.2')


@pytest.fixture(params=['local', 'redis'])
async def throttle_forms(request, hosts):
    """Two processes' login throttles (2 failures per username, 4 per
    address, refilling at one per minute): local or shared in Redis."""
    def local():
        return login_throttle(2, 4, 1)
    if request.param == 'local':
        return request.param, [local(), local()]
    return request.param, [RedisThrottle(local(), await hosts.add()),
                           RedisThrottle(local(), await hosts.add())]


async def test_throttle_takes_and_gives_back(throttle_forms):
    form, (one, two) = throttle_forms
    await one.take('ann', '10.0.0.1')
    await one.take('ann', '10.0.0.1')
    with pytest.raises(RateLimited) as refused:
        await one.take('ann', '10.0.0.2')
    assert 0 < refused.value.retry_after <= 60
    await one.give_back('ann', '10.0.0.1')
    await one.take('ann', '10.0.0.3')
    await one.take('bob', '10.0.0.1')
    await one.take('cid', '10.0.0.1')
    await one.take('dan', '10.0.0.1')
    with pytest.raises(RateLimited):  # the address's four are spent
        await one.take('eve', '10.0.0.1')
    await one.take('eve', None)  # no address: the username alone counts
    if form == 'redis':
        with pytest.raises(RateLimited):
            await two.take('ann', '10.0.0.9')
    else:
        await two.take('ann', '10.0.0.9')


def test_limiter_allows_a_burst_then_refuses():
    limiter = Limiter(rate=1, burst=3)
    for _ in range(3):
        limiter.take('u')
    with pytest.raises(RateLimited) as refused:
        limiter.take('u')
    assert 0 < refused.value.retry_after <= 1
    limiter.take('other')


def _loop_of(name, cluster, call):
    """Start the background loop ``name`` of ``cluster``'s parts with
    ``call`` standing in for the Redis call (or claim) it makes; returns
    ``stop`` (the coroutine function that ends it as the server does)."""
    if name == 'heartbeat':
        cluster.redis.set = call
        cluster._heartbeat = asyncio.create_task(cluster._heartbeat_loop())
        return cluster.stop
    if name == 'listener':
        cluster.listener.start(lambda: _drain(cluster.listen()))
        cluster.sub_redis.pubsub = lambda **kw: _Subscribing(call)
        return cluster.listener.stop
    if name == 'probe':
        cluster.listener.listening = True
        cluster.redis.publish = call
        cluster.listener._prober = asyncio.create_task(
            cluster.listener._probe_loop())
        return cluster.listener.stop
    if name == 'fanout':
        fanout = Fanout(cluster, lambda *a: False, lambda: [])
        fanout._send_batch = call
        fanout.start()
        fanout.to_all({'method': 'x'})
        return fanout.close
    if name == 'presence reaper':
        presence = RedisPresence(None, 60, None, cluster)
        presence._reap = call
        presence.start()
        return presence.close
    if name == 'outbox':
        config = SimpleNamespace(outbox_concurrency=1, outbox_batch=10,
                                 outbox_poll_seconds=0.01)
        dispatcher = Dispatcher(SimpleNamespace(config=config), {})
        dispatcher._claim_batch = call
        dispatcher.start()
        return dispatcher.close
    raise AssertionError(name)


async def _drain(messages):
    async for _ in messages:
        pass


class _Subscribing:
    """A pub/sub whose SUBSCRIBE is ``call``."""

    def __init__(self, call):
        self.subscribe = call

    async def aclose(self):
        pass


@pytest.mark.parametrize('loop_name', ['heartbeat', 'listener', 'probe',
                                       'fanout', 'presence reaper',
                                       'outbox'])
async def test_stop_ends_a_loop_whose_cancel_becomes_an_error(redis_url,
                                                              loop_name):
    """A cancellation that lands as a Redis call's own timeout expires
    can come out of Python 3.11's asyncio.timeout as a TimeoutError: each
    background loop that retries on errors must end all the same, or its
    stop() (the server's SIGTERM) waits for it forever."""
    cluster = Cluster(redis_url, f'u{uuid.uuid4().hex[:8]}', heartbeat=0.01,
                      probe_interval=0.01)
    in_call, converting = asyncio.Event(), [True]

    async def call_that_times_out(*args, **kwargs):
        in_call.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if converting[0]:
                raise TimeoutError('Timeout reading from redis') from None
            raise

    stop = _loop_of(loop_name, cluster, call_that_times_out)
    try:
        await asyncio.wait_for(in_call.wait(), 5)
        stopping = asyncio.ensure_future(stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        if not done:  # end the loop (a second, plain cancel) and fail
            converting[0] = False
            await asyncio.wait({asyncio.ensure_future(stop())}, timeout=5)
        assert done, f'stop() waits for a {loop_name} loop that never ends'
        stopping.result()
    finally:
        await cluster.redis.aclose()
        await cluster.sub_redis.aclose()
