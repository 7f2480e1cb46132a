"""Nothing lost, nothing twice: crash safety, catch-up with sync,
idempotent sends, clean shutdown."""
import asyncio
import signal

from tests.kit import (NO_RATE_LIMITS as FAST, ServerProcess, all_events,
                       connect, http, pair, register, upload)


async def sender_loop(client, room_id, tag, acked, errors, stop):
    """Send one message at a time until told to stop or disconnected;
    record acked client_msg_ids and those answered with an error."""
    i = 0
    while not stop.is_set():
        cmid = f'{tag}-{i}'
        i += 1
        try:
            ack = await client.call('send_dm', {
                'room_id': room_id, 'body': f'body {cmid}',
                'client_msg_id': cmid}, timeout=5)
        except Exception:
            return  # connection gone: this one was not acked
        if ack['ok']:
            acked[cmid] = ack['message']['id']
        else:
            errors[cmid] = ack['error']['code']


async def setup_room(base):
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    room = (await a.call('open_dm', {'username': bob['username']}))['room']
    await a.close()
    return ta, tb, room


async def check_stored(base, token, room_id, acked, errors=()):
    """Every acked message is stored exactly once, seqs are 1..N without
    gaps, and nothing answered with an error was stored."""
    c = await connect(base, token)
    events = await all_events(c)
    await c.close()
    created = [e for e in events if e['type'] == 'message'
               and e['room_id'] == room_id]
    seqs = [e['seq'] for e in created]
    assert seqs == list(range(1, len(seqs) + 1)), 'gaps or repeats in seq'
    by_cmid = {}
    for e in created:
        cmid = e['message']['client_msg_id']
        assert cmid not in by_cmid, f'{cmid} stored twice'
        by_cmid[cmid] = e['message']['id']
    for cmid, message_id in acked.items():
        assert by_cmid.get(cmid) == message_id, f'acked {cmid} lost'
    for cmid in errors:
        assert cmid not in by_cmid, f'{cmid} was refused but stored'
    return len(created)


async def test_sigkill_loses_no_acked_message(tmp_path):
    server = ServerProcess(tmp_path, env=FAST).start()
    ta, tb, room = await setup_room(server.url)
    acked = {}
    for round_ in range(3):
        if round_:
            server.start()
        clients = [await connect(server.url, t) for t in (ta, tb, ta, tb)]
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(sender_loop(
            c, room['id'], f'r{round_}c{n}', acked, {}, stop))
            for n, c in enumerate(clients)]
        target = len(acked) + 150
        while len(acked) < target:  # let acks flow, then kill mid-stream
            await asyncio.sleep(0.01)
        server.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for c in clients:
            await c.sio.disconnect()
    server.start()
    stored = await check_stored(server.url, ta, room['id'], acked)
    assert stored >= len(acked) >= 450
    assert server.stop() == 0


async def test_sigterm_during_load_acks_only_what_is_stored(tmp_path):
    server = ServerProcess(tmp_path, env=FAST).start()
    ta, tb, room = await setup_room(server.url)
    acked, errors = {}, {}
    clients = [await connect(server.url, t) for t in (ta, tb, ta, tb)]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(sender_loop(
        c, room['id'], f'c{n}', acked, errors, stop))
        for n, c in enumerate(clients)]
    while len(acked) < 200:
        await asyncio.sleep(0.01)
    code = await server.astop(signal.SIGTERM)
    assert code == 0, server.read_log()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert set(errors.values()) <= {'unavailable'}
    server.start()
    await check_stored(server.url, ta, room['id'], acked, errors)
    assert server.stop() == 0


async def test_concurrent_retries_store_and_deliver_once(loaded):
    base = loaded.url
    alice, ta = await register(base)
    bob, tb = await register(base)
    a1, a2, b = [await connect(base, t) for t in (ta, ta, tb)]
    room = (await a1.call('open_dm', {'username': bob['username']}))['room']
    payload = {'room_id': room['id'], 'body': 'only once',
               'client_msg_id': 'retry-me'}
    acks = await asyncio.gather(*[(a1 if i % 2 else a2).call(
        'send_dm', payload) for i in range(20)])
    assert all(x['ok'] for x in acks)
    assert len({x['message']['id'] for x in acks}) == 1
    for c in (a1, a2, b):
        await c.next('message')
        await c.nothing('message', 0.5)
    hist = await b.call('history', {'room_id': room['id']})
    assert [m['body'] for m in hist['messages']] == ['only once']
    # A retry through HTTP answers the same message, delivers nothing.
    status, data = await http(base, 'POST', f'/api/rooms/{room["id"]}/'
                              'messages', token=ta, json=payload)
    assert status == 200 and data['message']['id'] == acks[0]['message']['id']
    await b.nothing('message', 0.3)
    for c in (a1, a2, b):
        await c.close()


