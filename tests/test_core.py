"""The core DM server over real sockets: auth, rooms, messages, typing,
read markers, history, inbox, HTTP API and bad input."""
import asyncio
import time

import jwt
import pytest

from tests.kit import (connect, dm_across, http, pair, refused, register,
                       unique_name)



# -- accounts ------------------------------------------------------------

async def test_register_login_me(base):
    name = unique_name('Case')
    status, data = await http(base, 'POST', '/api/register', json={
        'username': name, 'password': 'hunter22!', 'display_name': 'Ada'})
    assert status == 201
    assert data['user']['username'] == name.lower()  # folded
    assert data['user']['display_name'] == 'Ada'
    assert data['user']['is_bot'] is False
    status, again = await http(base, 'POST', '/api/register', json={
        'username': name.upper(), 'password': 'hunter22!'})
    assert status == 409 and again['error']['code'] == 'conflict'
    status, login = await http(base, 'POST', '/api/login', json={
        'username': name.upper(), 'password': 'hunter22!'})
    assert status == 200 and login['user']['id'] == data['user']['id']
    status, me = await http(base, 'GET', '/api/me', token=login['token'])
    assert status == 200 and me['user'] == data['user']
    claims = jwt.decode(login['token'], options={'verify_signature': False})
    assert claims['sub'] == str(data['user']['id']) and 'exp' in claims


@pytest.mark.parametrize('body', [
    {'username': 'ab', 'password': 'password1'},
    {'username': 'bad name!', 'password': 'password1'},
    {'username': 'x' * 33, 'password': 'password1'},
    {'username': 'okname', 'password': 'short'},
    {'username': 'okname', 'password': 'p' * 257},
    {'username': 5, 'password': 'password1'},
    {'password': 'password1'},
])
async def test_register_invalid(base, body):
    status, data = await http(base, 'POST', '/api/register', json=body)
    assert status == 400 and data['error']['code'] == 'invalid'


async def test_register_not_json(base):
    status, data = await http(base, 'POST', '/api/register', data=b'{nope',
                              headers={'Content-Type': 'application/json'})
    assert status == 400 and data['error']['code'] == 'invalid'


async def test_login_wrong_password_and_unknown_user(base):
    user, _ = await register(base)
    for name, pw in ((user['username'], 'wrong password'),
                     (unique_name(), 'whatever1')):
        status, data = await http(base, 'POST', '/api/login',
                                  json={'username': name, 'password': pw})
        assert status == 401 and data['error']['code'] == 'unauthorized'


async def test_bots(base):
    owner, token = await register(base)
    name = unique_name('bot')
    status, data = await http(base, 'POST', '/api/bots', token=token,
                              json={'username': name})
    assert status == 201 and data['user']['is_bot'] is True
    bot = await connect(base, data['token'])
    ack = await bot.call('open_dm', {'username': owner['username']})
    assert ack['ok'] and ack['room']['kind'] == 'dm'
    status, _ = await http(base, 'POST', '/api/bots', json={'username': 'x1x'})
    assert status == 401
    await bot.close()


@pytest.mark.parametrize('token', [None, '', 'garbage', 'a.b.c'])
async def test_connect_refused_without_valid_token(base, token):
    assert await refused(base, token) == {
        'message': 'unauthorized', 'data': {'code': 'unauthorized'}}



async def test_connect_refused_with_expired_or_forged_token(base, server):
    user, _ = await register(base)
    now = int(time.time())
    expired = jwt.encode({'sub': str(user['id']), 'iat': now - 100,
                          'exp': now - 10}, server.env['POSTBOX_SECRET'],
                         algorithm='HS256')
    forged = jwt.encode({'sub': str(user['id']), 'iat': now,
                         'exp': now + 100}, 'another secret' * 3,
                        algorithm='HS256')
    for token in (expired, forged):
        assert (await refused(base, token))['message'] == 'unauthorized'
        status, data = await http(base, 'GET', '/api/me', token=token)
        assert status == 401 and data['error']['code'] == 'unauthorized'


