"""Every abuse limit, seen from a client: connections per user and per
address, the per-user event rate, rooms per user, body and group size,
payload size, and a client that stops reading."""
import asyncio
import contextlib
import json

import aiohttp
import pytest
import socketio

from tests.kit import (NO_RATE_LIMITS, ServerProcess, connect, http, refused,
                       register)
from tests.test_metrics import scrape, value


@pytest.fixture(scope='module')
def limited(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp('limits'), env={
        'POSTBOX_MAX_CONNECTIONS_PER_USER': '3',
        'POSTBOX_MAX_CONNECTIONS_PER_IP': '5',
        'POSTBOX_EVENT_RATE_PER_SECOND': '0.5',
        'POSTBOX_EVENT_BURST': '8',
        'POSTBOX_ROOMS_PER_USER_MAX': '3',
        'POSTBOX_BODY_MAX_CHARS': '50',
        'POSTBOX_GROUP_MAX_MEMBERS': '3',
        'POSTBOX_MAX_PAYLOAD_BYTES': '20000',
    })
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()



async def disconnected(client) -> asyncio.Event:
    event = asyncio.Event()
    client.sio.on('disconnect', lambda *args: event.set())
    return event


async def test_connections_per_user_and_per_address(limited):
    base = limited.url
    _, a_token = await register(base)
    _, b_token = await register(base)
    a = [await connect(base, a_token) for _ in range(3)]
    error = await refused(base, a_token)
    assert error['data']['code'] == 'rate_limited'
    # A closed socket frees its place.
    await a[0].close()
    await sockets_drop_to(base, 2)
    a[0] = await connect(base, a_token)
    # Per address: 3 + 2 = 5 from 127.0.0.1, the 6th is refused although
    # its user has only 2.
    b = [await connect(base, b_token) for _ in range(2)]
    error = await refused(base, b_token)
    assert error['data']['code'] == 'rate_limited'
    for client in a + b:
        await client.close()
    await sockets_drop_to(base, 0)
    # Everything released: connections work again.
    c = await connect(base, b_token)
    await c.close()


async def test_every_event_is_rate_limited_per_user(limited):
    base = limited.url
    _, token = await register(base)
    _, other_token = await register(base)
    client = await connect(base, token)
    answers = [await client.call('rooms', {}) for _ in range(8)]
    assert all(a['ok'] for a in answers)
    limited_ack = await client.call('rooms', {})
    assert limited_ack['ok'] is False
    assert limited_ack['error']['code'] == 'rate_limited'
    assert limited_ack['error']['retry_after'] > 0
    # Reads and writes share the bucket.
    ack = await client.call('presence', {'usernames': []})
    assert ack['error']['code'] == 'rate_limited'
    # Another user is not affected, and the socket stays connected.
    other = await connect(base, other_token)
    assert (await other.call('rooms', {}))['ok']
    assert client.sio.connected
    samples = await scrape(base)
    assert value(samples, 'postbox_rate_limited_total', limit='rooms') >= 1
    await client.close()
    await other.close()


async def test_http_requests_spend_the_same_event_budget(limited):
    """150 GET /api/rooms at once from one user: the bucket's 8 are
    served, the rest answered 429 with the seconds to wait; the user's
    socket shares that bucket, and another user is not affected."""
    base = limited.url
    _, token = await register(base)
    _, other_token = await register(base)
    client = await connect(base, token)

    async def rooms(session):
        async with session.get(base + '/api/rooms', headers={
                'Authorization': f'Bearer {token}'}) as resp:
            return resp.status, resp.headers, await resp.json()
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*[rooms(session) for _ in range(150)])
    statuses = [status for status, _, _ in results]
    # A token may have come back while the burst was served.
    assert 8 <= statuses.count(200) <= 10, statuses
    assert statuses.count(429) == 150 - statuses.count(200)
    for status, headers, body in results:
        if status == 429:
            assert body['error']['code'] == 'rate_limited'
            assert body['error']['retry_after'] > 0
            assert int(headers['Retry-After']) >= 1
    ack = await client.call('rooms', {})
    assert ack['ok'] is False and ack['error']['code'] == 'rate_limited'
    assert (await http(base, 'GET', '/api/rooms', token=other_token))[0] == 200
    samples = await scrape(base)
    assert value(samples, 'postbox_rate_limited_total',
                 limit='/api/rooms') >= 140
    await client.close()


