"""Edits, deletes, reactions, replies, blocking and presence."""
import asyncio

from tests.kit import connect, http, pair, register, unique_name


async def send(client, room, body, cmid=None, **extra):
    ack = await client.call('send_dm', {'room_id': room['id'], 'body': body,
                                        'client_msg_id': cmid or unique_name(
                                            'c'), **extra})
    assert ack['ok'], ack
    return ack['message']


async def test_edit_delete_and_their_seqs(base):
    alice, bob, a, b, room = await pair(base)
    first = await send(a, room, 'helo')
    await b.next('message')
    ack = await a.call('edit_message', {'message_id': first['id'],
                                        'body': 'hello'})
    assert ack['ok']
    edited = ack['message']
    assert edited['body'] == 'hello' and edited['edited_at']
    assert edited['seq'] == 1 and edited['update_seq'] == 2
    for c in (a, b):
        got = await c.next('message_updated')
        assert got['id'] == first['id'] and got['body'] == 'hello'
        assert got['update_seq'] == 2
    ack = await b.call('edit_message', {'message_id': first['id'],
                                        'body': 'not yours'})
    assert ack['error']['code'] == 'forbidden'
    ack = await b.call('delete_message', {'message_id': first['id']})
    assert ack['error']['code'] == 'forbidden'
    ack = await a.call('delete_message', {'message_id': first['id']})
    gone = ack['message']
    assert gone['deleted'] is True and gone['body'] == ''
    assert gone['attachments'] == [] and gone['seq'] == 1
    assert gone['update_seq'] == 3
    assert (await b.next('message_updated'))['deleted'] is True
    # History shows the tombstone in place; last_seq counts every change.
    joined = await b.call('join_room', {'room_id': room['id']})
    assert joined['messages'][0]['deleted'] is True
    assert joined['room']['last_seq'] == 3
    ack = await a.call('edit_message', {'message_id': first['id'],
                                        'body': 'revive'})
    assert ack['error']['code'] == 'invalid'
    ack = await a.call('edit_message', {'message_id': 10 ** 9, 'body': 'x'})
    assert ack['error']['code'] == 'not_found'
    # Edits and deletes do not count as unread.
    inbox = (await b.call('rooms', {}))['rooms']
    assert inbox[0]['unread'] == 0
    await a.close()
    await b.close()


async def test_reactions(base):
    alice, bob, a, b, room = await pair(base)
    msg = await send(a, room, 'react to me')
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['message']['reactions'] == {'👍': [bob['id']]}
    ack = await a.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['message']['reactions'] == {'👍': [bob['id'], alice['id']]}
    updates = [await a.next('message_updated') for _ in range(2)]
    assert [u['update_seq'] for u in updates] == [2, 3]
    # Reacting twice changes nothing and takes no seq.
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['message']['update_seq'] == 3
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': False})
    assert ack['message']['reactions'] == {'👍': [alice['id']]}
    assert ack['message']['update_seq'] == 4
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': 'a b',
                                 'on': True})
    assert ack['error']['code'] == 'invalid'
    await a.close()
    await b.close()


async def test_reply_to(base):
    alice, bob, a, b, room = await pair(base)
    first = await send(a, room, 'question?')
    answer = await send(b, room, 'answer', reply_to=first['id'])
    assert answer['reply_to'] == first['id']
    other = await pair(base)
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'x',
                                   'client_msg_id': 'r-bad',
                                   'reply_to': 10 ** 9})
    assert ack['error']['code'] == 'invalid'
    for c in (a, b, other[2], other[3]):
        await c.close()


async def test_block_and_unblock(base):
    alice, bob, a, b, room = await pair(base)
    assert (await a.call('block', {'username': bob['username']}))['ok']
    ack = await b.call('send_dm', {'room_id': room['id'], 'body': 'hey',
                                   'client_msg_id': 'blocked-1'})
    assert ack['error']['code'] == 'forbidden'
    ack = await b.call('send_dm', {'to': alice['username'], 'body': 'hey',
                                   'client_msg_id': 'blocked-2'})
    assert ack['error']['code'] == 'forbidden'
    ack = await b.call('open_dm', {'username': alice['username']})
    assert ack['error']['code'] == 'forbidden'
    await a.nothing('message', 0.3)
    # The blocker can still write; groups are unaffected, but bob cannot
    # put alice in one (that was a way around the block).
    assert (await a.call('send_dm', {'room_id': room['id'], 'body': 'bye',
                                     'client_msg_id': 'from-a'}))['ok']
    ack = await b.call('create_group', {'name': 'g',
                                        'members': [alice['username']]})
    assert ack['error']['code'] == 'forbidden'
    group = (await a.call('create_group', {
        'name': 'g', 'members': [bob['username']]}))['room']
    assert (await b.call('send_dm', {'room_id': group['id'], 'body': 'in g',
                                     'client_msg_id': 'g-1'}))['ok']
    assert (await a.next('message', where=lambda m: m['body'] == 'in g'))
    assert (await a.call('unblock', {'username': bob['username']}))['ok']
    ack = await b.call('send_dm', {'room_id': room['id'], 'body': 'again',
                                   'client_msg_id': 'after-unblock'})
    assert ack['ok']
    await a.close()
    await b.close()