async def test_a_token_that_worked_is_refused_once_it_expires(base, server):
    """Verified tokens are remembered (the signature is not checked again
    on every request); their expiry still is."""
    user, _ = await register(base)
    now = time.time()
    short = jwt.encode({'sub': str(user['id']), 'iat': now,
                        'exp': int(now) + 2}, server.env['POSTBOX_SECRET'],
                       algorithm='HS256')
    status, data = await http(base, 'GET', '/api/me', token=short)
    assert status == 200 and data['user']['id'] == user['id']
    while time.time() < int(now) + 2.2:
        await asyncio.sleep(0.2)
    status, data = await http(base, 'GET', '/api/me', token=short)
    assert status == 401 and data['error']['code'] == 'unauthorized'
    assert (await refused(base, short))['message'] == 'unauthorized'


# -- rooms -----------------------------------------------------------------

async def test_same_dm_room_from_both_sides(base):
    alice, bob, a, b, room = await pair(base)
    assert room['kind'] == 'dm' and room['name'] is None
    assert {m['id'] for m in room['members']} == {alice['id'], bob['id']}
    again = await b.call('open_dm', {'username': alice['username']})
    assert again['room']['id'] == room['id']
    # Both members got the `room` event once, when it was created.
    assert (await a.next('room'))['id'] == room['id']
    assert (await b.next('room'))['id'] == room['id']
    await b.nothing('room', 0.3)
    await a.close()
    await b.close()


async def test_open_dm_errors(base):
    alice, ta = await register(base)
    a = await connect(base, ta)
    ack = await a.call('open_dm', {'username': alice['username']})
    assert ack['error']['code'] == 'invalid'
    ack = await a.call('open_dm', {'username': unique_name()})
    assert ack['error']['code'] == 'not_found'
    ack = await a.call('open_dm', {})
    assert ack['error']['code'] == 'invalid'
    await a.close()


async def test_group_room(base):
    users = [await register(base) for _ in range(3)]
    clients = [await connect(base, t) for _, t in users]
    ack = await clients[0].call('create_group', {
        'name': 'Trip', 'members': [u['username'] for u, _ in users[1:]]})
    assert ack['ok'] and ack['room']['kind'] == 'group'
    room = ack['room']
    assert room['name'] == 'Trip' and len(room['members']) == 3
    for c in clients:
        assert (await c.next('room'))['id'] == room['id']
    ack = await clients[1].call('send_dm', {
        'room_id': room['id'], 'body': 'hello all', 'client_msg_id': 'g1'})
    assert ack['ok']
    for c in clients:
        assert (await c.next('message'))['body'] == 'hello all'
    bad = await clients[0].call('create_group', {
        'name': 'X', 'members': [unique_name()]})
    assert bad['error']['code'] == 'not_found'
    bad = await clients[0].call('create_group', {'name': '', 'members': []})
    assert bad['error']['code'] == 'invalid'
    for c in clients:
        await c.close()


# -- messages --------------------------------------------------------------

async def test_message_shape_and_delivery_to_all_sockets(base):
    alice, bob, a, b, room = await pair(base)
    _, ta = await register(base)  # unrelated user gets nothing
    a2 = await connect(base, a.token)  # alice's second tab
    stranger = await connect(base, ta)
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'hi bob',
                                   'client_msg_id': 'm-1'})
    assert ack['ok']
    msg = ack['message']
    assert msg['seq'] == 1 and msg['room_id'] == room['id']
    assert msg['sender']['id'] == alice['id']
    assert msg['body'] == 'hi bob' and msg['client_msg_id'] == 'm-1'
    assert msg['attachments'] == [] and msg['reply_to'] is None
    assert msg['deleted'] is False and msg['reactions'] == {}
    assert msg['edited_at'] is None
    assert msg['created_at'].endswith('Z') and len(msg['created_at']) == 24
    for c in (a, a2, b):  # sender's sockets included
        got = await c.next('message')
        assert got['id'] == msg['id'] and got['body'] == 'hi bob'
    await stranger.nothing('message', 0.3)
    for c in (a, a2, b, stranger):
        await c.close()


async def test_send_to_username_opens_dm(base):
    # The new room and the message reach bob without any join.
    _, _, a, b, _ = await dm_across(base, base)
    await a.close()
    await b.close()


