"""The group life cycle: adding, removing, leaving and renaming, with its
live events, its seqs replayed by sync, the rules (owner only, blocks,
group size, each added user's room limit), and a removed member locked
out everywhere, across processes too."""
import asyncio
import logging

import pytest

from tests.kit import (FAST_REDIS_ENV, ServerProcess, connect, http, register,
                       running_servers, unique_name)


async def users(base, count):
    """``count`` fresh users, each (user, token, connected Client)."""
    made = []
    for _ in range(count):
        user, token = await register(base)
        made.append((user, token, await connect(base, token)))
    return made


async def group_of(client, name, *members):
    ack = await client.call('create_group', {
        'name': name, 'members': [m['username'] for m in members]})
    assert ack['ok'], ack
    return ack['room']


async def send(client, room_id, body):
    return await client.call('send_dm', {'room_id': room_id, 'body': body,
                                         'client_msg_id': unique_name('c')})


def names(room):
    return [m['username'] for m in room['members']]


async def close(*clients):
    for c in clients:
        await c.close()


async def test_any_member_adds_people_who_see_it_live(base):
    (alice, _, a), (bob, _, b), (carol, _, c), (dan, _, d) = \
        await users(base, 4)
    room = await group_of(a, 'team', bob)
    assert room['owner_id'] == alice['id'] and room['last_seq'] == 0
    for client in (a, b):
        await client.next('room')
    assert (await send(a, room['id'], 'before carol'))['ok']
    ack = await b.call('add_members', {'room_id': room['id'],
                                       'members': [carol['username'],
                                                   dan['username']]})
    assert ack['ok'], ack
    assert names(ack['room']) == [alice['username'], bob['username'],
                                  carol['username'], dan['username']]
    assert ack['room']['last_seq'] == 2  # the message, then the change
    assert ack['room']['owner_id'] == alice['id']
    for client in (a, b, c, d):
        live = await client.next('room', where=lambda r: r['id'] ==
                                 room['id'])
        assert live == ack['room']
    # The new members are members: they send, read and see it listed.
    assert (await send(c, room['id'], 'hi all'))['ok']
    for client in (a, b, d):
        got = await client.next('message')
        assert got['body'] in ('before carol', 'hi all')
    history = await d.call('history', {'room_id': room['id']})
    assert [m['body'] for m in history['messages']] == ['before carol',
                                                        'hi all']
    inbox = await d.call('rooms', {})
    (entry,) = [r for r in inbox['rooms'] if r['room']['id'] == room['id']]
    # What was said before they came is not unread for them.
    assert entry['unread'] == 1
    # Adding people who are in already changes nothing and takes no seq.
    again = await a.call('add_members', {'room_id': room['id'],
                                         'members': [carol['username']]})
    assert again['ok'] and again['room']['last_seq'] == 3
    await a.nothing('room', timeout=0.3)
    # Sync replays the change as a room event, in seq order.
    synced = await a.call('sync', {'rooms': {str(room['id']): 0}})
    kinds = [(e['type'], e['seq']) for e in synced['events']
             if e['room_id'] == room['id']]
    assert kinds == [('message', 1), ('room', 2), ('message', 3)]
    (change,) = [e for e in synced['events'] if e['type'] == 'room']
    assert change['room'] == ack['room']
    await close(a, b, c, d)


async def test_bad_additions(base):
    (alice, _, a), (bob, _, b), (carol, _, c) = await users(base, 3)
    room = await group_of(a, 'g', bob)
    cases = [
        ({'room_id': room['id'], 'members': ['nobody_' + unique_name()]},
         'not_found'),
        ({'room_id': room['id'], 'members': []}, 'invalid'),
        ({'room_id': room['id'], 'members': 'bob'}, 'invalid'),
        ({'room_id': str(room['id']), 'members': [carol['username']]},
         'invalid'),
        ({'room_id': 10 ** 12, 'members': [carol['username']]},
         'not_found'),
    ]
    for payload, code in cases:
        ack = await a.call('add_members', payload)
        assert ack['error']['code'] == code, (payload, ack)
    # Only members may add; a dm cannot be changed.
    ack = await c.call('add_members', {'room_id': room['id'],
                                       'members': [carol['username']]})
    assert ack['error']['code'] == 'forbidden'
    dm = (await a.call('open_dm', {'username': bob['username']}))['room']
    for event, payload in (
            ('add_members', {'members': [carol['username']]}),
            ('remove_member', {'username': bob['username']}),
            ('leave_group', {}),
            ('rename_group', {'name': 'x'})):
        ack = await a.call(event, {'room_id': dm['id'], **payload})
        assert ack['error']['code'] == 'invalid', (event, ack)
    await close(a, b, c)


