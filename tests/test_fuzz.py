"""Property test: random and malformed payloads at every Socket.IO event and
HTTP endpoint, authenticated and not. Every answer is an error code from the
contract (never ``internal``), no connection is dropped, nothing of another
user's leaks, and afterwards the database is consistent.

Hypothesis drives plain functions; the async clients live on one event loop
of this module, stepped with ``run_until_complete``.
"""
import asyncio
import json
import sqlite3
import urllib.parse
import uuid

import pytest
import socketio
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.helpers import NO_RATE_LIMITS, ServerProcess, connect, http, \
    register

ALLOWED = {'invalid', 'unauthorized', 'forbidden', 'not_found', 'conflict',
           'rate_limited', 'too_large', 'unavailable'}
HTTP_STATUSES = {200, 201, 400, 401, 403, 404, 409, 413, 415, 429, 503}
SECRET = 'SECRET-' + uuid.uuid4().hex
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

EVENTS = {
    'open_dm': ['username'],
    'create_group': ['name', 'members'],
    'join_room': ['room_id'],
    'leave_room': ['room_id'],
    'send_dm': ['room_id', 'to', 'body', 'client_msg_id', 'attachments',
                'reply_to'],
    'typing': ['room_id', 'typing'],
    'mark_read': ['room_id', 'seq'],
    'history': ['room_id', 'before', 'after', 'limit'],
    'rooms': [],
    'sync': ['rooms'],
    'edit_message': ['message_id', 'body'],
    'delete_message': ['message_id'],
    'react': ['message_id', 'emoji', 'on'],
    'block': ['username'],
    'unblock': ['username'],
    'presence': ['usernames'],
    'no_such_event': ['x'],
}


class World:
    """The server, the users and what the attacker knows."""


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    w = World()
    w.loop = asyncio.new_event_loop()
    w.server = ServerProcess(tmp_path_factory.mktemp('fuzz'), env={
        **NO_RATE_LIMITS, 'POSTBOX_LOGIN_FAILURES_PER_USERNAME': '1000000',
        'POSTBOX_LOGIN_FAILURES_PER_IP': '1000000'})
    w.server.start()
    w.base = w.server.url
    w.loop.run_until_complete(_setup(w))
    yield w
    w.loop.run_until_complete(w.attacker.close())
    w.loop.run_until_complete(w.peer.close())
    w.loop.close()
    assert w.server.stop() == 0, w.server.read_log()


async def _setup(w):
    base = w.base
    w.a_user, w.a_token = await register(base)
    w.b_user, w.b_token = await register(base)
    w.v_user, w.v_token = await register(base)
    w.v2_user, _ = await register(base)
    victim = await connect(base, w.v_token)
    v_room = (await victim.call('open_dm', {
        'username': w.v2_user['username']}))['room']
    v_msg = (await victim.call('send_dm', {
        'room_id': v_room['id'], 'body': SECRET,
        'client_msg_id': 'secret'}))['message']
    await victim.close()
    w.attacker = await connect(base, w.a_token)
    w.peer = await connect(base, w.b_token)
    dm = (await w.attacker.call('open_dm', {
        'username': w.b_user['username']}))['room']
    group = (await w.attacker.call('create_group', {
        'name': 'g', 'members': [w.b_user['username']]}))['room']
    mine = (await w.attacker.call('send_dm', {
        'room_id': dm['id'], 'body': 'hello', 'client_msg_id': 'a1'}))
    theirs = (await w.peer.call('send_dm', {
        'room_id': group['id'], 'body': 'hi', 'client_msg_id': 'b1'}))
    w.victim_room = v_room['id']
    w.room_ids = [dm['id'], group['id'], v_room['id'], 0, -1, 2**63]
    w.message_ids = [mine['message']['id'], theirs['message']['id'],
                     v_msg['id'], 0, -5, 10**30]
    w.usernames = [w.a_user['username'], w.b_user['username'],
                   w.v_user['username'], 'nobody_at_all', '', 'A' * 40]


junk = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=12)


def field_value(w):
    return st.one_of(
        junk, st.sampled_from(w.room_ids), st.sampled_from(w.message_ids),
        st.sampled_from(w.usernames), st.text(min_size=1, max_size=5000),
        st.lists(st.sampled_from(w.usernames), max_size=5),
        st.dictionaries(st.sampled_from([str(r) for r in w.room_ids]),
                        st.integers(min_value=-10, max_value=10**20),
                        max_size=4),
        st.sampled_from(['👍', '\u0000', 'x' * 100, True, False]))


def payloads(w, fields):
    keyed = st.fixed_dictionaries({}, optional={
        f: field_value(w) for f in fields}) if fields else st.just({})
    return st.one_of(keyed, keyed, junk)


def check_answer(w, ack):
    assert isinstance(ack, dict) and isinstance(ack.get('ok'), bool), ack
    if not ack['ok']:
        assert ack['error']['code'] in ALLOWED, ack
    text = json.dumps(ack)
    assert SECRET not in text
    room = ack.get('room') or {}
    assert room.get('id') != w.victim_room, ack
    for message in ack.get('messages', []) or []:
        assert message['room_id'] != w.victim_room, ack
    for event in ack.get('events', []) or []:
        assert event['room_id'] != w.victim_room, ack


