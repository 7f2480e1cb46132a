"""Auth hardening seen from clients: token refresh, logout everywhere and
password changes reaching live sockets, login throttling, CORS."""
import asyncio
from collections import Counter

import aiohttp
import pytest

from tests.kit import (FAST_REDIS_ENV, ServerProcess, connect, http, refused,
                       register, running_servers, start_servers, stop_servers,
                       unique_name)

# A small login allowance that does not refill during a test (one try per
# two minutes per username), and an address allowance well above it.
THROTTLE = {'POSTBOX_LOGIN_FAILURES_PER_USERNAME': '5',
            'POSTBOX_LOGIN_FAILURES_PER_IP': '20',
            'POSTBOX_LOGIN_REFILL_PER_MINUTE': '0.5',
            # Bursts of one user's HTTP requests, not stopped per user.
            'POSTBOX_EVENT_BURST': '1000'}
USERNAME_LIMIT = 5


def on_disconnect(client) -> asyncio.Event:
    event = asyncio.Event()
    client.sio.on('disconnect', lambda *args: event.set())
    return event


async def test_refresh_gives_a_working_token(base):
    user, token = await register(base)
    status, data = await http(base, 'POST', '/api/token/refresh', token=token)
    assert status == 200 and data['token']
    status, me = await http(base, 'GET', '/api/me', token=data['token'])
    assert status == 200 and me['user']['id'] == user['id']
    status, data = await http(base, 'POST', '/api/token/refresh')
    assert status == 401 and data['error']['code'] == 'unauthorized'


async def test_logout_all_revokes_tokens_and_closes_live_sockets(base):
    user, token = await register(base)
    peer, peer_token = await register(base)
    status, login = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': 'correct horse'})
    other_token = login['token']
    phone = await connect(base, token)
    laptop = await connect(base, other_token)
    bystander = await connect(base, peer_token)
    phone_gone, laptop_gone = on_disconnect(phone), on_disconnect(laptop)
    bystander_gone = on_disconnect(bystander)

    # A plain logout forgets nothing server-side.
    status, _ = await http(base, 'POST', '/api/logout', token=token, json={})
    assert status == 200
    assert (await http(base, 'GET', '/api/me', token=token))[0] == 200

    status, _ = await http(base, 'POST', '/api/logout', token=token,
                           json={'all': True})
    assert status == 200
    await asyncio.wait_for(phone_gone.wait(), 10)
    await asyncio.wait_for(laptop_gone.wait(), 10)
    for old in (token, other_token):
        status, data = await http(base, 'GET', '/api/me', token=old)
        assert status == 401 and data['error']['code'] == 'unauthorized'
        assert (await refused(base, old))['data'] == {'code': 'unauthorized'}
    # Another user's socket is untouched.
    assert not bystander_gone.is_set()
    assert (await bystander.call('rooms', {}))['ok']
    # Logging in again works.
    status, login = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': 'correct horse'})
    assert status == 200
    again = await connect(base, login['token'])
    assert (await again.call('rooms', {}))['ok']
    await again.close()
    await bystander.close()


async def test_password_change_revokes_older_tokens_and_sockets(base):
    user, token = await register(base, password='old password 1')
    live = await connect(base, token)
    gone = on_disconnect(live)
    status, data = await http(base, 'POST', '/api/password', token=token,
                              json={'old_password': 'not it at all',
                                    'new_password': 'new password 2'})
    assert status == 401 and data['error']['code'] == 'unauthorized'
    status, data = await http(base, 'POST', '/api/password', token=token,
                              json={'old_password': 'old password 1',
                                    'new_password': 'short'})
    assert status == 400 and data['error']['code'] == 'invalid'
    assert not gone.is_set()

    status, data = await http(base, 'POST', '/api/password', token=token,
                              json={'old_password': 'old password 1',
                                    'new_password': 'new password 2'})
    assert status == 200 and data['user']['id'] == user['id']
    new_token = data['token']
    await asyncio.wait_for(gone.wait(), 10)
    assert (await http(base, 'GET', '/api/me', token=token))[0] == 401
    assert (await http(base, 'GET', '/api/me', token=new_token))[0] == 200
    status, _ = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': 'old password 1'})
    assert status == 401
    status, _ = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': 'new password 2'})
    assert status == 200