async def test_group_names_that_hide_or_impersonate_are_refused(base):
    """A group name is shown to every member: one that looks blank
    (zero-width or control characters only), reorders the text around it
    (bidi overrides) or holds a NUL or line breaks is refused when the
    group is made, renamed or over HTTP; the name shown is the one
    typed, spaces around it trimmed."""
    (alice, ta, a), (bob, _, b) = await users(base, 2)
    room = await group_of(a, '  Ops 🚀 team  ', bob)
    assert room['name'] == 'Ops 🚀 team'
    bad = ['\x00', '\x07bell', '\u200b', '\ufeff', '\u202e evil',
           'x\n' * 50, 'a\u2028b', ' \t ', '']
    for name in bad:
        ack = await a.call('create_group', {'name': name,
                                            'members': [bob['username']]})
        assert ack['error']['code'] == 'invalid', (name, ack)
        ack = await a.call('rename_group', {'room_id': room['id'],
                                            'name': name})
        assert ack['error']['code'] == 'invalid', (name, ack)
        status, body = await http(base, 'PATCH', f'/api/rooms/{room["id"]}',
                                  ta, json={'name': name})
        assert (status, body['error']['code']) == (400, 'invalid'), name
    ack = await a.call('rooms', {})
    assert [r['room']['name'] for r in ack['rooms']] == ['Ops 🚀 team']
    await close(a, b)


async def test_removed_member_is_out_everywhere(base):
    (alice, _, a), (bob, _, b), (carol, tc, c) = await users(base, 3)
    room = await group_of(a, 'g', bob, carol)
    c2 = await connect(base, tc)  # carol's second device
    assert (await c.call('join_room', {'room_id': room['id']}))['ok']
    # Only the owner removes.
    ack = await b.call('remove_member', {'room_id': room['id'],
                                         'username': carol['username']})
    assert ack['error']['code'] == 'forbidden'
    ack = await a.call('remove_member', {'room_id': room['id'],
                                         'username': carol['username']})
    assert ack['ok'], ack
    assert names(ack['room']) == [alice['username'], bob['username']]
    assert ack['room']['last_seq'] == 1
    for client in (c, c2):
        assert await client.next('room_left') == {'room_id': room['id']}
    for client in (a, b):
        live = await client.next('room', where=lambda r: r['id'] ==
                                 room['id'] and r['last_seq'] == 1)
        assert names(live) == names(ack['room'])
    await c.nothing('room', timeout=0.2, where=lambda r: r['last_seq'] == 1)
    # Not a member any more: no sending, reading, joining or listing.
    assert (await send(c, room['id'], 'still here?'))['error']['code'] == \
        'forbidden'
    for event in ('history', 'join_room'):
        ack = await c.call(event, {'room_id': room['id']})
        assert ack['error']['code'] == 'forbidden', (event, ack)
    ack = await c.call('typing', {'room_id': room['id'], 'typing': True})
    assert ack['error']['code'] == 'forbidden'
    inbox = await c.call('rooms', {})
    assert room['id'] not in [r['room']['id'] for r in inbox['rooms']]
    # Messages after the removal do not reach carol.
    assert (await send(a, room['id'], 'without carol'))['ok']
    await b.next('message')
    await c.nothing('message', timeout=0.3)
    # A sync that still lists the room learns that carol left it, and
    # gets nothing of what was said since.
    synced = await c.call('sync', {'rooms': {str(room['id']): 0}})
    assert synced['events'] == [{'type': 'room_left', 'room_id': room['id'],
                                 'seq': 1}]
    # Removing someone who is not in is not_found.
    ack = await a.call('remove_member', {'room_id': room['id'],
                                         'username': carol['username']})
    assert ack['error']['code'] == 'not_found'
    # Added back, carol is a member again and sync says so.
    ack = await b.call('add_members', {'room_id': room['id'],
                                       'members': [carol['username']]})
    assert ack['ok']
    back = await c.next('room', where=lambda r: r['id'] == room['id'] and
                        r['last_seq'] == 3)
    assert carol['username'] in names(back)
    synced = await c.call('sync', {'rooms': {str(room['id']): 2}})
    assert [e['type'] for e in synced['events']] == ['room']
    assert (await send(c, room['id'], 'back'))['ok']
    await close(a, b, c, c2)


