"""A Socket.IO CONNECT racing the close of its Engine.IO session (a CLOSE
posted at the same moment over long-polling, or the websocket closed while
the token is being checked) leaves nothing behind: the user can connect
again up to their limit, their contacts see them go offline, the socket
count is back to zero and the server logs no traceback."""
import asyncio
import json

import aiohttp
import pytest

from tests.kit import ServerProcess, connect, register

# Offline soon after the last socket closes; a small per-user limit, so a
# few sockets left behind already refuse the user's next connect.
PER_USER = 4
ENV = {'POSTBOX_PRESENCE_GRACE_SECONDS': '0.3',
       'POSTBOX_MAX_CONNECTIONS_PER_USER': str(PER_USER)}
RACES = 25
# How much later each websocket race closes than the one before.
STAGGER_SECONDS = 0.0003
# How long the server may take to let go of everything after the races.
SETTLE_SECONDS = 10


@pytest.fixture
def racy(tmp_path):
    server = ServerProcess(tmp_path, env=ENV).start()
    yield server
    assert server.stop() == 0, server.read_log()


async def connected_sockets(session, base) -> float:
    async with session.get(base + '/metrics') as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('postbox_connected_sockets '):
                return float(line.split()[1])
    raise AssertionError('no postbox_connected_sockets in /metrics')


async def handshake(session, endpoint) -> str:
    async with session.get(endpoint) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return json.loads(text[1:])['sid']


async def polling_race(session, base, token, attempt):
    """CONNECT and CLOSE posted at the same moment on two connections."""
    endpoint = base + '/socket.io/?EIO=4&transport=polling'
    sid = await handshake(session, endpoint)

    async def post(body):
        async with session.post(endpoint + '&sid=' + sid, data=body) as resp:
            await resp.read()  # 200, or 400 once the session is gone

    await asyncio.gather(post('40' + json.dumps({'token': token})),
                         post('1'))


async def websocket_race(session, base, token, attempt):
    """CONNECT posted while the session upgrades to a websocket, which is
    closed (an Engine.IO CLOSE, then the websocket) while the token is
    checked. Over a websocket alone a CONNECT is handled before the next
    frame is read; the upgrade is where a CONNECT and a websocket's close
    meet. The close goes a little later each attempt, a few of them
    landing while the connect handler awaits."""
    endpoint = base + '/socket.io/?EIO=4&transport=polling'
    sid = await handshake(session, endpoint)
    ws = await session.ws_connect(
        base + '/socket.io/?EIO=4&transport=websocket&sid=' + sid)
    await ws.send_str('2probe')
    probe = await ws.receive(timeout=5)
    assert probe.data == '3probe', probe

    async def connect():
        async with session.post(endpoint + '&sid=' + sid,
                                data='40' + json.dumps({'token': token})) \
                as resp:
            await resp.read()

    async def close():
        await asyncio.sleep(attempt * STAGGER_SECONDS)  # not a wait: a race
        await ws.send_str('5')  # upgraded
        await ws.send_str('1')
        await ws.close()

    await asyncio.gather(connect(), close())


async def eventually(check, what):
    """Wait until ``check()`` (a coroutine function) is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while not await check():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.parametrize('race', [polling_race, websocket_race],
                         ids=['polling', 'websocket'])
async def test_connect_racing_close_leaves_no_socket(racy, race):
    base = racy.url
    carol, carol_token = await register(base)
    bob, bob_token = await register(base)
    b = await connect(base, bob_token)
    ack = await b.call('open_dm', {'username': carol['username']})
    assert ack['ok'], ack

    async with aiohttp.ClientSession() as session:
        for attempt in range(RACES):
            await race(session, base, carol_token, attempt)

        async def carol_offline():
            ack = await b.call('presence', {'usernames': [carol['username']]})
            assert ack['ok'], ack
            return ack['presence'][carol['username']]['online'] is False

        async def only_bob():
            return await connected_sockets(session, base) == 1

        # Her contact sees her offline, and only bob's socket is counted.
        await eventually(carol_offline, 'carol still shown online')
        await eventually(only_bob, 'sockets left behind by the races')

    # Every place of her connection limit is free again.
    clients = [await connect(base, carol_token) for _ in range(PER_USER)]
    for client in clients + [b]:
        await client.close()
    log = racy.read_log()
    assert 'Traceback' not in log, log
    assert 'Cannot send to sid' not in log, log


async def test_refused_namespace_or_second_connect_says_code(racy):
    """A CONNECT python-socketio refuses itself (an unknown namespace, a
    second CONNECT) is answered {code, message} like every refusal, not a
    bare string a client's ``err.data`` cannot read."""
    _, token = await register(racy.url)
    auth = json.dumps({'token': token})
    async with aiohttp.ClientSession() as session:
        for first, connect, prefix in [(None, '40/nope,', '44/nope,'),
                                       ('40', '40', '44')]:
            ws = await session.ws_connect(
                racy.url + '/socket.io/?EIO=4&transport=websocket')
            assert (await ws.receive(timeout=5)).data.startswith('0')
            if first:
                await ws.send_str(first + auth)
                assert (await ws.receive(timeout=5)).data.startswith('40{')
            await ws.send_str(connect + auth)
            refused = (await ws.receive(timeout=5)).data
            assert refused.startswith(prefix), refused
            error = json.loads(refused[len(prefix):])
            assert error['code'] == 'invalid' and error['message'], error
            await ws.close()