async def test_list_blocks_over_http(base):
    alice, ta = await register(base)
    bob, _ = await register(base)
    carol, tc = await register(base)
    a = await connect(base, ta)
    for other in (bob, carol):
        assert (await a.call('block', {'username': other['username']}))['ok']
    # Blocking again is idempotent: no second entry.
    assert (await a.call('block', {'username': bob['username']}))['ok']
    status, data = await http(base, 'GET', '/api/blocks', token=ta)
    assert status == 200, data
    blocks = data['blocks']
    assert [b['user'] for b in blocks] == [
        {'id': u['id'], 'username': u['username'],
         'display_name': u['display_name'], 'is_bot': False}
        for u in (carol, bob)]
    assert all(b['created_at'].endswith('Z') for b in blocks)
    assert blocks[0]['created_at'] >= blocks[1]['created_at']
    assert (await a.call('unblock', {'username': carol['username']}))['ok']
    status, data = await http(base, 'GET', '/api/blocks', token=ta)
    assert status == 200 and [b['user']['id'] for b in data['blocks']] == [
        bob['id']]
    # Another user's list is their own.
    c = await connect(base, tc)
    assert (await c.call('block', {'username': alice['username']}))['ok']
    status, data = await http(base, 'GET', '/api/blocks', token=tc)
    assert status == 200 and [b['user']['id'] for b in data['blocks']] == [
        alice['id']]
    status, data = await http(base, 'GET', '/api/blocks', token=ta)
    assert [b['user']['id'] for b in data['blocks']] == [bob['id']]
    status, data = await http(base, 'GET', '/api/blocks')
    assert status == 401 and data['error']['code'] == 'unauthorized'
    await a.close()
    await c.close()


async def test_presence(server):
    base = server.url
    alice, bob, a, b, room = await pair(base)
    ack = await a.call('presence', {'usernames': [bob['username'],
                                                  'nobody_' + 'x' * 5]})
    assert ack['presence'][bob['username']]['online'] is True
    assert 'nobody_xxxxx' not in ack['presence']
    # Alice's other socket is told when bob goes offline (after the grace
    # period) and when he comes back.
    await b.close()
    gone = await a.next('presence', timeout=20,
                        where=lambda p: p['user']['id'] == bob['id']
                        and not p['online'])
    assert gone['online'] is False and gone['last_seen'].endswith('Z')
    ack = await a.call('presence', {'usernames': [bob['username']]})
    assert ack['presence'][bob['username']] == {
        'online': False, 'last_seen': gone['last_seen']}
    b = await connect(base, b.token)
    back = await a.next('presence', timeout=10,
                        where=lambda p: p['user']['id'] == bob['id']
                        and p['online'])
    assert back['online'] is True
    # A quick reconnect (a page reload) does not flap.
    await b.close()
    b = await connect(base, b.token)
    await a.nothing('presence', 1.0,
                    where=lambda p: p['user']['id'] == bob['id'])
    # Someone who shares no room hears nothing, and their own coming and
    # going is announced to nobody.
    _, tc = await register(base)
    c = await connect(base, tc)
    loner, tl = await register(base)
    lone = await connect(base, tl)
    await b.close()
    await c.nothing('presence', 1.0)
    await a.nothing('presence', 0.1,
                    where=lambda p: p['user']['id'] == loner['id'])
    await lone.close()
    await a.close()
    await c.close()