async def test_leaving_passes_ownership_and_the_last_one_out(base):
    (alice, _, a), (bob, _, b), (carol, _, c) = await users(base, 3)
    room = await group_of(a, 'g', bob, carol)
    ack = await a.call('leave_group', {'room_id': room['id']})
    assert ack == {'ok': True}
    assert await a.next('room_left') == {'room_id': room['id']}
    live = await b.next('room', where=lambda r: r['last_seq'] == 1)
    assert live['owner_id'] == bob['id']  # the longest-standing member
    assert names(live) == [bob['username'], carol['username']]
    assert (await a.call('leave_group', {'room_id': room['id']}))[
        'error']['code'] == 'forbidden'
    # The new owner renames and removes; the others may not.
    ack = await c.call('rename_group', {'room_id': room['id'],
                                        'name': 'mine'})
    assert ack['error']['code'] == 'forbidden'
    ack = await b.call('rename_group', {'room_id': room['id'],
                                        'name': '  renamed  '})
    assert ack['ok'] and ack['room']['name'] == 'renamed'
    assert ack['room']['last_seq'] == 2
    live = await c.next('room', where=lambda r: r['last_seq'] == 2)
    assert live['name'] == 'renamed'
    # The same name again is no change and takes no seq.
    ack = await b.call('rename_group', {'room_id': room['id'],
                                        'name': 'renamed'})
    assert ack['ok'] and ack['room']['last_seq'] == 2
    for bad in ('', '   ', 'x' * 101, 5):
        ack = await b.call('rename_group', {'room_id': room['id'],
                                            'name': bad})
        assert ack['error']['code'] == 'invalid'
    # Everyone leaves: the room is there for no one.
    for client in (b, c):
        assert (await client.call('leave_group',
                                  {'room_id': room['id']}))['ok']
    for client in (a, b, c):
        inbox = await client.call('rooms', {})
        assert room['id'] not in [r['room']['id'] for r in inbox['rooms']]
        ack = await client.call('history', {'room_id': room['id']})
        assert ack['error']['code'] == 'forbidden'
    await close(a, b, c)


async def test_blocks_keep_people_out_of_groups(base):
    (alice, _, a), (bob, _, b), (carol, _, c) = await users(base, 3)
    assert (await c.call('block', {'username': alice['username']}))['ok']
    # The blocked user can neither put carol in a new group ...
    ack = await a.call('create_group', {'name': 'g', 'members': [
        bob['username'], carol['username']]})
    assert ack['error']['code'] == 'forbidden', ack
    assert carol['username'] in ack['error']['message']
    await c.nothing('room', timeout=0.3)
    # ... nor add her to one.
    room = await group_of(a, 'g', bob)
    ack = await a.call('add_members', {'room_id': room['id'],
                                       'members': [carol['username']]})
    assert ack['error']['code'] == 'forbidden'
    # Someone carol does not block may.
    ack = await b.call('add_members', {'room_id': room['id'],
                                       'members': [carol['username']]})
    assert ack['ok'], ack
    await close(a, b, c)