async def test_seq_has_no_gaps_under_concurrent_sends(loaded):
    base = loaded.url
    alice, bob, a, b, room = await pair(base)
    acks = await asyncio.gather(*[
        (a if i % 2 else b).call('send_dm', {
            'room_id': room['id'], 'body': f'm{i}', 'client_msg_id': f'c{i}'})
        for i in range(50)])
    assert all(x['ok'] for x in acks), acks
    assert sorted(x['message']['seq'] for x in acks) == list(range(1, 51))
    hist = await a.call('history', {'room_id': room['id'], 'limit': 100})
    assert [m['seq'] for m in hist['messages']] == list(range(1, 51))
    await a.close()
    await b.close()


async def test_body_limits(base):
    alice, bob, a, b, room = await pair(base)
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'x' * 4001,
                                   'client_msg_id': 'big'})
    assert ack['error']['code'] == 'too_large'
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'x' * 4000,
                                   'client_msg_id': 'max'})
    assert ack['ok']
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': '',
                                   'client_msg_id': 'empty'})
    assert ack['error']['code'] == 'invalid'
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'x',
                                   'client_msg_id': 'c' * 65})
    assert ack['error']['code'] == 'invalid'
    await a.close()
    await b.close()


async def test_non_members_refused(base):
    alice, bob, a, b, room = await pair(base)
    _, tc = await register(base)
    c = await connect(base, tc)
    sent = await a.call('send_dm', {'room_id': room['id'], 'body': 'secret',
                                    'client_msg_id': 's'})
    for event, data in [
            ('send_dm', {'room_id': room['id'], 'body': 'x',
                         'client_msg_id': 'y'}),
            ('join_room', {'room_id': room['id']}),
            ('history', {'room_id': room['id']}),
            ('typing', {'room_id': room['id'], 'typing': True}),
            ('mark_read', {'room_id': room['id'], 'seq': 1}),
            ('edit_message', {'message_id': sent['message']['id'],
                              'body': 'hacked'}),
            ('react', {'message_id': sent['message']['id'], 'emoji': '👍',
                       'on': True})]:
        ack = await c.call(event, data)
        assert ack['ok'] is False, (event, ack)
        assert ack['error']['code'] in ('forbidden', 'not_found'), ack
        assert 'secret' not in str(ack)
    ack = await c.call('sync', {'rooms': {}})
    assert ack['ok'] and ack['events'] == []
    # Room ids no room can have (past 64 bits, zero, negative) are nobody's.
    ack = await c.call('sync', {'rooms': {str(2 ** 63): 0, '0': 0, '-1': 3,
                                          str(room['id']): 0}})
    assert ack['ok'] and ack['events'] == [], ack
    ack = await c.call('join_room', {'room_id': 10 ** 9})
    assert ack['error']['code'] == 'not_found'
    status, data = await http(base, 'GET',
                              f'/api/rooms/{room["id"]}/messages',
                              token=tc)
    assert status in (403, 404) and 'secret' not in str(data)
    for x in (a, b, c):
        await x.close()


BAD_PAYLOADS = [
    ('send_dm', None), ('send_dm', 'text'), ('send_dm', [1, 2]),
    ('send_dm', {}), ('send_dm', {'room_id': 'one', 'body': 'x',
                                  'client_msg_id': 'a'}),
    ('send_dm', {'room_id': True, 'body': 'x', 'client_msg_id': 'a'}),
    ('send_dm', {'room_id': 1, 'body': 5, 'client_msg_id': 'a'}),
    ('send_dm', {'room_id': 1, 'body': 'x'}),
    ('send_dm', {'room_id': 1, 'to': 'bob', 'body': 'x',
                 'client_msg_id': 'a'}),
    ('send_dm', {'room_id': 1, 'body': 'x', 'client_msg_id': 'a',
                 'attachments': 'nope'}),
    ('open_dm', {'username': None}), ('open_dm', 42),
    ('create_group', {'name': 'x', 'members': 'bob'}),
    ('join_room', {'room_id': None}), ('join_room', {'room_id': 1.5}),
    ('leave_room', {}), ('typing', {'room_id': 1}),
    ('mark_read', {'room_id': 1, 'seq': -1}),
    ('mark_read', {'room_id': 1, 'seq': 'x'}),
    ('history', {'room_id': 1, 'limit': 0}),
    ('history', {'room_id': 1, 'limit': 101}),
    ('history', {'room_id': 1, 'before': 'x'}),
    ('sync', {'rooms': [1, 2]}), ('sync', {'rooms': {'abc': 1}}),
    ('sync', {'rooms': {'1': 'x'}}),
    ('edit_message', {'message_id': 'x', 'body': 'y'}),
    ('delete_message', {}), ('react', {'message_id': 1, 'emoji': 5}),
    ('block', {'username': 7}), ('presence', {'usernames': 'bob'}),
    ('no_such_event', {}),
]


