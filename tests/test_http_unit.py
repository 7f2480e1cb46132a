"""The HTTP API in process: the app built by ``create_app`` served by
aiohttp's test server on a free port of this process (no subprocess), a
real database file under tmp_path, requests over a real socket. What a
client sees: statuses, JSON bodies and headers."""
import gc

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.config import load_config
from server.services import rooms
from server.typedefs import CTX

PASSWORD = 'correct horse battery'


@pytest.fixture
async def client(tmp_path):
    config = load_config(env={}, data_dir=str(tmp_path / 'data'))
    thresholds = gc.get_threshold()
    app = create_app(config)
    try:
        async with TestClient(TestServer(app)) as client:
            yield client
    finally:
        # The app tunes the collector for a serving process (_settle_gc).
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def register(client, username) -> dict:
    """A new account: ``{user, token, headers}``."""
    resp = await client.post('/api/register', json={
        'username': username, 'password': PASSWORD})
    assert resp.status == 201, await resp.text()
    data = await resp.json()
    data['headers'] = {'Authorization': f"Bearer {data['token']}"}
    return data


async def dm(client, alice, bob) -> int:
    """The dm room of two users (there is no HTTP route that opens one:
    clients use the ``open_dm`` event; the service is the same)."""
    room, _ = await rooms.open_dm(client.app[CTX], alice['user']['id'],
                                  bob['user']['username'])
    return room['id']


async def test_register_login_and_me(client):
    alice = await register(client, 'alice')
    resp = await client.post('/api/login', json={
        'username': 'alice', 'password': PASSWORD})
    assert resp.status == 200
    token = (await resp.json())['token']
    resp = await client.get('/api/me',
                            headers={'Authorization': f'Bearer {token}'})
    assert resp.status == 200
    assert (await resp.json())['user'] == alice['user']


async def test_errors_are_json_with_their_status(client):
    resp = await client.get('/api/me')
    assert resp.status == 401
    assert (await resp.json())['error']['code'] == 'unauthorized'
    resp = await client.post('/api/login', json={
        'username': 'nobody', 'password': PASSWORD})
    assert resp.status == 401
    resp = await client.post('/api/register', data=b'not json')
    assert resp.status == 400
    assert (await resp.json())['error'] == {
        'code': 'invalid', 'message': 'body must be JSON'}
    resp = await client.get('/api/no-such-route')
    assert resp.status == 404
    assert (await resp.json())['error']['code'] == 'not_found'


async def test_every_response_has_the_security_headers(client):
    for path in ('/api/me', '/healthz', '/'):
        resp = await client.get(path)
        assert resp.headers['X-Content-Type-Options'] == 'nosniff'
        assert resp.headers['X-Frame-Options'] == 'DENY'
        assert 'Content-Security-Policy' in resp.headers
        assert resp.headers['X-Request-Id']


async def test_send_then_history_and_inbox(client):
    alice, bob = await register(client, 'alice'), await register(client, 'bob')
    room_id = await dm(client, alice, bob)
    body = {'body': 'hello bob', 'client_msg_id': 'c1'}
    resp = await client.post(f'/api/rooms/{room_id}/messages', json=body,
                             headers=alice['headers'])
    assert resp.status == 201
    message = (await resp.json())['message']
    assert message['body'] == 'hello bob' and message['seq'] >= 1
    # The same client_msg_id again: the stored message, not a second one.
    resp = await client.post(f'/api/rooms/{room_id}/messages', json=body,
                             headers=alice['headers'])
    assert resp.status == 200
    assert (await resp.json())['message']['id'] == message['id']
    resp = await client.get(f'/api/rooms/{room_id}/messages',
                            headers=bob['headers'])
    assert resp.status == 200
    history = await resp.json()
    assert [m['id'] for m in history['messages']] == [message['id']]
    resp = await client.get('/api/rooms', headers=bob['headers'])
    inbox = (await resp.json())['rooms']
    assert [(r['room']['id'], r['unread'], r['last_message']['body'])
            for r in inbox] == [(room_id, 1, 'hello bob')]


async def test_strangers_and_bad_ids(client):
    alice, bob = await register(client, 'alice'), await register(client, 'bob')
    carol = await register(client, 'carol')
    room_id = await dm(client, alice, bob)
    resp = await client.get(f'/api/rooms/{room_id}/messages',
                            headers=carol['headers'])
    assert resp.status in (403, 404)
    resp = await client.post(f'/api/rooms/{room_id}/messages', json={
        'body': 'let me in', 'client_msg_id': 'x'}, headers=carol['headers'])
    assert resp.status in (403, 404)
    for bad in ('abc', '0', str(2**63)):
        resp = await client.get(f'/api/rooms/{bad}/messages',
                                headers=alice['headers'])
        assert resp.status == 404, bad
    resp = await client.get(f'/api/rooms/{room_id}/messages?limit=x',
                            headers=alice['headers'])
    assert resp.status == 400
    assert (await resp.json())['error']['message'] == \
        'limit must be an integer'


async def test_logout_everywhere_revokes_the_token(client):
    alice = await register(client, 'alice')
    resp = await client.post('/api/logout', json={'all': True},
                             headers=alice['headers'])
    assert resp.status == 200
    resp = await client.get('/api/me', headers=alice['headers'])
    assert resp.status == 401


async def test_health_readiness_and_vapid_key(client):
    resp = await client.get('/healthz')
    assert resp.status == 200
    resp = await client.get('/readyz')
    assert resp.status == 200
    alice = await register(client, 'alice')
    resp = await client.get('/api/push/vapid', headers=alice['headers'])
    assert resp.status == 200
    assert len((await resp.json())['public_key']) == 87  # 65 bytes, base64url


async def test_metrics_count_requests_by_route(client):
    await client.get('/api/me')
    resp = await client.get('/metrics')
    assert resp.status == 200
    text = await resp.text()
    assert any(line.startswith('postbox_http_requests_total{') and
               '"/api/me"' in line and '"401"' in line
               for line in text.splitlines()), text[:2000]


async def test_odd_bodies_are_invalid_never_internal(client):
    """Bodies a hostile or sloppy client sends: a clean 400 ``invalid``
    each, and JSON read as UTF-8 whatever charset the Content-Type names
    (an unknown charset and an attachment id past 64 bits were 500s with a
    traceback)."""
    alice = await register(client, 'alice')
    bob = await register(client, 'bob')
    room = await dm(client, alice, bob)
    url = f'/api/rooms/{room}/messages'

    async def post(body, content_type='application/json'):
        return await client.post(url, data=body, headers={
            'Content-Type': content_type, **alice['headers']})

    resp = await post('{"body": "h\u00e9", "client_msg_id": "c1"}'.encode(),
                      'application/json; charset=no-such-charset')
    assert resp.status == 201, await resp.text()
    assert (await resp.json())['message']['body'] == 'h\u00e9'
    for body in (
            b'{"body": "hi", "client_msg_id": "c2", '
            b'"attachments": [9223372036854775808]}',
            b'{"body": "hi", "client_msg_id": "c3", "attachments": [0]}',
            b'{"body": NaN, "client_msg_id": "c4"}',
            b'{"body": "\\ud800", "client_msg_id": "c5"}',
            b'\xff\xfe{}',
            b'{"body": "hi", "client_msg_id": "c6", '
            b'"reply_to": 123456789012345678901234567890}'):
        resp = await post(body)
        assert resp.status == 400, (body, await resp.text())
        assert (await resp.json())['error']['code'] == 'invalid', body