async def test_http_group_management(base):
    (alice, ta, a), (bob, tb, b), (carol, tc, c) = await users(base, 3)
    room = await group_of(a, 'g', bob)
    path = f'/api/rooms/{room["id"]}'
    status, body = await http(base, 'POST', path + '/members', ta,
                              json={'members': [carol['username']]})
    assert status == 200, body
    assert names(body['room'])[-1] == carol['username']
    assert (await c.next('room', where=lambda r: r['id'] == room['id']))
    status, body = await http(base, 'PATCH', path, tb, json={'name': 'no'})
    assert (status, body['error']['code']) == (403, 'forbidden')
    status, body = await http(base, 'PATCH', path, ta, json={'name': 'new'})
    assert status == 200 and body['room']['name'] == 'new'
    # Any member reads the room by id; nobody else does.
    status, body = await http(base, 'GET', path, tc)
    assert status == 200, body
    assert (body['room']['name'], names(body['room'])) == (
        'new', [alice['username'], bob['username'], carol['username']])
    assert body['room']['last_seq'] == 2
    status, body = await http(base, 'GET', path, (await register(base))[1])
    assert (status, body['error']['code']) == (403, 'forbidden')
    for other, code in (('/api/rooms/999999999', 404), ('/api/rooms/x', 404),
                        (path, 401)):
        status, _ = await http(base, 'GET', other,
                               None if code == 401 else ta)
        assert status == code, other
    status, body = await http(base, 'DELETE',
                              f'{path}/members/{carol["username"]}', tb)
    assert (status, body['error']['code']) == (403, 'forbidden')
    status, body = await http(base, 'DELETE',
                              f'{path}/members/{carol["username"]}', ta)
    assert status == 200 and carol['username'] not in names(body['room'])
    assert await c.next('room_left') == {'room_id': room['id']}
    # Your own name is leaving.
    status, body = await http(base, 'DELETE',
                              f'{path}/members/{bob["username"]}', tb)
    assert status == 200 and names(body['room']) == [alice['username']]
    assert await b.next('room_left') == {'room_id': room['id']}
    status, body = await http(base, 'POST', path + '/members', ta,
                              json={'members': 'carol'})
    assert (status, body['error']['code']) == (400, 'invalid')
    status, body = await http(base, 'POST', '/api/rooms/x/members', ta,
                              json={'members': [carol['username']]})
    assert status == 404
    await close(a, b, c)


async def test_group_size_and_each_added_users_room_limit(tmp_path,
                                                          database_env):
    server = ServerProcess(tmp_path, env={
        'POSTBOX_ROOMS_PER_USER_MAX': '2', 'POSTBOX_GROUP_MAX_MEMBERS': '3',
        **database_env()}).start()
    try:
        base = server.url
        (alice, _, a), (bob, _, b), (carol, _, c), (dan, _, d) = \
            await users(base, 4)
        # Carol is in two rooms, her limit, made by others.
        await group_of(b, 'one', carol)
        await group_of(d, 'two', carol)
        room = await group_of(a, 'g', bob)
        ack = await a.call('add_members', {'room_id': room['id'],
                                           'members': [carol['username']]})
        assert ack['error']['code'] == 'forbidden', ack
        assert carol['username'] in ack['error']['message']
        ack = await a.call('create_group', {'name': 'h', 'members': [
            carol['username']]})
        assert ack['error']['code'] == 'forbidden', ack
        inbox = await c.call('rooms', {})
        assert len(inbox['rooms']) == 2
        # Past the group size: too_large.
        ack = await a.call('add_members', {'room_id': room['id'],
                                           'members': [dan['username']]})
        assert ack['ok'], ack  # three members: the limit
        (eve, _, e), = await users(base, 1)
        ack = await a.call('add_members', {'room_id': room['id'],
                                           'members': [eve['username']]})
        assert ack['error']['code'] == 'too_large', ack
        await close(a, b, c, d, e)
    finally:
        assert await server.astop() == 0, server.read_log()


def test_sync_queries_only_rooms_with_news(tmp_path, caplog):
    """A user in many rooms who has seen everything but one new message
    costs a fixed number of queries, not one per room."""
    import models
    from models import Membership, Room, User
    from models.migrations import migrate
    from server.config import Config
    from server.services import messages
    from server.services.context import Context
    from server.store import open_database
    database = open_database(f'sqlite:///{tmp_path / "s.db"}', Config())
    models.db.initialize(database)
    database.connect()
    try:
        migrate(database)
        user = User.create(username='u', display_name='u', created_at=0)
        rooms = [Room.create(kind='group', name=f'r{i}', created_by=user,
                             owner=user, created_at=0, last_activity_at=0,
                             last_seq=0) for i in range(300)]
        Membership.insert_many([{'room': r.id, 'user': user.id,
                                 'joined_at': 0} for r in rooms]).execute()
        ctx = Context(None, Config(), 'x')
        known = {r.id: 0 for r in rooms}
        with caplog.at_level(logging.DEBUG, logger='peewee'):
            answer = messages._sync(ctx, user.id, known, 500)
        assert answer == {'events': [], 'has_more': False}
        queries = [r for r in caplog.records if r.name == 'peewee']
        assert len(queries) <= 2, len(queries)
    finally:
        database.close()
        models.db.initialize(None)


@pytest.fixture
def two_processes(tmp_path, database_env):
    """Two processes on one database, without Redis (each keeps its own
    room cache, and nothing tells one about the other's changes)."""
    env = database_env() or {}
    with running_servers(tmp_path, 2, env) as servers:
        yield servers


