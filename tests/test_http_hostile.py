"""HTTP requests an attacker (or a broken client) sends, against a real
server: every one gets a JSON error with the right status, never a 500, a
hang or a log flood. Found by a black-box review; each test failed before
its fix."""
import asyncio
import time
import urllib.parse

import jwt

from tests.kit import ServerProcess, http, register, unique_name, upload

# The secret every test server signs with (tests/kit/processes.py).
SECRET = 'test-secret-' + 'x' * 32


async def raw_request(base, head: bytes, body: bytes = b'', close=False,
                      timeout=10.0) -> bytes:
    """Send ``head`` and ``body`` as they are; returns the whole answer
    (b'' if the server closed without one). ``close``: hang up right
    after sending."""
    url = urllib.parse.urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + body)
        await writer.drain()
        if close:
            return b''
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def multipart_head(base, token, boundary, length):
    host = urllib.parse.urlsplit(base).netloc
    return (f'POST /api/attachments HTTP/1.1\r\nHost: {host}\r\n'
            f'Authorization: Bearer {token}\r\nConnection: close\r\n'
            f'Content-Type: multipart/form-data; boundary={boundary}\r\n'
            f'Content-Length: {length}\r\n\r\n').encode()


def status_and_json(answer: bytes):
    head, _, body = answer.partition(b'\r\n\r\n')
    return int(head.split()[1]), head.decode('latin-1'), body


async def test_malformed_multipart_uploads_are_invalid_not_500(base):
    _, token = await register(base)
    bodies = {
        'no boundary in the body': (b'xx', b'abc'),
        'a part header without a colon': (
            b'BB', b'--BB\r\nno colon header\r\n\r\nhello\r\n--BB--\r\n'),
        'a control character in the filename': (
            b'BB', b'--BB\r\nContent-Disposition: form-data; name="file"; '
            b'filename="\x00\x01.txt"\r\n\r\nabc\r\n--BB--\r\n'),
        'a nested multipart': (
            b'BB', b'--BB\r\nContent-Disposition: form-data; name="file"\r\n'
            b'Content-Type: multipart/mixed; boundary=CC\r\n\r\n'
            b'--CC\r\n\r\nx\r\n--CC--\r\n--BB--\r\n'),
    }
    for what, (boundary, body) in bodies.items():
        answer = await raw_request(base, multipart_head(
            base, token, boundary.decode(), len(body)), body)
        status, head, data = status_and_json(answer)
        assert status == 400, (what, answer)
        assert b'"code":"invalid"' in data and b'multipart' in data, \
            (what, data)
    # Still serving: a real upload goes through.
    status, data = await upload(base, token, b'fine', 'fine.txt')
    assert status == 201, data


async def test_a_json_body_that_stalls_gets_408(tmp_path):
    proc = ServerProcess(tmp_path, env={
        'POSTBOX_ATTACHMENT_UPLOAD_IDLE_SECONDS': '1'}).start()
    try:
        host = urllib.parse.urlsplit(proc.url).netloc
        head = (f'POST /api/register HTTP/1.1\r\nHost: {host}\r\n'
                'Content-Type: application/json\r\nContent-Length: 50\r\n'
                'Connection: close\r\n\r\n').encode()
        started = time.monotonic()
        answer = await raw_request(proc.url, head, b'{"use', timeout=20)
        status, _, data = status_and_json(answer)
        assert status == 408 and b'"code":"invalid"' in data, answer
        assert time.monotonic() - started < 15
    finally:
        assert await proc.astop() == 0, proc.read_log()


async def test_a_client_hanging_up_mid_request_is_not_a_server_fault(
        tmp_path):
    proc = ServerProcess(tmp_path).start()
    try:
        _, token = await register(proc.url)
        host = urllib.parse.urlsplit(proc.url).netloc
        for path, auth in (('/api/register', ''),
                           ('/api/attachments',
                            f'Authorization: Bearer {token}\r\n')):
            kind = ('multipart/form-data; boundary=BB'
                    if path == '/api/attachments' else 'application/json')
            head = (f'POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}'
                    f'Content-Type: {kind}\r\nContent-Length: 5000\r\n\r\n'
                    ).encode()
            await raw_request(proc.url, head, b'--BB\r\n{"a', close=True)
        await asyncio.sleep(1)
        _, metrics = await http(proc.url, 'GET', '/metrics')
        assert 'status="500"' not in metrics
    finally:
        assert await proc.astop() == 0, proc.read_log()
    assert 'ERROR' not in proc.read_log(), proc.read_log()