async def login(base, name, password, session=None):
    """POST /api/login; returns (status, headers, parsed JSON)."""
    if session is None:
        async with aiohttp.ClientSession() as session:
            return await login(base, name, password, session)
    async with session.post(base + '/api/login', json={
            'username': name, 'password': password}) as resp:
        return resp.status, resp.headers, await resp.json()


async def test_login_throttling_per_username_and_address(tmp_path):
    server = ServerProcess(tmp_path, env={
        'POSTBOX_LOGIN_FAILURES_PER_USERNAME': '3',
        'POSTBOX_LOGIN_FAILURES_PER_IP': '6',
        'POSTBOX_LOGIN_REFILL_PER_MINUTE': '0.5'})
    server.start()
    base = server.url
    try:
        names = [(await register(base))[0]['username'] for _ in range(3)]

        for _ in range(3):
            assert (await login(base, names[0], 'wrong guess'))[0] == 401
        # Even the right password waits now, and says how long.
        status, headers, data = await login(base, names[0], 'correct horse')
        assert status == 429 and data['error']['code'] == 'rate_limited'
        assert int(headers['Retry-After']) >= 1
        assert data['error']['retry_after'] > 0
        # Another account from the same address still logs in...
        assert (await login(base, names[1], 'correct horse'))[0] == 200
        for _ in range(3):
            assert (await login(base, names[1], 'wrong guess'))[0] == 401
        # ...until the address has used up its failures too.
        status, _, data = await login(base, names[2], 'correct horse')
        assert status == 429 and data['error']['code'] == 'rate_limited'
        # Guessing unknown usernames counts the same.
        status, _, _ = await login(base, 'nobody_here', 'x' * 8)
        assert status == 429
    finally:
        assert server.stop() == 0, server.read_log()


@pytest.fixture
def throttled(tmp_path):
    """One server with the THROTTLE allowance; a list, like the pair."""
    server = ServerProcess(tmp_path, env=THROTTLE).start()
    yield [server]
    assert server.stop() == 0, server.read_log()


@pytest.fixture
def throttled_pair(tmp_path, redis):
    """Two servers with the THROTTLE allowance sharing one Redis, under a
    key prefix of their own: the address bucket (127.0.0.1) is in Redis
    too, and another test's tries must not count against it."""
    with running_servers(tmp_path, 2, {
            **FAST_REDIS_ENV, **THROTTLE, 'POSTBOX_REDIS_URL': redis.url,
            'POSTBOX_REDIS_CHANNEL': 'pb-' + tmp_path.name}) as servers:
        yield servers


async def concurrent_guesses(servers, name, count):
    """``count`` wrong-password logins for ``name`` sent all at once,
    spread over ``servers`` in turn; returns their (status, headers,
    body) in order."""
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*[
            login(servers[i % len(servers)].url, name, f'guess number {i}',
                  session)
            for i in range(count)])


def assert_capped(results):
    """The allowance, and not one try more, got an answer about the
    password; every other try was told to wait."""
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {401: USERNAME_LIMIT,
                        429: len(results) - USERNAME_LIMIT}, statuses
    for status, headers, body in results:
        if status == 429:
            assert body['error']['code'] == 'rate_limited'
            assert body['error']['retry_after'] > 0
            assert int(headers['Retry-After']) >= 1


async def test_concurrent_wrong_logins_get_only_the_allowance(throttled):
    """Guesses sent together cannot all slip past the limit while the
    first of them is still being checked."""
    base = throttled[0].url
    (user, _), (other, _) = await register(base), await register(base)
    assert_capped(await concurrent_guesses(throttled, user['username'], 60))
    # The refused tries did not count against the address either, so
    # another account from it still logs in (20 allowed, 5 spent).
    status, _, body = await login(base, other['username'], 'correct horse')
    assert status == 200, body


