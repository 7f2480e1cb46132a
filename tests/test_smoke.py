from tests.helpers import connect, http, register


async def test_dm_roundtrip(base):
    alice, ta = await register(base)
    bob, tb = await register(base)
    a = await connect(base, ta)
    b = await connect(base, tb)
    ack = await a.call('open_dm', {'username': bob['username']})
    assert ack['ok'], ack
    room = ack['room']
    assert (await b.next('room'))['id'] == room['id']
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'hi',
                                   'client_msg_id': 'c1'})
    assert ack['ok'], ack
    msg = await b.next('message')
    assert msg['body'] == 'hi' and msg['seq'] == 1
    ack = await b.call('rooms', {})
    assert ack['rooms'][0]['unread'] == 1, ack
    ack = await b.call('sync', {'rooms': {}})
    assert ack['ok'] and len(ack['events']) == 1, ack
    await a.close()
    await b.close()