async def connect_from(base, token, forwarded_for):
    """Connect sending ``X-Forwarded-For``; returns the client, or the
    connect_error data if refused."""
    sio = socketio.AsyncClient(reconnection=False)
    errors = []
    sio.on('connect_error', lambda data: errors.append(data))
    try:
        await sio.connect(base, auth={'token': token},
                          headers={'X-Forwarded-For': forwarded_for},
                          transports=['websocket'], wait_timeout=5)
    except socketio.exceptions.ConnectionError:
        return errors[0]['data']
    return sio


@pytest.mark.parametrize('trusted', [True, False])
async def test_per_address_limits_behind_a_trusted_proxy(tmp_path, trusted):
    """With the proxy trusted, each forwarded client has its own
    allowance; without, X-Forwarded-For is ignored (all count as the
    peer), so a client cannot dodge the limit by writing the header."""
    env = {'POSTBOX_MAX_CONNECTIONS_PER_IP': '2',
           'POSTBOX_LOGIN_FAILURES_PER_IP': '2'}
    if trusted:
        env['POSTBOX_TRUSTED_PROXIES'] = '127.0.0.0/8, ::1'
    server = ServerProcess(tmp_path, env=env).start()
    base = server.url
    tokens = [(await register(base))[1] for _ in range(4)]
    # Two connections from "client 1", a client writing its own hop first.
    held = [await connect_from(base, tokens[0], '203.0.113.1'),
            await connect_from(base, tokens[1], '198.51.100.9, 203.0.113.1')]
    assert all(isinstance(s, socketio.AsyncClient) for s in held), held
    third = await connect_from(base, tokens[2], '203.0.113.1')
    assert third == {'code': 'rate_limited',
                     'message': 'too many connections from this address'}
    other = await connect_from(base, tokens[3], '203.0.113.2')
    if trusted:
        assert isinstance(other, socketio.AsyncClient), other
        held.append(other)
    else:
        assert other['code'] == 'rate_limited'
    # Failed logins: the same per-address allowance logic.
    for _ in range(2):
        status, _ = await http(base, 'POST', '/api/login', json={
            'username': 'nobody1', 'password': 'wrong pass'},
            headers={'X-Forwarded-For': '203.0.113.1'})
        assert status == 401
    status, data = await http(base, 'POST', '/api/login', json={
        'username': 'nobody2', 'password': 'wrong pass'},
        headers={'X-Forwarded-For': '203.0.113.2'})
    assert status == (401 if trusted else 429), data
    for sio in held:
        await sio.disconnect()
    assert await server.astop() == 0


async def test_unknown_events_use_up_the_same_budget(limited):
    base = limited.url
    _, token = await register(base)
    client = await connect(base, token)
    for _ in range(8):
        ack = await client.call('no_such_event', {})
        assert ack['error']['code'] == 'invalid'
    ack = await client.call('no_such_event', {})
    assert ack['error']['code'] == 'rate_limited'
    assert (await client.call('rooms', {}))['error']['code'] == 'rate_limited'
    assert client.sio.connected
    await client.close()


async def test_rooms_per_user(limited):
    base = limited.url
    _, token = await register(base)
    friends = [(await register(base))[0]['username'] for _ in range(3)]
    client = await connect(base, token)
    dm = await client.call('open_dm', {'username': friends[0]})
    assert dm['ok']
    for i in range(2):
        ack = await client.call('create_group', {'name': f'g{i}',
                                                 'members': [friends[1]]})
        assert ack['ok'], ack
    ack = await client.call('create_group', {'name': 'one too many',
                                             'members': [friends[1]]})
    assert ack['error']['code'] == 'forbidden'
    ack = await client.call('open_dm', {'username': friends[2]})
    assert ack['error']['code'] == 'forbidden'
    ack = await client.call('send_dm', {'to': friends[2], 'body': 'hi',
                                        'client_msg_id': 'r1'})
    assert ack['error']['code'] == 'forbidden'
    # Rooms the user is already in keep working.
    again = await client.call('open_dm', {'username': friends[0]})
    assert again['ok'] and again['room']['id'] == dm['room']['id']
    await client.close()


