"""Property test: random and malformed payloads at every Socket.IO event and
HTTP endpoint, authenticated and not. Every answer is an error code from the
contract (never ``internal``), no connection is dropped, nothing of another
user's leaks, and afterwards the database is consistent.

Below the client library too: raw Engine.IO and Socket.IO frames over a
websocket and over long-polling (binary frames, malformed and oversized
packets, packets out of order). The server answers or closes that session
and nothing else: its memory stays bounded, its log has no traceback, and
a normal client is served afterwards.

Hypothesis drives plain functions; the async clients live on one event loop
of this module, stepped with ``run_until_complete``.
"""
import asyncio
import base64
import json
import sqlite3
import urllib.parse
import uuid

import aiohttp
import pytest
import socketio
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.kit import (NO_RATE_LIMITS, ServerProcess, connect, http, register,
                       rss_kib)

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
    # v2 (answered invalid as unknown events where not served yet).
    'add_members': ['room_id', 'members'],
    'remove_member': ['room_id', 'username'],
    'leave_group': ['room_id'],
    'rename_group': ['room_id', 'name'],
    'search': ['query', 'room_id', 'before', 'limit'],
    'mute_room': ['room_id', 'muted'],
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
    for message in ack.get('results', []) or []:
        assert message['room_id'] != w.victim_room, ack


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
    ('POST', '/api/messages'),
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
                   'room_id', 'to',
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
            # Every seq is a new message's or in the event log, never
            # both: together they are 1..last_seq, without a gap.
            events = [s for (s,) in db.execute(
                'SELECT seq FROM event WHERE room_id = ? AND NOT '
                '(seq = 0 AND kind = \'room\')', (room_id,))]
            messages = [s for (s,) in db.execute(
                'SELECT seq FROM message WHERE room_id = ?', (room_id,))]
            assert sorted(events + messages) == list(
                range(1, last_seq + 1)), room_id
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


# Raw frames. A session gets a few hostile frames, then a probe event
# (ack id PROBE): it must answer the probe or be closed, within a timeout,
# whatever came before.

PROBE = 777777
PROBE_FRAME = f'42{PROBE}["ping",{{}}]'
# Frames out of protocol order, or not Socket.IO at all: Engine.IO packets
# a client never sends or sends only during an upgrade, Socket.IO packet
# types it never sends, a second CONNECT, an ack for an unknown id, events
# named after lifecycle events, binary packets with silly attachment
# counts, a payload nested past any limit.
ODD_FRAMES = [
    '0', '1', '2', '2probe', '3probe', '5', '6', '4', '40', '40/other,',
    '40{"token":"forged"}', '41', '41/other,', '43', '4312345[{}]',
    '44{"message":"x"}', '4abc', '42{}', '42[]', '42abc["ping",{}]',
    '42["connect",{},{"token":"x"}]', '42["disconnect"]', '47', '4[1]',
    '4true', '4{"a":1}', '451234567-["ping",{"_placeholder":true,"num":0}]',
    '4699999999-1[{"_placeholder":true,"num":0}]', '45-["x"]',
    '42["ping",' + '[' * 3000 + ']' * 3000 + ']', 'b', 'bAAEC', 'x', '',
]
# Over max_payload_bytes (1 MB), and just under it.
OVERSIZED = '42["ping","' + 'x' * 1_100_000 + '"]'
BIG_BINARY = b'\x00' * 999_000
V2_EVENTS = ['add_members', 'remove_member', 'leave_group', 'rename_group',
             'search', 'mute_room']


def raw_frames(w):
    names = st.sampled_from(sorted(EVENTS) + ['connect', 'disconnect', ''])
    event = st.builds(
        lambda ack, name, payload: f'42{ack}' + json.dumps([name, payload]),
        st.sampled_from(['', '1', '99']), names,
        payloads(w, ['room_id', 'members', 'username', 'name', 'query',
                     'muted', 'body', 'before', 'limit']))
    prefixed = st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(['0', '1', '2', '3', '4', '5', '6', '40', '41', '42',
                         '43', '44', '45', '46', '451-', '461-1', '42/x,',
                         'b']),
        st.text(max_size=40))
    return st.one_of(
        st.sampled_from(ODD_FRAMES), event, prefixed,
        st.binary(max_size=100), st.sampled_from([OVERSIZED, BIG_BINARY]))