async def test_a_stale_cache_never_lets_a_removed_member_post(
        two_processes):
    p1, p2 = two_processes
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    a = await connect(p1.url, ta)
    b = await connect(p2.url, tb)
    room = await group_of(a, 'g', bob)
    # p2 caches the room with bob in it.
    assert (await send(b, room['id'], 'first'))['ok']
    ack = await a.call('remove_member', {'room_id': room['id'],
                                         'username': bob['username']})
    assert ack['ok']
    # p2 was not told (no Redis): its cache is stale, the writer is not.
    ack = await send(b, room['id'], 'after removal')
    assert ack['error']['code'] == 'forbidden', ack
    history = await a.call('history', {'room_id': room['id']})
    assert [m['body'] for m in history['messages']] == ['first']
    await close(a, b)


async def test_a_stale_cache_never_delivers_to_the_wrong_members(
        two_processes):
    """What a message or a change reaches live is the members as of its
    seq, not a cache: on a process whose cache still shows carol in the
    group and not dan, bob's message after carol's removal and dan's
    addition (made on the other process) reaches dan live and not carol;
    so does his edit."""
    p1, p2 = two_processes
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    carol, tc = await register(p1.url)
    dan, td = await register(p1.url)
    a = await connect(p1.url, ta)
    b, c, d = [await connect(p2.url, t) for t in (tb, tc, td)]
    room = await group_of(a, 'g', bob, carol)
    # p2 caches the room as it is: alice, bob, carol.
    first = await send(b, room['id'], 'first')
    assert first['ok']
    assert (await c.next('message'))['body'] == 'first'
    for ack in (await a.call('remove_member', {
            'room_id': room['id'], 'username': carol['username']}),
            await a.call('add_members', {'room_id': room['id'],
                                         'members': [dan['username']]})):
        assert ack['ok'], ack
    sent = await send(b, room['id'], 'not for carol')
    assert sent['ok'], sent
    got = await d.next('message')
    assert (got['body'], got['seq']) == ('not for carol', 4)
    ack = await b.call('edit_message', {'message_id': first['message']['id'],
                                        'body': 'edited'})
    assert ack['ok'], ack
    assert (await d.next('message_updated'))['body'] == 'edited'
    await c.nothing('message', timeout=0.5)
    await c.nothing('message_updated', timeout=0.1)
    await close(a, b, c, d)


@pytest.fixture
def redis_pair(tmp_path, redis, database_env):
    env = {'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
           **(database_env() or {})}
    with running_servers(tmp_path, 2, env) as servers:
        yield servers


async def test_removal_reaches_every_process(redis_pair):
    p1, p2 = redis_pair
    alice, ta = await register(p1.url)
    bob, tb = await register(p1.url)
    carol, tc = await register(p1.url)
    a = await connect(p1.url, ta)
    b = await connect(p2.url, tb)
    c1 = await connect(p1.url, tc)
    c2 = await connect(p2.url, tc)
    room = await group_of(a, 'g', bob, carol)
    for client in (b, c2):
        await client.next('room')
    # Carol joined the room on p2, and p2 has it cached.
    assert (await c2.call('join_room', {'room_id': room['id']}))['ok']
    assert (await send(c2, room['id'], 'hi'))['ok']
    ack = await a.call('remove_member', {'room_id': room['id'],
                                         'username': carol['username']})
    assert ack['ok']
    # room_left on each of carol's sockets, on both processes.
    for client in (c1, c2):
        assert await client.next('room_left') == {'room_id': room['id']}
    live = await b.next('room', where=lambda r: r['last_seq'] == 2)
    assert carol['username'] not in names(live)
    # p2 forgot the room: carol reads nothing there any more, and her
    # joined socket there gets no read events of the room.
    for event in ('history', 'join_room'):
        ack = await c2.call(event, {'room_id': room['id']})
        assert ack['error']['code'] == 'forbidden', (event, ack)
    assert (await b.call('join_room', {'room_id': room['id']}))['ok']
    assert (await b.call('mark_read', {'room_id': room['id'],
                                       'seq': 2}))['ok']
    await b.next('read')
    await c2.nothing('read', timeout=0.3)
    # Added on p1, dan is known as a member on p2 at once.
    dan, td = await register(p1.url)
    d = await connect(p2.url, td)
    ack = await a.call('add_members', {'room_id': room['id'],
                                       'members': [dan['username']]})
    assert ack['ok']
    await d.next('room')
    assert (await send(b, room['id'], 'welcome dan'))['ok']
    got = await d.next('message')
    assert got['body'] == 'welcome dan'
    await close(a, b, c1, c2, d)