async def test_bad_payloads_get_error_acks_and_socket_survives(base):
    alice, bob, a, b, room = await pair(base)
    for event, data in BAD_PAYLOADS:
        ack = await a.call(event, data) if data is not None else \
            await a.sio.call(event, timeout=5)
        assert ack['ok'] is False, (event, data, ack)
        assert ack['error']['code'] in ('invalid', 'not_found', 'forbidden',
                                        'too_large'), (event, data, ack)
        assert ack['error']['message']
    # The connection still works.
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'still here',
                                   'client_msg_id': 'after-bad'})
    assert ack['ok'] and a.sio.connected
    assert (await b.next('message'))['body'] == 'still here'
    await a.close()
    await b.close()


async def test_rate_limited_sends(base):
    alice, bob, a, b, room = await pair(base)
    acks = await asyncio.gather(*[a.call('send_dm', {
        'room_id': room['id'], 'body': 'spam', 'client_msg_id': f'r{i}'})
        for i in range(60)])
    limited = [x for x in acks if not x['ok']]
    assert limited, 'the default burst is 30: some of 60 must be refused'
    assert all(x['error']['code'] == 'rate_limited' for x in limited)
    assert all(x['error']['retry_after'] > 0 for x in limited)
    assert sum(x['ok'] for x in acks) >= 30
    await a.close()
    await b.close()


# -- typing, reading, history, inbox ----------------------------------------

async def test_typing_reaches_joined_sockets_not_the_typist(base):
    alice, bob, a, b, room = await pair(base)
    a2 = await connect(base, a.token)
    b_unjoined = await connect(base, b.token)
    for c in (a, a2, b):
        assert (await c.call('join_room', {'room_id': room['id']}))['ok']
    assert (await a.call('typing', {'room_id': room['id'],
                                    'typing': True}))['ok']
    got = await b.next('typing')
    assert got == {'room_id': room['id'], 'user': alice, 'typing': True}
    await a2.nothing('typing', 0.3)
    await b_unjoined.nothing('typing', 0.1)
    # Sending a message ends the typing.
    await a.call('send_dm', {'room_id': room['id'], 'body': 'done',
                             'client_msg_id': 't1'})
    got = await b.next('typing')
    assert got['typing'] is False and got['user']['id'] == alice['id']
    # Typing again, then disconnecting, also ends it.
    await a.call('typing', {'room_id': room['id'], 'typing': True})
    assert (await b.next('typing'))['typing'] is True
    await a.close()
    got = await b.next('typing')
    assert got['typing'] is False
    # After leave_room, no more typing events.
    await b.call('leave_room', {'room_id': room['id']})
    await a2.call('typing', {'room_id': room['id'], 'typing': True})
    await b.nothing('typing', 0.3)
    for c in (a2, b, b_unjoined):
        await c.close()


async def test_typing_stops_when_the_typist_sends_over_http(base):
    """The message ends the typing whatever transport sent it."""
    alice, bob, a, b, room = await pair(base)
    for c in (a, b):
        assert (await c.call('join_room', {'room_id': room['id']}))['ok']
    assert (await a.call('typing', {'room_id': room['id'],
                                    'typing': True}))['ok']
    assert (await b.next('typing'))['typing'] is True
    status, sent = await http(base, 'POST',
                              f'/api/rooms/{room["id"]}/messages',
                              token=a.token,
                              json={'body': 'over http', 'client_msg_id': 'h1'})
    assert status == 201, sent
    assert (await b.next('message'))['body'] == 'over http'
    got = await b.next('typing')
    assert got == {'room_id': room['id'], 'user': alice, 'typing': False}
    # A retry of the same message does not say it again.
    status, _ = await http(base, 'POST', f'/api/rooms/{room["id"]}/messages',
                           token=a.token,
                           json={'body': 'over http', 'client_msg_id': 'h1'})
    assert status == 200
    await b.nothing('typing', 0.3)
    await a.close()
    await b.close()