async def test_ids_are_plain_decimal_numbers(base):
    user, token = await register(base)
    status, data = await upload(base, token, b'mine', 'mine.txt')
    assert status == 201, data
    att = data['attachment']['id']
    assert (await http(base, 'GET', f'/api/attachments/{att}', token))[0] \
        == 200
    # Python's int() reads all of these as a number: one id, many URLs.
    digits = str(att)
    underscored = f'{digits[0]}_{digits[1:]}' if att > 9 else f'{att}_0'
    wide = ''.join(chr(0xFF10 + int(d)) for d in digits)  # "１２"
    for spelling in (f'+{att}', f'%20{att}', f'{att}%20', underscored,
                     urllib.parse.quote(wide)):
        status, body = await http(base, 'GET', f'/api/attachments/{spelling}',
                                  token)
        assert status == 404, (spelling, status, body)
        assert body['error']['code'] == 'not_found'
    status, body = await http(base, 'GET', '/api/rooms?limit=%EF%BC%92',
                              token)
    assert status == 400 and 'limit' in body['error']['message'], body
    # Longer than int() reads (4,300 digits): not found / invalid, not 500;
    # and without a token, 401 before the path is looked at.
    long = '9' * 5000
    for path, want in ((f'/api/rooms/{long}/messages', 404),
                       (f'/api/rooms?limit={long}', 400)):
        status, body = await http(base, 'GET', path, token)
        assert status == want, (path[:30], status, body)
    status, body = await http(base, 'POST', f'/api/rooms/{long}/messages',
                              json={'body': 'x', 'client_msg_id': 'x'})
    assert status == 401, body
    # Search names its missing parameter.
    status, body = await http(base, 'GET', '/api/search', token)
    assert status == 400 and body['error']['message'].startswith('q'), body


async def test_a_wrong_method_says_which_are_allowed(base):
    status, body = await http(base, 'PUT', '/api/rooms')
    assert status == 405 and body['error']['code'] == 'invalid'
    async with __import__('aiohttp').ClientSession() as session:
        async with session.put(base + '/api/rooms') as resp:
            assert 'GET' in resp.headers.get('Allow', ''), resp.headers


async def test_a_password_longer_than_any_stored_one_never_matches(base):
    password = 'P' * 256
    user, _ = await register(base, password=password)
    status, _ = await http(base, 'POST', '/api/login', json={
        'username': user['username'], 'password': password})
    assert status == 200
    for wrong in (password + 'wrong', password + 'P'):
        status, body = await http(base, 'POST', '/api/login', json={
            'username': user['username'], 'password': wrong})
        assert status == 401, (len(wrong), body)
    _, token = await register(base, password=password)
    status, body = await http(base, 'POST', '/api/password', token, json={
        'old_password': password + 'x', 'new_password': 'another horse'})
    assert status == 401, body
    status, body = await http(base, 'POST', '/api/password', token, json={
        'old_password': password})
    assert status == 400 and 'new_password' in body['error']['message']


async def test_a_signed_token_for_an_impossible_user_is_unauthorized(base):
    now = time.time()
    for sub in ('99999999999999999999999', '-5', '0'):
        token = jwt.encode({'sub': sub, 'iat': now, 'exp': now + 60},
                           SECRET, algorithm='HS256')
        status, body = await http(base, 'GET', '/api/me', token)
        assert status == 401 and body['error']['code'] == 'unauthorized', \
            (sub, status, body)


async def test_a_webhook_of_someone_elses_bot_is_refused_before_the_url(
        base):
    _, owner = await register(base)
    status, made = await http(base, 'POST', '/api/bots', owner,
                              json={'username': unique_name('bot')})
    assert status == 201, made
    _, stranger = await register(base)
    name = made['user']['username']
    status, body = await http(base, 'PUT', f'/api/bots/{name}/webhook',
                              stranger, json={'url': 'http://10.0.0.1/'})
    assert status == 403 and body['error']['code'] == 'forbidden', body
    status, body = await http(base, 'PUT',
                              f'/api/bots/{unique_name("nobody")}/webhook',
                              stranger, json={'url': 'http://localhost/'})
    assert status == 404 and body['error']['code'] == 'not_found', body


async def test_malformed_http_is_a_400_without_a_traceback(tmp_path):
    proc = ServerProcess(tmp_path).start()
    try:
        host = urllib.parse.urlsplit(proc.url).netloc
        for length in ('-1', 'x', '9' * 40, '5\r\nContent-Length: 6'):
            head = (f'POST /api/login HTTP/1.1\r\nHost: {host}\r\n'
                    f'Content-Length: {length}\r\n\r\n').encode()
            answer = await raw_request(proc.url, head, b'{}')
            assert answer.split(b'\r\n')[0].endswith(b' 400 Bad Request'), (
                length, answer)
        # The server goes on serving.
        status, _ = await http(proc.url, 'GET', '/healthz')
        assert status == 200
    finally:
        assert await proc.astop() == 0, proc.read_log()
    log = proc.read_log()
    assert 'Traceback' not in log and 'ERROR' not in log, log