async def test_concurrent_wrong_logins_across_processes_share_one_allowance(
        throttled_pair):
    """Guesses split over two processes at once get one allowance in
    total, not one each and not one per try in flight."""
    user, _ = await register(throttled_pair[0].url)
    results = await concurrent_guesses(throttled_pair, user['username'], 60)
    assert_capped(results)
    # Both processes refused some: the cap is shared, not per process.
    for server in (0, 1):
        assert 429 in [status for status, _, _ in results[server::2]]
    for server in throttled_pair:
        status, _, body = await login(server.url, user['username'],
                                      'correct horse')
        assert status == 429, body


@pytest.mark.parametrize('servers', ['throttled', 'throttled_pair'])
async def test_right_password_after_wrong_ones_logs_in(request, servers):
    """A user who mistyped a few times and then got it right is let in,
    as often as they log in: a right password spends nothing, and the
    typos still count as before."""
    servers = request.getfixturevalue(servers)
    urls = [server.url for server in servers]
    user, _ = await register(urls[0])
    name = user['username']
    results = await concurrent_guesses(servers, name, USERNAME_LIMIT - 1)
    assert [status for status, _, _ in results] == [401] * (USERNAME_LIMIT - 1)
    # More right logins than tries left, from every process.
    for i in range(3):
        status, _, body = await login(urls[i % len(urls)], name,
                                      'correct horse')
        assert status == 200 and body['user']['id'] == user['id'], body
    # The typos still count: one more miss, then even the right one waits.
    assert (await login(urls[-1], name, 'one more typo'))[0] == 401
    status, _, body = await login(urls[0], name, 'correct horse')
    assert status == 429 and body['error']['code'] == 'rate_limited', body


async def polling_handshake(base, origin):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + '/socket.io/?EIO=4&transport=polling',
                               headers={'Origin': origin}) as resp:
            return resp.status, resp.headers


async def websocket_accepted(base, origin) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                base + '/socket.io/?EIO=4&transport=websocket',
                headers={'Origin': origin})
        except aiohttp.WSServerHandshakeError:
            return False
        try:
            msg = await ws.receive(timeout=5)
            return msg.type == aiohttp.WSMsgType.TEXT and \
                msg.data.startswith('0')
        finally:
            await ws.close()


async def test_cors_default_is_same_origin_only(base):
    status, _ = await polling_handshake(base, 'https://evil.example')
    assert status == 400
    assert not await websocket_accepted(base, 'https://evil.example')
    status, _ = await polling_handshake(base, base)
    assert status == 200
    assert await websocket_accepted(base, base)


async def test_cors_allowed_origins_from_config(tmp_path):
    good = 'https://chat.example.com'
    server = ServerProcess(tmp_path,
                           env={'POSTBOX_CORS_ALLOWED_ORIGINS': good})
    server.start()
    try:
        status, headers = await polling_handshake(server.url, good)
        assert status == 200
        assert headers['Access-Control-Allow-Origin'] == good
        assert await websocket_accepted(server.url, good)
        status, headers = await polling_handshake(server.url,
                                                  'https://evil.example')
        assert status == 400
        assert 'Access-Control-Allow-Origin' not in headers
        assert not await websocket_accepted(server.url,
                                            'https://evil.example')
    finally:
        assert server.stop() == 0, server.read_log()


# Five registrations per address, refilling one per two minutes: none
# come back during a test.
REGISTRATIONS = {'POSTBOX_REGISTRATIONS_PER_IP': '5',
                 'POSTBOX_REGISTRATION_REFILL_PER_MINUTE': '0.5',
                 'POSTBOX_TRUSTED_PROXIES': '127.0.0.0/8'}