async def test_reading_on_one_device_clears_unread_on_the_others(base):
    alice, bob, a, b, room = await pair(base)
    b_phone = await connect(base, b.token)
    for i in range(2):
        await a.call('send_dm', {'room_id': room['id'], 'body': f'm{i}',
                                 'client_msg_id': f'd{i}'})
    await a.call('join_room', {'room_id': room['id']})
    assert (await b.call('join_room', {'room_id': room['id']}))['ok']
    ack = await b.call('mark_read', {'room_id': room['id'], 'seq': 1})
    # One unread of the room's 2 messages: a client counts only messages
    # above last_seq as new.
    assert (ack['unread'], ack['seq'], ack['last_seq']) == (1, 1, 2)
    mine = {'room_id': room['id'], 'user_id': bob['id'], 'seq': 1,
            'unread': 1, 'last_seq': 2}
    # Bob's phone never joined the room, and hears it with his count; his
    # reading socket (joined) hears it once.
    assert await b_phone.next('read') == mine
    assert await b.next('read') == mine
    await b.nothing('read', 0.3)
    # Alice hears the marker, never bob's count.
    assert await a.next('read') == {'room_id': room['id'],
                                    'user_id': bob['id'], 'seq': 1}
    # Muting is bob's on every device too.
    assert (await b_phone.call('mute_room', {'room_id': room['id'],
                                             'muted': True}))['ok']
    for client in (b, b_phone):
        assert await client.next('muted') == {'room_id': room['id'],
                                              'muted': True}
    await a.nothing('muted', 0.3)
    for client in (a, b, b_phone):
        await client.close()


async def test_unread_and_mark_read(base):
    alice, bob, a, b, room = await pair(base)
    for i in range(3):
        await a.call('send_dm', {'room_id': room['id'], 'body': f'm{i}',
                                 'client_msg_id': f'u{i}'})
    await b.call('send_dm', {'room_id': room['id'], 'body': 'mine',
                             'client_msg_id': 'own'})
    inbox = (await b.call('rooms', {}))['rooms']
    entry = next(r for r in inbox if r['room']['id'] == room['id'])
    assert entry['unread'] == 3 and entry['last_read_seq'] == 0
    assert entry['last_message']['body'] == 'mine'
    assert entry['room']['last_seq'] == 4
    await a.call('join_room', {'room_id': room['id']})
    ack = await b.call('mark_read', {'room_id': room['id'], 'seq': 2})
    assert ack['ok'] and ack['unread'] == 1
    read = await a.next('read')
    assert read == {'room_id': room['id'], 'user_id': bob['id'], 'seq': 2}
    assert await b.next('read') == {**read, 'unread': 1, 'last_seq': 4}
    ack = await b.call('mark_read', {'room_id': room['id'], 'seq': 1})
    assert ack['unread'] == 1  # never moves back
    ack = await b.call('mark_read', {'room_id': room['id'], 'seq': 999})
    assert ack['unread'] == 0
    joined = await a.call('join_room', {'room_id': room['id']})
    assert joined['read'][str(bob['id'])] == 4
    # Alice's own three messages are never unread to her: only bob's one.
    inbox = (await a.call('rooms', {}))['rooms']
    assert next(r for r in inbox if r['room']['id'] == room['id'])[
        'unread'] == 1
    await a.close()
    await b.close()


async def test_history_paging(loaded):
    base = loaded.url
    alice, bob, a, b, room = await pair(base)
    for i in range(1, 121):
        assert (await a.call('send_dm', {
            'room_id': room['id'], 'body': f'n{i}',
            'client_msg_id': f'h{i}'}))['ok']
    joined = await b.call('join_room', {'room_id': room['id']})
    assert [m['seq'] for m in joined['messages']] == list(range(71, 121))
    assert joined['room']['last_seq'] == 120
    page = await b.call('history', {'room_id': room['id'], 'before': 71})
    assert [m['seq'] for m in page['messages']] == list(range(21, 71))
    assert page['has_more'] is True
    page = await b.call('history', {'room_id': room['id'], 'before': 21})
    assert [m['seq'] for m in page['messages']] == list(range(1, 21))
    assert page['has_more'] is False
    page = await b.call('history', {'room_id': room['id'], 'after': 100,
                                    'limit': 10})
    assert [m['seq'] for m in page['messages']] == list(range(101, 111))
    assert page['has_more'] is True
    page = await b.call('history', {'room_id': room['id'], 'after': 110})
    assert page['has_more'] is False and len(page['messages']) == 10
    await a.close()
    await b.close()