async def test_bot_sdk_follows_its_groups(base, tmp_path):
    from client_demo.bot import Bot, BotError
    (alice, ta, a), (bob, _, b) = await users(base, 2)
    status, made = await http(base, 'POST', '/api/bots', ta,
                              json={'username': unique_name('bot')})
    assert status == 201, made
    state = tmp_path / 'bot.json'
    seen = asyncio.Queue()
    bot = Bot(base, made['token'], state_path=state)

    def follow(bot):
        bot.on_room(lambda room: seen.put_nowait(('room', room)))
        bot.on_room_left(lambda room_id: seen.put_nowait(('left', room_id)))
        bot.on_message(lambda m: seen.put_nowait(('message', m['body'])))

    follow(bot)
    await bot.start(timeout=10)
    room = await group_of(a, 'g', bob)
    assert (await send(a, room['id'], 'before the bot'))['ok']
    ack = await a.call('add_members', {'room_id': room['id'],
                                       'members': [made['user']['username']]})
    assert ack['ok'], ack
    kind, got = await asyncio.wait_for(seen.get(), 10)
    assert kind == 'room' and got['id'] == room['id'] and got['last_seq'] == 2
    assert (await send(a, room['id'], 'hello bot'))['ok']
    # Only what was said after it came: not the message before.
    assert await asyncio.wait_for(seen.get(), 10) == ('message', 'hello bot')
    # The bot manages the group through the SDK.
    carol, _ = await register(base)
    added = await bot.add_members(room['id'], [carol['username']])
    assert carol['username'] in names(added)
    kind, got = await asyncio.wait_for(seen.get(), 10)
    assert kind == 'room' and got['last_seq'] == 4
    with pytest.raises(BotError) as refused:
        await bot.rename_group(room['id'], 'bots rule')
    assert refused.value.code == 'forbidden'
    await bot.stop()
    # While the bot is away the group changes and the bot is removed;
    # restarted, it learns from sync that it is out, once.
    assert (await a.call('rename_group', {'room_id': room['id'],
                                          'name': 'renamed'}))['ok']
    assert (await a.call('remove_member', {
        'room_id': room['id'], 'username': made['user']['username']}))['ok']
    bot = Bot(base, made['token'], state_path=state)
    follow(bot)
    await bot.start(timeout=10)
    assert await asyncio.wait_for(seen.get(), 10) == ('left', room['id'])
    assert room['id'] not in bot.rooms
    await bot.stop()
    assert seen.empty(), seen
    # Rooms made while it is away, a group with the bot in it and a dm:
    # restarted, it hears of each (on_room) before its messages, as live.
    made_group = await group_of(a, 'made while away', made['user'])
    assert (await send(a, made_group['id'], 'in the new group'))['ok']
    dm = await b.call('send_dm', {'to': made['user']['username'],
                                  'body': 'hi bot', 'client_msg_id': 'dm1'})
    assert dm['ok'], dm
    quiet = await group_of(a, 'nothing said yet', made['user'])
    bot = Bot(base, made['token'], state_path=state)
    follow(bot)
    await bot.start(timeout=10)
    heard = [await asyncio.wait_for(seen.get(), 10) for _ in range(5)]
    rooms = [got for kind, got in heard if kind == 'room']
    assert sorted(r['id'] for r in rooms) == sorted(
        [made_group['id'], dm['message']['room_id'], quiet['id']]), heard
    for room_id, body in ((made_group['id'], 'in the new group'),
                          (dm['message']['room_id'], 'hi bot')):
        announced = next(n for n, (kind, got) in enumerate(heard)
                         if kind == 'room' and got['id'] == room_id)
        assert heard.index(('message', body)) > announced, heard
    await bot.stop()
    assert seen.empty(), seen
    # Restarted once more: nothing is new (not even the quiet group).
    bot = Bot(base, made['token'], state_path=state)
    follow(bot)
    await bot.start(timeout=10)
    await bot.stop()
    assert seen.empty(), seen.get_nowait()
    await close(a, b)