async def _websocket_session(w, session, login, frames):
    """One websocket session: optionally logged in, then ``frames``, then
    the probe. Returns 'answered' or 'closed'."""
    ws = await session.ws_connect(
        w.base + '/socket.io/?EIO=4&transport=websocket', max_msg_size=0)
    try:
        assert (await ws.receive_str(timeout=10)).startswith('0')
        if login:
            await ws.send_str('40' + json.dumps({'token': w.a_token}))
        for frame in frames:
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
        await ws.send_str(PROBE_FRAME)
        while True:
            msg = await ws.receive(timeout=20)
            if msg.type != aiohttp.WSMsgType.TEXT:
                assert msg.type in (aiohttp.WSMsgType.CLOSE,
                                    aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING), msg
                return 'closed'
            if msg.data == '2':
                await ws.send_str('3')
            elif msg.data.startswith(f'43{PROBE}['):
                assert json.loads(msg.data[2 + len(str(PROBE)):]) == \
                    [{'ok': True}], msg.data
                return 'answered'
    except ConnectionError:
        # Closed while we were still sending: a frame over the size limit
        # closes the session at once, and the rest of a large frame then
        # meets a connection already gone ("Connection lost", a plain
        # ConnectionError, besides the resets).
        return 'closed'
    finally:
        await ws.close()


async def _polling_session(w, session, login, frames):
    """The same over long-polling: the frames and the probe in one POST
    (binary frames base64-encoded, as polling clients send them), then
    polls until the probe's answer or the end of the session."""
    endpoint = w.base + '/socket.io/?EIO=4&transport=polling'
    timeout = aiohttp.ClientTimeout(total=60)
    async with session.get(endpoint, timeout=timeout) as resp:
        assert resp.status == 200
        url = f'{endpoint}&sid=' + json.loads((await resp.text())[1:])['sid']
    packets = ['40' + json.dumps({'token': w.a_token})] if login else []
    packets += ['b' + base64.b64encode(f).decode() if isinstance(f, bytes)
                else f for f in frames]
    async with session.post(url, data='\x1e'.join(packets + [PROBE_FRAME]),
                            timeout=timeout) as resp:
        # 413: past max_payload_bytes (the session is closed).
        assert resp.status in (200, 400, 413), resp.status
    for _ in range(10):
        async with session.get(url, timeout=timeout) as resp:
            if resp.status == 400:
                return 'closed'
            assert resp.status == 200, resp.status
            answers = (await resp.text()).split('\x1e')
        for answer in answers:
            if answer.startswith(f'43{PROBE}['):
                assert json.loads(answer[2 + len(str(PROBE)):]) == \
                    [{'ok': True}], answer
                # Goodbye (Engine.IO CLOSE), so that sessions do not pile
                # up against the user's connection limit.
                async with session.post(url, data='1', timeout=timeout):
                    pass
                return 'answered'
        if '1' in answers:
            return 'closed'
    raise AssertionError('the session neither answered nor closed')


@pytest.mark.parametrize('transport', ['websocket', 'polling'])
def test_raw_frames_leave_the_server_sound(world, transport):
    w = world
    run_session = _websocket_session if transport == 'websocket' \
        else _polling_session
    outcomes = []

    async def session_with(login, frames):
        async with aiohttp.ClientSession() as session:
            return await run_session(w, session, login, frames)

    before = rss_kib(w.server.pid)
    log_start = len(w.server.read_log())

    @settings(FUZZ, max_examples=150)
    @given(login=st.booleans(),
           frames=st.lists(raw_frames(w), max_size=6))
    def run(login, frames):
        outcomes.append(w.loop.run_until_complete(
            session_with(login, frames)))

    run()
    # A burst of the worst: binary frames near max_payload_bytes after a
    # binary header that announces more attachments than will ever come
    # (a polling POST carries one, base64-encoded within the limit).
    header = '451234567-["send_dm",{"_placeholder":true,"num":0}]'
    bursts = [[header] + [BIG_BINARY] * 20] * 3 if transport == 'websocket' \
        else [[header, BIG_BINARY[:700_000]]] * 60
    for frames in bursts:
        outcomes.append(w.loop.run_until_complete(session_with(True, frames)))
        assert outcomes[-1] == 'answered'
    assert 'answered' in outcomes and 'closed' in outcomes
    grown_mib = (rss_kib(w.server.pid) - before) / 1024
    assert grown_mib < 30, f'server memory grew {grown_mib:.0f} MiB'
    log = w.server.read_log()[log_start:]
    assert 'Traceback' not in log, log
    # The server still serves a normal client, and the attacker's own
    # long-lived connection.
    assert (w.loop.run_until_complete(w.attacker.call('ping', {})))['ok']
    assert (w.loop.run_until_complete(w.peer.call('rooms', {})))['ok']


def test_deeply_nested_http_bodies_are_invalid(world):
    """JSON too deep for the parser, or past json_max_depth, is a 400
    invalid like any bad body (it was a 500 with a traceback)."""
    w = world
    log_start = len(w.server.read_log())
    for body in ('[' * 100_000, '{"username":' + '[' * 40 + ']' * 40 + '}'):
        for path in ('/api/login', '/api/register'):
            status, data = w.loop.run_until_complete(http(
                w.base, 'POST', path, data=body,
                headers={'Content-Type': 'application/json'}))
            assert status == 400, (path, status, data)
            assert data['error']['code'] == 'invalid', data
    assert 'Traceback' not in w.server.read_log()[log_start:]