async def register_burst(urls, count, address):
    """``count`` registrations sent at once from ``address`` (through the
    trusted proxy header), spread over ``urls`` in turn; returns their
    (status, headers, body)."""
    async def one(session, i):
        async with session.post(
                urls[i % len(urls)] + '/api/register',
                headers={'X-Forwarded-For': address},
                json={'username': unique_name('r'),
                      'password': 'correct horse'}) as resp:
            return resp.status, resp.headers, await resp.json()
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*[one(session, i) for i in range(count)])


def assert_registrations_capped(results, allowed=5):
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {201: allowed, 429: len(results) - allowed}, statuses
    for status, headers, body in results:
        if status == 429:
            assert body['error']['code'] == 'rate_limited'
            assert body['error']['retry_after'] > 0
            assert int(headers['Retry-After']) >= 1


async def test_registration_burst_from_one_address_is_throttled(tmp_path):
    """30 registrations from one address at once: the allowance gets
    accounts, the rest are told to wait (no Argon2 hash made for them);
    another address is not affected."""
    server = ServerProcess(tmp_path, env=REGISTRATIONS).start()
    try:
        results = await register_burst([server.url], 30, '203.0.113.7')
        assert_registrations_capped(results)
        # The accounts made work.
        for status, _, body in results:
            if status == 201:
                me = await http(server.url, 'GET', '/api/me',
                                token=body['token'])
                assert me[0] == 200
        more = await register_burst([server.url], 1, '203.0.113.7')
        assert more[0][0] == 429
        other = await register_burst([server.url], 1, '203.0.113.8')
        assert other[0][0] == 201, other
    finally:
        assert server.stop() == 0, server.read_log()


async def test_registration_throttle_is_shared_across_processes(tmp_path,
                                                                redis):
    servers = start_servers(tmp_path, 2, {
        **FAST_REDIS_ENV, **REGISTRATIONS, 'POSTBOX_REDIS_URL': redis.url,
        'POSTBOX_REDIS_CHANNEL': 'pb-' + tmp_path.name})
    try:
        urls = [server.url for server in servers]
        results = await register_burst(urls, 30, '203.0.113.9')
        # One allowance in total, not one per process.
        assert_registrations_capped(results)
        for i in (0, 1):
            assert 429 in [status for status, _, _ in results[i::2]]
    finally:
        assert stop_servers(servers) == [0, 0], \
            [server.read_log() for server in servers]


async def change_password(base, token, old, session, new='a new password'):
    async with session.post(base + '/api/password', json={
            'old_password': old, 'new_password': new},
            headers={'Authorization': f'Bearer {token}'}) as resp:
        return resp.status, resp.headers, await resp.json()


@pytest.mark.parametrize('servers', ['throttled', 'throttled_pair'])
async def test_wrong_old_passwords_are_throttled_like_logins(request,
                                                             servers):
    """60 wrong old passwords at once with a (stolen) token: the user's
    failed-login allowance gets a check, the rest are refused unchecked;
    then the right old password and the right login wait too, since they
    share one throttle."""
    servers = request.getfixturevalue(servers)
    urls = [server.url for server in servers]
    user, token = await register(urls[0])
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*[
            change_password(urls[i % len(urls)], token, f'guess {i}!',
                            session)
            for i in range(60)])
        assert_capped(results)
        status, _, body = await change_password(urls[0], token,
                                                'correct horse', session)
        assert status == 429 and body['error'] == {
            'code': 'rate_limited', 'retry_after': body['error']['retry_after'],
            'message': 'too many failed logins, try later'}
    status, _, body = await login(urls[-1], user['username'], 'correct horse')
    assert status == 429, body
    # The password was not changed by any of it.
    assert (await http(urls[0], 'GET', '/api/me', token=token))[0] == 200


async def test_right_old_password_spends_nothing(throttled):
    base = throttled[0].url
    user, token = await register(throttled[0].url)
    async with aiohttp.ClientSession() as session:
        for i in range(USERNAME_LIMIT + 2):
            old, new = 'correct horse', 'a new password'
            if i % 2:
                old, new = new, old
            status, _, body = await change_password(base, token, old,
                                                    session, new)
            assert status == 200, body
            token = body['token']