async def test_body_length_and_group_size(limited):
    base = limited.url
    _, token = await register(base)
    friends = [(await register(base))[0]['username'] for _ in range(3)]
    client = await connect(base, token)
    ack = await client.call('send_dm', {'to': friends[0], 'body': 'x' * 51,
                                        'client_msg_id': 'b1'})
    assert ack['error']['code'] == 'too_large'
    ack = await client.call('send_dm', {'to': friends[0], 'body': 'x' * 50,
                                        'client_msg_id': 'b2'})
    assert ack['ok']
    ack = await client.call('create_group', {'name': 'big',
                                             'members': friends})
    assert ack['ok'] is False and ack['error']['code'] == 'invalid'
    await client.close()


async def test_oversized_payloads_are_refused(limited):
    base = limited.url
    _, token = await register(base)
    # HTTP: a body over the limit is 413 with a JSON error.
    status, data = await http(base, 'POST', '/api/login',
                              json={'username': 'x' * 30000, 'password': 'y'})
    assert status == 413 and data['error']['code'] == 'too_large'
    # Socket.IO: a frame over the limit closes that connection only.
    client = await connect(base, token)
    gone = await disconnected(client)
    with pytest.raises(socketio.exceptions.TimeoutError):
        await client.call('send_dm', {'to': 'nobody', 'client_msg_id': 'p',
                                      'body': 'x' * 30000}, timeout=3)
    await asyncio.wait_for(gone.wait(), 10)
    again = await connect(base, token)
    assert (await again.call('rooms', {}))['ok']
    await again.close()


async def raw_socket(base, token, session):
    """A websocket that does the Engine.IO and Socket.IO handshakes by hand
    and then reads only when told to (aiohttp stops reading the TCP socket
    while its own small buffer is full)."""
    ws = await session.ws_connect(
        base + '/socket.io/?EIO=4&transport=websocket', autoping=False,
        max_msg_size=0)
    opening = await ws.receive_str(timeout=5)
    assert opening.startswith('0')
    await ws.send_str('40' + json.dumps({'token': token}))
    while True:  # events (presence) may come before the connect answer
        connected = await ws.receive_str(timeout=5)
        if not connected.startswith('42'):
            break
    assert connected.startswith('40'), connected
    return ws


async def test_client_that_stops_reading_is_cut_off_others_unaffected(
        tmp_path):
    server = ServerProcess(tmp_path, env={
        **NO_RATE_LIMITS, 'POSTBOX_SOCKET_SEND_QUEUE_MAX': '50'})
    server.start()
    base = server.url
    try:
        sender, s_token = await register(base)
        slow, slow_token = await register(base)
        reader, r_token = await register(base)
        s = await connect(base, s_token)
        r = await connect(base, r_token)
        # The slow user's other device reads normally.
        slow_other = await connect(base, slow_token)
        room = (await s.call('create_group', {
            'name': 'flood', 'members': [slow['username'],
                                         reader['username']]}))['room']
        async with aiohttp.ClientSession() as session:
            ws = await raw_socket(base, slow_token, session)
            # From here on the raw socket is never read: the kernel buffers
            # fill, then the server's queue for it.
            body = 'f' * 4000
            sent = 0
            cut = False
            while not cut and sent < 20000:
                acks = await asyncio.gather(*[
                    s.call('send_dm', {'room_id': room['id'], 'body': body,
                                       'client_msg_id': f'f{sent + i}'},
                           timeout=30)
                    for i in range(50)])
                assert all(a['ok'] for a in acks)
                sent += 50
                samples = await scrape(base)
                cut = value(samples,
                            'postbox_slow_client_disconnects_total') >= 1
            assert cut, f'not cut off after {sent} messages'
            # The slow socket finds its connection closed once it reads.
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type in (aiohttp.WSMsgType.CLOSE,
                                aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR):
                    break
        # Everyone else got every message.
        for client in (r, slow_other, s):
            got = set()
            while len(got) < sent:
                message = await client.next('message', timeout=30)
                got.add(message['client_msg_id'])
        assert (await r.call('rooms', {}))['ok']
        for client in (s, r, slow_other):
            await client.close()
    finally:
        assert server.stop() == 0, server.read_log()


async def test_half_open_connection_is_reaped_by_ping_timeout(tmp_path):
    server = ServerProcess(tmp_path, env={'POSTBOX_PING_INTERVAL': '1',
                                          'POSTBOX_PING_TIMEOUT': '1'})
    server.start()
    base = server.url
    try:
        _, token = await register(base)
        async with aiohttp.ClientSession() as session:
            # Never answers the server's pings, like a peer that vanished.
            ws = await raw_socket(base, token, session)
            connected = value(await scrape(base), 'postbox_connected_sockets')
            assert connected == 1
            while True:
                msg = await ws.receive(timeout=30)
                if msg.type in (aiohttp.WSMsgType.CLOSE,
                                aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR):
                    break
        assert value(await scrape(base), 'postbox_connected_sockets') == 0
    finally:
        assert server.stop() == 0, server.read_log()