async def test_blocked_user_cannot_react_or_type_in_the_dm(base):
    """While A blocks B, B's reactions and typing in their dm are
    `forbidden` and reach A not at all; in a group both still work."""
    alice, bob, a, b, room = await pair(base)
    msg = await send(a, room, 'before the block')
    await b.next('message')
    group = (await a.call('create_group', {
        'name': 'g', 'members': [bob['username']]}))['room']
    in_group = await send(a, group, 'in the group')
    await b.next('message', where=lambda m: m['id'] == in_group['id'])
    for c, r in ((a, room), (b, room), (a, group)):
        assert (await c.call('join_room', {'room_id': r['id']}))['ok']
    assert (await a.call('block', {'username': bob['username']}))['ok']
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['error']['code'] == 'forbidden', ack
    ack = await b.call('typing', {'room_id': room['id'], 'typing': True})
    assert ack['error']['code'] == 'forbidden', ack
    await a.nothing('message_updated', 0.3)
    await a.nothing('typing', 0.1)
    # Neither side's activity crosses the block: the blocker's typing and
    # read receipts are hidden from the one they blocked (as their
    # presence is), and the blocked one's reads do not reach the blocker.
    # Each still gets their own read on their other sockets.
    assert (await a.call('typing', {'room_id': room['id'],
                                    'typing': True}))['ok']
    # (Nor does the blocker's message end a typing the other never saw.)
    later = await send(a, room, 'after the block')
    assert (await a.call('typing', {'room_id': room['id'],
                                    'typing': True}))['ok']
    for reader, seq in ((a, msg['seq']), (b, later['seq'])):
        ack = await reader.call('mark_read', {'room_id': room['id'],
                                              'seq': seq})
        assert ack['ok'], ack
    got = await b.next('read')
    assert got['user_id'] == bob['id']
    got = await a.next('read')
    assert got['user_id'] == alice['id']
    await a.nothing('read', 0.3)
    await b.nothing('read', 0.1)
    await b.nothing('typing', 0.1)
    # Nor does join_room show the other's read marker, nor the blocker's
    # going away end a typing the other never saw.
    for reader, me, other in ((a, alice, bob), (b, bob, alice)):
        ack = await reader.call('join_room', {'room_id': room['id']})
        assert str(me['id']) in ack['read'], ack['read']
        assert str(other['id']) not in ack['read'], ack['read']
    await a.close()
    await b.nothing('typing', 0.5)
    a = await connect(base, a.token)
    assert (await a.call('join_room', {'room_id': group['id']}))['ok']
    # The blocker's own reaction still works; the message is unchanged
    # by the refused one.
    ack = await a.call('react', {'message_id': msg['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['message']['reactions'] == {'👍': [alice['id']]}
    # Groups are unaffected by blocks.
    ack = await b.call('react', {'message_id': in_group['id'],
                                 'emoji': '👍', 'on': True})
    assert ack['ok'], ack
    got = await a.next('message_updated',
                       where=lambda m: m['id'] == in_group['id'])
    assert got['reactions'] == {'👍': [bob['id']]}
    assert (await b.call('typing', {'room_id': group['id'],
                                    'typing': True}))['ok']
    got = await a.next('typing', where=lambda t: t['room_id'] == group['id'])
    assert got['user']['id'] == bob['id'] and got['typing'] is True
    # Unblocked, the dm works again.
    assert (await a.call('unblock', {'username': bob['username']}))['ok']
    ack = await b.call('react', {'message_id': msg['id'], 'emoji': '🎉',
                                 'on': True})
    assert ack['ok'], ack
    await a.close()
    await b.close()


async def test_reactions_must_be_one_emoji(base):
    alice, bob, a, b, room = await pair(base)
    msg = await send(a, room, 'react to me')
    junk = [f'junk{n}' for n in range(28)] + ['a', '👍👍', '👍 ', '1',
                                              '\u200d', '\ufe0f']
    for emoji in junk:
        ack = await b.call('react', {'message_id': msg['id'],
                                     'emoji': emoji, 'on': True})
        assert ack['error']['code'] == 'invalid', (emoji, ack)
    await a.nothing('message_updated', 0.3)
    # Real emoji, including multi-code-point ones, are accepted.
    for emoji in ('👍', '❤️', '👍🏽', '👨\u200d👩\u200d👧', '🇫🇷', '1️⃣',
                  '🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067'
                  '\U000e007f'):
        ack = await b.call('react', {'message_id': msg['id'],
                                     'emoji': emoji, 'on': True})
        assert ack['ok'], (emoji, ack)
    await a.close()
    await b.close()


EMOJI = [chr(c) for c in range(0x1F600, 0x1F600 + 40)]


async def test_reactions_per_message_and_per_user_are_capped(loaded):
    base = loaded.url
    alice, bob, a, b, _ = await pair(base)
    carol, tc = await register(base)
    c = await connect(base, tc)
    group = (await a.call('create_group', {
        'name': 'g', 'members': [bob['username'], carol['username']]}))['room']
    msg = await send(a, group, 'react to me')

    async def react(client, emoji, on=True):
        return await client.call('react', {'message_id': msg['id'],
                                           'emoji': emoji, 'on': on})
    # One user: 10 distinct emoji, the 11th is too_large.
    for emoji in EMOJI[:10]:
        assert (await react(b, emoji))['ok']
    ack = await react(b, EMOJI[10])
    assert ack['error']['code'] == 'too_large', ack
    # The message: 20 distinct emoji at most.
    for emoji in EMOJI[10:20]:
        ack = await react(a, emoji)
        assert ack['ok'], ack
    assert len(ack['message']['reactions']) == 20
    ack = await react(c, EMOJI[20])
    assert ack['error']['code'] == 'too_large', ack
    # Joining an existing emoji is still fine.
    ack = await react(c, EMOJI[0])
    assert ack['message']['reactions'][EMOJI[0]] == [bob['id'], carol['id']]
    # Taking one back makes room for another.
    assert (await react(b, EMOJI[1], on=False))['ok']
    ack = await react(c, EMOJI[20])
    assert ack['ok'], ack
    assert len(ack['message']['reactions']) == 20
    for client in (a, b, c):
        await client.close()


async def test_client_msg_id_reused_elsewhere_is_a_conflict(base):
    alice, bob, a, b, room = await pair(base)
    carol, _ = await register(base)
    other = (await a.call('open_dm', {'username': carol['username']}))['room']
    first = await send(a, room, 'hello', cmid='same-id')
    # A true retry returns the first message.
    again = await send(a, room, 'hello', cmid='same-id')
    assert again['id'] == first['id']
    # The same id for another room, or another body, is a conflict.
    ack = await a.call('send_dm', {'room_id': other['id'], 'body': 'hello',
                                   'client_msg_id': 'same-id'})
    assert ack['ok'] is False and ack['error']['code'] == 'conflict', ack
    ack = await a.call('send_dm', {'to': carol['username'], 'body': 'hello',
                                   'client_msg_id': 'same-id'})
    assert ack['error']['code'] == 'conflict', ack
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'other',
                                   'client_msg_id': 'same-id'})
    assert ack['error']['code'] == 'conflict', ack
    status, data = await http(base, 'POST', f'/api/rooms/{other["id"]}/'
                              'messages', token=a.token,
                              json={'body': 'hello',
                                    'client_msg_id': 'same-id'})
    assert status == 409 and data['error']['code'] == 'conflict', data
    status, data = await http(base, 'POST', f'/api/rooms/{room["id"]}/'
                              'messages', token=a.token,
                              json={'body': 'hello',
                                    'client_msg_id': 'same-id'})
    assert status == 200 and data['message']['id'] == first['id']
    # Two different sends with one id in the same write batch: one wins,
    # the other is a conflict.
    acks = await asyncio.gather(*(a.call('send_dm', {
        'room_id': room['id'], 'body': f'racing {n}',
        'client_msg_id': 'race-id'}) for n in range(2)))
    assert sorted(ack['ok'] for ack in acks) == [False, True], acks
    assert [ack['error']['code'] for ack in acks if not ack['ok']] == [
        'conflict']
    history = (await b.call('history', {'room_id': room['id']}))['messages']
    assert [m['body'] for m in history] == ['hello', acks[0].get(
        'message', acks[1].get('message'))['body']]
    other_history = (await a.call('history', {
        'room_id': other['id']}))['messages']
    assert other_history == []
    await a.close()
    await b.close()


async def test_send_by_username_still_checks_blocks_once_known(base):
    """Sends by username skip the database once the dm is known; a block
    made after that still refuses them."""
    alice, bob, a, b, room = await pair(base)
    for n in range(3):
        ack = await b.call('send_dm', {'to': alice['username'],
                                       'body': f'hi {n}',
                                       'client_msg_id': f'to-{n}'})
        assert ack['ok'] and ack['message']['room_id'] == room['id'], ack
    assert (await b.call('open_dm', {'username': alice['username']}))[
        'room']['id'] == room['id']
    assert (await a.call('block', {'username': bob['username']}))['ok']
    a.drain('message')
    ack = await b.call('send_dm', {'to': alice['username'], 'body': 'again',
                                   'client_msg_id': 'to-blocked'})
    assert ack['error']['code'] == 'forbidden', ack
    ack = await b.call('open_dm', {'username': alice['username']})
    assert ack['error']['code'] == 'forbidden', ack
    await a.nothing('message', 0.3)
    # Bob's block of Alice does not stop Alice by username either way.
    ack = await a.call('send_dm', {'to': bob['username'], 'body': 'mine',
                                   'client_msg_id': 'a-to'})
    assert ack['ok'] and ack['message']['room_id'] == room['id']
    await a.close()
    await b.close()