async def test_argon2_work_at_once_is_bounded():
    """A burst of hashes and checks runs at most ``argon2_concurrency``
    at a time (each takes 64 MiB), however many threads are free."""
    import threading
    from server.config import Config
    from server.services import auth
    from server.services.context import Context

    running, most, lock = [0], [0], threading.Lock()
    gate = threading.Event()

    class Hasher:
        def work(self, *args):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            gate.wait(0.05)
            with lock:
                running[0] -= 1
            return 'hash'
        hash = verify = work

    ctx = Context(None, Config(argon2_concurrency=2), 'x')
    real, auth._hasher = auth._hasher, Hasher()
    try:
        await asyncio.gather(*[auth._hash(ctx, 'pw') for _ in range(10)],
                             *[auth._verify(ctx, 'h', 'pw')
                               for _ in range(10)])
    finally:
        auth._hasher = real
    assert most[0] == 2


@pytest.mark.parametrize('secret', ['short', 'x' * 31, 'é' * 15])
def test_short_configured_secret_refuses_to_start(tmp_path, secret):
    server = ServerProcess(tmp_path, env={'POSTBOX_SECRET': secret})
    with pytest.raises(RuntimeError) as exited:
        server.start()
    assert 'secret: at least 32 bytes' in str(exited.value)
    assert server.stop() != 0


@pytest.mark.parametrize('content', ['', '\n', 'abc'])
async def test_empty_or_short_secret_file_is_replaced(tmp_path, content):
    """A secret file left empty (or too short) used to sign every token
    with it, or fail every login: a new secret is generated, logged, and
    kept across restarts."""
    (tmp_path / 'secret').write_text(content)
    server = ServerProcess(tmp_path, env={'POSTBOX_SECRET': ''}).start()
    try:
        user, token = await register(server.url)
        status, data = await http(server.url, 'POST', '/api/login', json={
            'username': user['username'], 'password': 'correct horse'})
        assert status == 200, data
        assert 'generated a new secret' in server.read_log() or \
            'replaced by a new one' in server.read_log()
    finally:
        assert server.stop() == 0, server.read_log()
    secret = (tmp_path / 'secret').read_text()
    assert len(secret.encode()) >= 32
    server.start()
    try:
        assert (await http(server.url, 'GET', '/api/me', token))[0] == 200
    finally:
        assert server.stop() == 0, server.read_log()
    assert (tmp_path / 'secret').read_text() == secret


HIDDEN = ['\u202e', '\u202a', '\u2066', '\u2069', '\u200b', '\u200d',
          '\u2060', '\ufeff', '\x00', '\x07', '\x1b', '\x7f', '\x85',
          '\u2028']


@pytest.mark.parametrize('char', HIDDEN)
async def test_display_names_with_hidden_characters_are_refused(base, char):
    """Direction overrides, zero-width and control characters (NUL a
    500 on PostgreSQL) are refused at registration and bot creation."""
    name = f'admin{char}gpj.exe'
    status, data = await http(base, 'POST', '/api/register', json={
        'username': unique_name(), 'password': 'correct horse',
        'display_name': name})
    assert status == 400 and data['error']['code'] == 'invalid', data
    _, token = await register(base)
    status, data = await http(base, 'POST', '/api/bots', token, json={
        'username': unique_name('bot'), 'display_name': name})
    assert status == 400 and data['error']['code'] == 'invalid', data


async def test_display_names_in_any_script_are_kept(base):
    for name in ['Zoë 🙂', 'مريم', 'שלום עולם', '田中 太郎', 'José-María']:
        status, data = await http(base, 'POST', '/api/register', json={
            'username': unique_name(), 'password': 'correct horse',
            'display_name': f'  {name} '})
        assert status == 201 and data['user']['display_name'] == name, data