async def test_burst_of_mixed_sends_each_get_their_own_answer(loaded):
    """Sends that arrive together are stored by the writer in one batch:
    each still gets the answer it would get alone, and one socket's
    pipelined sends keep their order."""
    base = loaded.url
    alice, bob, a, b, room = await pair(base)
    carol, tc = await register(base)
    c = await connect(base, tc)
    blocked_room = (await a.call('open_dm', {
        'username': carol['username']}))['room']
    assert (await c.call('block', {'username': alice['username']}))['ok']
    first = await a.call('send_dm', {'room_id': room['id'], 'body': 'first',
                                     'client_msg_id': 'first'})
    assert (await b.next('message'))['id'] == first['message']['id']
    status, body = await upload(base, a.token, b'notes', 'notes.txt')
    assert status == 201, body
    plain = [{'room_id': room['id'], 'body': f'p{i}',
              'client_msg_id': f'p{i}'} for i in range(30)]
    burst = plain[:10] + [
        {'room_id': room['id'], 'body': 'first', 'client_msg_id': 'first'},
        {'room_id': room['id'], 'body': 'again', 'client_msg_id': 'first'},
        {'room_id': room['id'], 'body': 'p3', 'client_msg_id': 'p3'},
        {'room_id': room['id'], 'body': 'p3 retried', 'client_msg_id': 'p3'},
        {'room_id': blocked_room['id'], 'body': 'hi carol',
         'client_msg_id': 'to-carol'},
        {'room_id': room['id'], 'body': 'a reply', 'client_msg_id': 'reply',
         'reply_to': first['message']['id']},
        {'room_id': room['id'], 'body': 'bad reply',
         'client_msg_id': 'bad-reply', 'reply_to': 2**40},
        {'room_id': room['id'], 'body': 'with file', 'client_msg_id': 'file',
         'attachments': [body['attachment']['id']]},
    ] + plain[10:]
    acks = await asyncio.gather(*[a.call('send_dm', data) for data in burst])
    by_cmid = {}
    for data, ack in zip(burst, acks):
        by_cmid.setdefault(data['client_msg_id'], []).append(ack)
    # A retry gets the stored message; the same id for another body is a
    # conflict, not a silent answer with the old message.
    retry, reused = by_cmid['first']
    assert retry == first
    assert reused['error']['code'] == 'conflict'
    p3, p3_retry, p3_reused = by_cmid['p3']
    assert p3_retry == p3 and p3['message']['body'] == 'p3'
    assert p3_reused['error']['code'] == 'conflict'
    assert by_cmid['to-carol'][0]['error']['code'] == 'forbidden'
    assert by_cmid['bad-reply'][0]['error']['code'] == 'invalid'
    reply = by_cmid['reply'][0]['message']
    assert reply['reply_to'] == first['message']['id']
    assert by_cmid['file'][0]['message']['attachments'] == [
        body['attachment']]
    stored = [ack['message'] for ack in acks if ack['ok']]
    new = {m['id']: m for m in stored if m['client_msg_id'] != 'first'}
    assert sorted(m['seq'] for m in new.values()) == list(range(2, 34))
    order = [m['client_msg_id'] for m in sorted(new.values(),
                                                key=lambda m: m['seq'])]
    sent_ids = {m['client_msg_id'] for m in new.values()}
    assert order == [cmid for cmid in dict.fromkeys(
        d['client_msg_id'] for d in burst) if cmid in sent_ids]
    # Bob got each new message once; carol got nothing.
    got = [await b.next('message') for _ in range(len(new))]
    assert sorted(m['id'] for m in got) == sorted(new)
    assert await b.nothing('message')
    assert await c.nothing('message', timeout=0.1)
    for client in (a, b, c):
        await client.close()


async def test_sync_after_disconnect_replays_everything_once(loaded):
    base = loaded.url
    me, tm = await register(base)
    friends = [await register(base) for _ in range(3)]
    senders = [await connect(base, t) for _, t in friends]
    rooms = [(await s.call('open_dm', {'username': me['username']}))['room']
             for s in senders]
    # Catch up once while connected, then go away.
    receiver = await connect(base, tm)
    known = {}
    for e in await all_events(receiver):
        known[str(e['room_id'])] = e['seq']
    await receiver.close()

    sent = {}

    async def send_many(sender, room, count):
        for i in range(count):
            ack = await sender.call('send_dm', {
                'room_id': room['id'], 'body': f'{room["id"]}:{i}',
                'client_msg_id': f'{room["id"]}-{i}'})
            assert ack['ok'], ack
            sent[ack['message']['id']] = ack['message']
    await asyncio.gather(*[send_many(s, r, 400)
                           for s, r in zip(senders, rooms)])
    # Edits and deletes while the receiver is away.
    ids = sorted(sent)
    for message_id in ids[:10]:
        sender = next(s for s, r in zip(senders, rooms)
                      if r['id'] == sent[message_id]['room_id'])
        ack = await sender.call('edit_message', {'message_id': message_id,
                                                 'body': 'edited'})
        assert ack['ok'], ack
    for message_id in ids[10:15]:
        sender = next(s for s, r in zip(senders, rooms)
                      if r['id'] == sent[message_id]['room_id'])
        assert (await sender.call('delete_message',
                                  {'message_id': message_id}))['ok']

    receiver = await connect(base, tm)
    events = await all_events(receiver, known)
    pages = len(events) // 500
    assert pages >= 2  # it really paged
    seen = set()
    last = {}
    for room in rooms:
        mine = [e for e in events if e['room_id'] == room['id']]
        changes = sum(1 for m in ids[:15] if sent[m]['room_id'] == room['id'])
        seqs = [e['seq'] for e in mine]
        assert seqs == list(range(1, 401 + changes)), 'missed or repeated'
        last[str(room['id'])] = 400 + changes
        for e in mine:
            assert (e['room_id'], e['seq']) not in seen
            seen.add((e['room_id'], e['seq']))
    created = [e for e in events if e['type'] == 'message']
    assert sorted(e['message']['id'] for e in created) == ids
    updates = [e for e in events if e['type'] == 'message_updated']
    assert len(updates) == 15
    # The replay ends in the current state.
    final = {}
    for e in events:
        final[e['message']['id']] = e['message']
    for message_id in ids[:10]:
        assert final[message_id]['body'] == 'edited'
        assert final[message_id]['edited_at'] is not None
    for message_id in ids[10:15]:
        assert final[message_id]['deleted'] is True
        assert final[message_id]['body'] == ''
    # Nothing more to catch up afterwards.
    ack = await receiver.call('sync', {'rooms': last})
    assert ack['events'] == [] and ack['has_more'] is False
    for c in senders + [receiver]:
        await c.close()