@pytest.mark.parametrize('event', sorted(EVENTS))
def test_socket_events_survive_any_payload(world, event):
    w = world

    @FUZZ
    @given(data=st.data())
    def run(data):
        payload = data.draw(payloads(w, EVENTS[event]))
        ack = w.loop.run_until_complete(
            w.attacker.call(event, payload, timeout=20))
        check_answer(w, ack)
        assert w.attacker.sio.connected

    run()
    # Nothing of the victim's reached the attacker as a live event either.
    for name in ('message', 'message_updated', 'room', 'typing', 'read'):
        for item in w.attacker.drain(name):
            assert SECRET not in json.dumps(item)


def test_unauthenticated_connects_are_refused(world):
    w = world

    async def attempt(auth):
        sio = socketio.AsyncClient(reconnection=False)
        errors = []
        sio.on('connect_error', lambda data: errors.append(data))
        try:
            await sio.connect(w.base, auth=auth, transports=['websocket'],
                              wait_timeout=5)
        except socketio.exceptions.ConnectionError:
            return errors[0] if errors else None
        await sio.disconnect()
        return 'connected'

    @settings(FUZZ, max_examples=40)
    @given(auth=junk | st.fixed_dictionaries({'token': junk | st.text()}))
    def run(auth):
        if not isinstance(auth, dict):
            auth = {'x': auth}  # the client sends only objects as auth
        result = w.loop.run_until_complete(attempt(auth))
        assert result == {'message': 'unauthorized',
                          'data': {'code': 'unauthorized'}}

    run()


ENDPOINTS = [
    ('POST', '/api/register'), ('POST', '/api/login'), ('GET', '/api/me'),
    ('POST', '/api/bots'), ('GET', '/api/rooms'),
    ('GET', '/api/rooms/{}/messages'), ('POST', '/api/rooms/{}/messages'),
    ('POST', '/api/token/refresh'), ('POST', '/api/logout'),
    ('POST', '/api/password'), ('POST', '/api/attachments'),
    ('GET', '/api/attachments/{}'), ('GET', '/api/attachments/{}/thumbnail'),
    ('GET', '/healthz'), ('GET', '/readyz'), ('GET', '/metrics'),
]


@pytest.mark.parametrize('method,path', ENDPOINTS)
def test_http_endpoints_survive_any_input(world, method, path):
    w = world
    # Logout and password changes may revoke the token they are given:
    # give them a user of their own so the attacker's token stays valid.
    sacrificial = w.loop.run_until_complete(register(w.base))[1] \
        if path in ('/api/logout', '/api/password') else w.a_token

    @settings(FUZZ, max_examples=60)
    @given(token=st.sampled_from([sacrificial, None, 'garbage', 'a.b.c']),
           param=st.sampled_from([str(r) for r in w.room_ids])
           | st.text(max_size=20),
           body=st.one_of(junk, st.fixed_dictionaries({}, optional={
               k: field_value(w) for k in (
                   'username', 'password', 'display_name', 'body',
                   'client_msg_id', 'attachments', 'reply_to', 'all',
                   'old_password', 'new_password')})),
           raw=st.none() | st.binary(max_size=200),
           query=st.dictionaries(st.sampled_from(['before', 'after',
                                                  'limit', 'x']),
                                 st.text(max_size=10), max_size=3))
    def run(token, param, body, raw, query):
        url_path = path.format(urllib.parse.quote(param, safe=''))
        if query:
            url_path += '?' + urllib.parse.urlencode(query)
        kwargs = {'data': raw} if raw is not None else {'json': body}
        status, data = w.loop.run_until_complete(
            http(w.base, method, url_path, token=token, **kwargs))
        assert status in HTTP_STATUSES, (status, data)
        if status >= 400:
            assert isinstance(data, dict), data
            assert data['error']['code'] in ALLOWED, data
        assert SECRET not in json.dumps(data)

    run()


def test_database_is_consistent_after_fuzzing(world):
    path = world.server.data_dir / 'postbox.db'
    db = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
    try:
        rooms = db.execute('SELECT id, kind, last_seq FROM room').fetchall()
        assert rooms
        for room_id, kind, last_seq in rooms:
            seqs = [s for (s,) in db.execute(
                'SELECT seq FROM event WHERE room_id = ? ORDER BY seq',
                (room_id,))]
            assert seqs == list(range(1, last_seq + 1)), room_id
            messages = {s for (s,) in db.execute(
                'SELECT seq FROM message WHERE room_id = ?', (room_id,))}
            assert messages <= set(seqs)
            members = db.execute(
                'SELECT COUNT(*) FROM membership WHERE room_id = ?',
                (room_id,)).fetchone()[0]
            if kind == 'dm':
                assert members == 2, room_id
            else:
                assert members >= 1, room_id
        secret = db.execute('SELECT COUNT(*) FROM message WHERE body = ?',
                            (SECRET,)).fetchone()[0]
        assert secret == 1
    finally:
        db.close()
