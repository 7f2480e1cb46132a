"""The inbox (`rooms` event, GET /api/rooms): big inboxes and paging."""
import asyncio

from tests.kit import connect, http, register


async def gather_in_chunks(calls, size=50):
    """Await the coroutines ``size`` at a time; their results in order."""
    results = []
    for start in range(0, len(calls), size):
        results.extend(await asyncio.gather(*calls[start:start + size]))
    return results


async def test_user_pushed_into_600_rooms_still_gets_the_inbox(loaded):
    """A stranger puts the victim into 600 groups and writes in each: the
    inbox used to answer `internal` (500 over HTTP) past ~450 rooms."""
    base = loaded.url
    victim, tv = await register(base)
    spammer, ts = await register(base)
    s = await connect(base, ts)
    v = await connect(base, tv)
    acks = await gather_in_chunks([s.call('create_group', {
        'name': f'g{i}', 'members': [victim['username']]}, timeout=60)
        for i in range(600)])
    assert all(ack['ok'] for ack in acks), [a for a in acks if not a['ok']]
    rooms = [ack['room'] for ack in acks]
    sent = await gather_in_chunks([s.call('send_dm', {
        'room_id': room['id'], 'body': f'spam {n}',
        'client_msg_id': f'spam-{n}'}, timeout=60)
        for n, room in enumerate(rooms)])
    assert all(ack['ok'] for ack in sent)
    ack = await v.call('rooms', {}, timeout=30)
    assert ack['ok'], ack
    inbox = ack['rooms']
    assert len(inbox) == 600
    last = {m['message']['room_id']: m['message'] for m in sent}
    for entry in inbox:
        room_id = entry['room']['id']
        assert entry['last_message']['id'] == last[room_id]['id']
        assert entry['unread'] == 1 and entry['last_read_seq'] == 0
        assert [u['id'] for u in entry['room']['members']] == [
            spammer['id'], victim['id']]
    # Latest activity first.
    times = [e['last_message']['created_at'] for e in inbox]
    assert times == sorted(times, reverse=True)
    status, data = await http(base, 'GET', '/api/rooms', token=tv)
    assert status == 200, data
    assert [e['room']['id'] for e in data['rooms']] == [
        e['room']['id'] for e in inbox]
    await s.close()
    await v.close()


async def test_inbox_pages(loaded):
    base = loaded.url
    me, tm = await register(base)
    c = await connect(base, tm)
    others = [await register(base) for _ in range(7)]
    rooms = []
    for n, (other, _) in enumerate(others):
        room = (await c.call('open_dm', {
            'username': other['username']}))['room']
        rooms.append(room)
        if n % 2:
            assert (await c.call('send_dm', {
                'room_id': room['id'], 'body': f'hi {n}',
                'client_msg_id': f'p{n}'}))['ok']
    full = await c.call('rooms', {})
    assert full['ok'] and full['has_more'] is False
    order = [e['room']['id'] for e in full['rooms']]
    assert sorted(order) == sorted(r['id'] for r in rooms)
    # Socket.IO: pages of 3 walk the same list in the same order.
    seen, before = [], None
    while True:
        ack = await c.call('rooms', {'limit': 3, **(
            {'before': before} if before else {})})
        assert ack['ok'], ack
        assert len(ack['rooms']) <= 3
        seen.extend(ack['rooms'])
        if not ack['has_more']:
            break
        before = ack['next_before']
    assert [e['room']['id'] for e in seen] == order
    assert seen == full['rooms']
    # HTTP: the same pages.
    status, page = await http(base, 'GET', '/api/rooms?limit=4', token=tm)
    assert status == 200 and page['has_more'] is True
    status, rest = await http(base, 'GET', '/api/rooms?limit=4&before='
                              + page['next_before'], token=tm)
    assert status == 200 and rest['has_more'] is False
    assert [e['room']['id'] for e in page['rooms'] + rest['rooms']] == order
    # Bad paging input is `invalid`, never a 500.
    for bad in ({'limit': 0}, {'limit': 'x'}, {'limit': 10 ** 6},
                {'limit': 2, 'before': 'nonsense'}, {'limit': 2, 'before': 5}):
        ack = await c.call('rooms', bad)
        assert ack['error']['code'] == 'invalid', (bad, ack)
    for query in ('limit=0', 'limit=x', 'limit=2&before=nonsense'):
        status, data = await http(base, 'GET', '/api/rooms?' + query,
                                  token=tm)
        assert status == 400 and data['error']['code'] == 'invalid', query
    await c.close()