async def test_inbox_orders_by_latest_activity(base):
    me, tm = await register(base)
    others = [await register(base) for _ in range(3)]
    c = await connect(base, tm)
    rooms = []
    for other, _ in others:
        rooms.append((await c.call('open_dm', {
            'username': other['username']}))['room'])
    await c.call('send_dm', {'room_id': rooms[1]['id'], 'body': 'latest',
                             'client_msg_id': 'i1'})
    inbox = (await c.call('rooms', {}))['rooms']
    assert [r['room']['id'] for r in inbox][0] == rooms[1]['id']
    assert len(inbox) == 3
    await c.close()


# -- HTTP API ------------------------------------------------------------

async def test_http_api(base):
    alice, bob, a, b, room = await pair(base)
    status, data = await http(base, 'POST',
                              f'/api/rooms/{room["id"]}/messages',
                              token=a.token, json={'body': 'from a script',
                                                   'client_msg_id': 'h-1'})
    assert status == 201 and data['message']['seq'] == 1
    live = await b.next('message')  # delivered live
    assert live['body'] == 'from a script'
    status, again = await http(base, 'POST',
                               f'/api/rooms/{room["id"]}/messages',
                               token=a.token, json={'body': 'from a script',
                                                    'client_msg_id': 'h-1'})
    assert again['message']['id'] == data['message']['id']
    await b.nothing('message', 0.3)
    status, data = await http(base, 'GET', '/api/rooms', token=b.token)
    assert status == 200 and data['rooms'][0]['room']['id'] == room['id']
    status, data = await http(base, 'GET',
                              f'/api/rooms/{room["id"]}/messages?limit=5',
                              token=b.token)
    assert status == 200 and data['messages'][0]['body'] == 'from a script'
    assert data['has_more'] is False
    status, data = await http(base, 'GET',
                              f'/api/rooms/{room["id"]}/messages?limit=x',
                              token=b.token)
    assert status == 400 and data['error']['code'] == 'invalid'
    status, data = await http(base, 'POST',
                              f'/api/rooms/{room["id"]}/messages',
                              token=b.token, json={'body': 'x' * 5000,
                                                   'client_msg_id': 'big'})
    assert status == 413 and data['error']['code'] == 'too_large'
    status, data = await http(base, 'GET', '/api/rooms')
    assert status == 401 and data['error']['code'] == 'unauthorized'
    status, data = await http(base, 'GET', '/api/nothing/here')
    assert status == 404 and data['error']['code'] == 'not_found'
    await a.close()
    await b.close()


async def test_health_and_ready(base):
    assert (await http(base, 'GET', '/healthz'))[0] == 200
    status, data = await http(base, 'GET', '/readyz')
    assert status == 200 and data['checks']['database'] is True


async def test_polling_transport(base):
    alice, bob, a, b, room = await pair(base)
    p = await connect(base, b.token, transports=['polling'])
    await a.call('send_dm', {'room_id': room['id'], 'body': 'poll me',
                             'client_msg_id': 'p1'})
    assert (await p.next('message'))['body'] == 'poll me'
    ack = await p.call('send_dm', {'room_id': room['id'], 'body': 'back',
                                   'client_msg_id': 'p2'})
    assert ack['ok']
    assert (await a.next('message', where=lambda m: m['body'] == 'back'))
    for c in (a, b, p):
        await c.close()


async def test_event_loop_not_blocked_by_storage(loaded):
    """While 1,000 messages are being stored, pings keep being answered:
    they complete before the stores do, instead of queueing behind them."""
    base = loaded.url
    alice, bob, a, b, room = await pair(base)
    pinger = await connect(base, a.token)
    sends = [asyncio.ensure_future(a.call('send_dm', {
        'room_id': room['id'], 'body': f'load {i} ' + 'x' * 200,
        'client_msg_id': f'l{i}'}, timeout=60)) for i in range(1000)]
    answered_while_storing = 0
    while not all(s.done() for s in sends):
        ack = await pinger.call('ping', {})
        assert ack['ok']
        if not all(s.done() for s in sends):
            answered_while_storing += 1
    acks = await asyncio.gather(*sends)
    assert all(x['ok'] for x in acks)
    assert answered_while_storing >= 3
    for c in (a, b, pinger):
        await c.close()