async def sockets_drop_to(base, count, timeout=10):
    """Wait until the server has handled the disconnects (its gauge is
    lowered after the connection counts are released)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while value(await scrape(base), 'postbox_connected_sockets') > count:
        assert loop.time() < deadline, 'disconnect not seen by the server'
        await asyncio.sleep(0.05)  # poll interval of the gauge


async def test_connections_per_user_hold_across_processes(tmp_path):
    from tests.kit import (FAST_REDIS_ENV, RedisProcess, start_servers,
                                 stop_servers)
    redis = RedisProcess(tmp_path / 'redis').start()
    servers = start_servers(tmp_path / 'cluster', 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
        'POSTBOX_MAX_CONNECTIONS_PER_USER': '2'})
    try:
        one, two = servers[0].url, servers[1].url
        _, token = await register(one)
        first = await connect(one, token)
        second = await connect(two, token)
        # Each process has one socket of the user; together they are 2.
        for url in (one, two):
            error = await refused(url, token)
            assert error['data']['code'] == 'rate_limited'
        await first.close()
        await sockets_drop_to(one, 0)
        third = await connect(two, token)
        assert (await third.call('rooms', {}))['ok']
        await second.close()
        await third.close()
    finally:
        codes = stop_servers(servers)
        redis.stop()
    assert codes == [0, 0]


BY_ADDRESS = {'code': 'rate_limited',
              'message': 'too many connections from this address'}
BY_USER = {'code': 'rate_limited',
           'message': 'too many connections for this user'}


@contextlib.contextmanager
def address_cluster(redis, tmp_path, per_user):
    """Two processes sharing ``redis``, 3 connections per address; both
    must stop cleanly."""
    from tests.kit import FAST_REDIS_ENV, start_servers, stop_servers
    servers = start_servers(tmp_path / 'cluster', 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
        'POSTBOX_REDIS_CHANNEL': 'pb-' + tmp_path.name,
        'POSTBOX_MAX_CONNECTIONS_PER_IP': '3',
        'POSTBOX_MAX_CONNECTIONS_PER_USER': str(per_user)})
    try:
        yield servers
    finally:
        codes = stop_servers(servers)
    assert codes == [0, 0]


async def test_connections_per_address_hold_across_processes(redis,
                                                             tmp_path):
    with address_cluster(redis, tmp_path, per_user=100) as servers:
        one, two = servers[0].url, servers[1].url
        tokens = [(await register(one))[1] for _ in range(4)]
        # Three users from 127.0.0.1: two sockets on one process, one on
        # the other; together they are the address's 3.
        held = [await connect(one, tokens[0]), await connect(two, tokens[1]),
                await connect(one, tokens[2])]
        for url in (one, two):
            assert (await refused(url, tokens[3]))['data'] == BY_ADDRESS
        # A socket closed on one process frees a place on the other.
        await held.pop(0).close()
        await sockets_drop_to(one, 1)
        held.append(await connect(two, tokens[3]))
        assert (await held[-1].call('rooms', {}))['ok']
        assert (await refused(one, tokens[0]))['data'] == BY_ADDRESS
        for client in held:
            await client.close()


async def test_connection_refused_for_its_address_costs_its_user_nothing(
        redis, tmp_path):
    with address_cluster(redis, tmp_path, per_user=2) as servers:
        one, two = servers[0].url, servers[1].url
        tokens = [(await register(one))[1] for _ in range(3)]
        held = [await connect(one, tokens[0]), await connect(two, tokens[1]),
                await connect(one, tokens[2])]
        # The address is full: the first user is refused on both processes,
        # more times than that user has places left.
        for url in (one, two, one, two):
            assert (await refused(url, tokens[0]))['data'] == BY_ADDRESS
        await held.pop(1).close()
        await sockets_drop_to(two, 0)
        # The refusals counted nothing: the user's second place is free,
        # and after it the user's own limit (not the address's) refuses.
        held.append(await connect(two, tokens[0]))
        await held.pop(1).close()
        await sockets_drop_to(one, 1)
        assert (await refused(two, tokens[0]))['data'] == BY_USER
        for client in held:
            await client.close()