async def test_inbox_shows_every_change_after_it_was_read(tmp_path):
    """The inbox is built from entries cached per process and checked
    against each room's last_seq and the reader's marker: whatever changes
    a room, on this process or on another one sharing the database, the
    next read shows it."""
    from tests.kit import NO_RATE_LIMITS, ServerProcess
    db = f'sqlite:///{tmp_path / "shared.db"}'
    one = ServerProcess(tmp_path / 'one', env={
        **NO_RATE_LIMITS, 'POSTBOX_DATABASE_URL': db}).start()
    two = ServerProcess(tmp_path / 'two', env={
        **NO_RATE_LIMITS, 'POSTBOX_DATABASE_URL': db}).start()
    try:
        alice, ta = await register(one.url)
        bob, tb = await register(one.url)
        carol, _ = await register(one.url)
        a = await connect(one.url, ta)      # reads her inbox on one
        b = await connect(two.url, tb)      # changes rooms through two
        group = (await b.call('create_group', {
            'name': 'trip', 'members': [alice['username']]}))['room']

        async def entry():
            ack = await a.call('rooms', {})
            assert ack['ok'], ack
            return next(e for e in ack['rooms']
                        if e['room']['id'] == group['id'])

        assert (await entry())['last_message'] is None
        sent = (await b.call('send_dm', {
            'room_id': group['id'], 'body': 'tickets booked',
            'client_msg_id': 'c1'}))['message']
        seen = await entry()
        assert seen['last_message']['body'] == 'tickets booked'
        assert seen['unread'] == 1
        assert (await b.call('edit_message', {
            'message_id': sent['id'], 'body': 'tickets booked!'}))['ok']
        assert (await entry())['last_message']['body'] == 'tickets booked!'
        assert (await b.call('react', {'message_id': sent['id'],
                                       'emoji': '🎉', 'on': True}))['ok']
        seen = await entry()
        assert seen['last_message']['reactions'] == {'🎉': [bob['id']]}
        assert seen['unread'] == 1
        assert (await b.call('rename_group', {'room_id': group['id'],
                                              'name': 'trip 2027'}))['ok']
        assert (await b.call('add_members', {
            'room_id': group['id'], 'members': [carol['username']]}))['ok']
        seen = await entry()
        assert seen['room']['name'] == 'trip 2027'
        assert {m['username'] for m in seen['room']['members']} == {
            alice['username'], bob['username'], carol['username']}
        ack = await a.call('mark_read', {'room_id': group['id'],
                                         'seq': seen['room']['last_seq']})
        assert ack['ok'] and (await entry())['unread'] == 0
        assert (await b.call('delete_message',
                             {'message_id': sent['id']}))['ok']
        seen = await entry()
        assert seen['last_message']['deleted'] is True
        assert seen['unread'] == 0
        for client in (a, b):
            await client.close()
    finally:
        assert one.stop() == 0, one.read_log()
        assert two.stop() == 0, two.read_log()


async def test_a_big_group_and_a_small_one_list_every_member(base):
    """Inbox entries keep rooms serialized: a small group whole, a big one
    (more than 8 members) member by member, each user's JSON shared with
    every room. Both list every member as the users see themselves, on
    the first read and from the cache, over a socket and over HTTP."""
    users = [await register(base) for _ in range(12)]
    (owner, token), others = users[0], users[1:]
    c = await connect(base, token)
    big = (await c.call('create_group', {
        'name': 'big', 'members': [u['username'] for u, _ in others]}))
    small = (await c.call('create_group', {
        'name': 'small', 'members': [u['username'] for u, _ in others[:2]]}))
    assert big['ok'] and small['ok'], (big, small)
    expected = {
        big['room']['id']: {u['id']: u for u, _ in users},
        small['room']['id']: {u['id']: u for u, _ in users[:3]}}
    for _ in range(2):  # built, then from the cache
        answers = [(await c.call('rooms', {}))['rooms']]
        status, body = await http(base, 'GET', '/api/rooms', token=token)
        assert status == 200, body
        answers.append(body['rooms'])
        for rooms in answers:
            for entry in rooms:
                members = {m['id']: m for m in entry['room']['members']}
                assert members == expected[entry['room']['id']]
            assert {e['room']['id'] for e in rooms} == set(expected)
    # The other members' inboxes reuse the same cached users.
    for user, user_token in others[:3]:
        status, body = await http(base, 'GET', '/api/rooms',
                                  token=user_token)
        mine = {e['room']['id']: e for e in body['rooms']}
        members = {m['id']: m for m in
                   mine[big['room']['id']]['room']['members']}
        assert members == expected[big['room']['id']]
    await c.close()