async def test_a_refused_first_send_still_announces_the_new_dm(base):
    """send_dm by username opens the dm before it stores the message: a
    refused message (here a reply_to that cannot be in a new dm) leaves
    the dm, and both members still get its `room` event, before the
    message of the next send."""
    alice, ta = await register(base)
    carol, tc = await register(base)
    a, c = await connect(base, ta), await connect(base, tc)
    ack = await a.call('send_dm', {'to': carol['username'], 'body': 'first',
                                   'client_msg_id': 'r1', 'reply_to': 1})
    assert ack['ok'] is False and ack['error']['code'] == 'invalid', ack
    room = await c.next('room')
    assert room['kind'] == 'dm' and (await a.next('room'))['id'] == room['id']
    ack = await a.call('send_dm', {'to': carol['username'], 'body': 'second',
                                   'client_msg_id': 'r2'})
    assert ack['ok'] and ack['message']['room_id'] == room['id'], ack
    assert (await c.next('message'))['body'] == 'second'
    await c.nothing('room', 0.2)
    # Over HTTP the same.
    dave, td = await register(base)
    d = await connect(base, td)
    status, body = await http(base, 'POST', '/api/messages', ta, json={
        'to': dave['username'], 'body': 'x', 'client_msg_id': 'r3',
        'attachments': [10**12]})
    assert status == 404 or status == 400, body
    assert (await d.next('room'))['kind'] == 'dm'
    for client in (a, c, d):
        await client.close()


async def test_typing_false_does_not_reopen_the_throttle(base):
    """true, false, true... as fast as a client can: at most one true per
    half second gets through (a quarter of the 2 s throttle), not every
    one; a true after a false half a second later does (the user cleared
    the box and types again)."""
    alice, bob, a, b, room = await pair(base)
    assert (await b.call('join_room', {'room_id': room['id']}))['ok']
    started = time.monotonic()
    for _ in range(8):
        for typing in (True, False):
            assert (await a.call('typing', {'room_id': room['id'],
                                            'typing': typing}))['ok']
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)
    trues = [e for e in b.drain('typing') if e['typing']]
    assert 1 <= len(trues) <= 1 + elapsed / 0.5, (len(trues), elapsed)
    await asyncio.sleep(0.6)
    assert (await a.call('typing', {'room_id': room['id'],
                                    'typing': True}))['ok']
    assert (await b.next('typing'))['typing'] is True
    await a.close()
    await b.close()


async def test_a_socket_loses_access_when_its_token_expires(base, server):
    """A token is checked on every use: a socket that connected with it
    gets `unauthorized` for its events once it expired, and is closed."""
    user, _ = await register(base)
    peer, peer_token = await register(base)
    now = time.time()
    # Long enough to connect and send on a busy machine.
    short = jwt.encode({'sub': str(user['id']), 'iat': now,
                        'exp': int(now) + 6}, server.env['POSTBOX_SECRET'],
                       algorithm='HS256')
    a = await connect(base, short)
    gone = asyncio.Event()
    a.sio.on('disconnect', lambda *args: gone.set())
    ack = await a.call('send_dm', {'to': peer['username'], 'body': 'while ok',
                                   'client_msg_id': 'e1'})
    assert ack['ok'], ack
    while time.time() < int(now) + 6.2:
        await asyncio.sleep(0.2)
    ack = await a.call('send_dm', {'to': peer['username'], 'body': 'late',
                                   'client_msg_id': 'e2'})
    assert ack['ok'] is False and ack['error']['code'] == 'unauthorized', ack
    assert 'expired' in ack['error']['message']
    await asyncio.wait_for(gone.wait(), 15)
    b = await connect(base, peer_token)
    inbox = (await b.call('rooms', {}))['rooms']
    history = await b.call('history', {'room_id': inbox[0]['room']['id']})
    assert [m['body'] for m in history['messages']] == ['while ok']
    await b.close()
    await a.close()
