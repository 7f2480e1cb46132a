"""Fast tests of the recovery session's bookkeeping (no server process):
what a session counts as sent, and that a live event its replay already
carried is not sent again."""
import asyncio
import json

from engineio import packet as eio_packet
from socketio import packet

from server.metrics import Metrics
from server.transport.recovery import Recovery, Session


class _Server:
    """What Recovery needs of the Socket.IO server: the packet class and
    the send to one Engine.IO session, kept here to be read back."""
    packet_class = packet.Packet

    def __init__(self):
        self.sent = []

    async def send_eio_packet(self, eio_sid, pkt):
        assert pkt.packet_type == eio_packet.MESSAGE
        decoded = packet.Packet(encoded_packet=pkt.data)
        self.sent.append(decoded.data)


def test_only_what_the_client_received_counts_as_sent():
    session = Session('pid', 1, {7: 3})
    for seq in (4, 5, 6):
        session.record((7, seq), keep=10)
    marks, extras = session.received(2)  # the client saw offsets 1 and 2
    assert marks == {7: 5} and extras == {}
    assert session.has_sent((7, 5)) and not session.has_sent((7, 6))
    restored = Session.from_json(json.loads(json.dumps(session.to_json())))
    assert restored.has_sent((7, 4)) and not restored.has_sent((7, 6))
    assert not session.has_sent(None)


def test_folded_sends_leave_the_sent_set():
    session = Session('pid', 1, {})
    for seq in range(1, 6):
        session.record((7, seq), keep=2)
    assert sorted(session.sent) == [(7, 4), (7, 5)]
    assert session.marks == {7: 3}


def test_a_live_copy_of_a_replayed_event_is_not_sent_twice():
    """The replay read the log after a message's commit, but the
    message's own live emit came after the replay: the client gets it
    once, and the next event carries the next offset."""
    server, metrics = _Server(), Metrics()
    recovery = Recovery(server, None, metrics, 60, 100)
    session = Session('pid', 1, {7: 9})
    recovery.live['sid'] = session

    async def run():
        await recovery._send('sid', 'eio', session, 'message',
                             {'room_id': 7, 'seq': 10, 'body': 'replayed'},
                             (7, 10))
        for seq in (10, 11):
            await recovery.deliver('sid', 'eio', 'message',
                                   {'room_id': 7, 'seq': seq, 'body': 'live'})
    asyncio.run(run())
    assert [(m['seq'], offset) for _, m, offset in server.sent] == \
        [(10, '1'), (11, '2')]
    assert metrics.recovery_duplicates._value.get() == 1


def _stop_sessions(recovery, user_id, count):
    """Connect and drop ``count`` opted-in sockets of ``user_id``; their
    pids, oldest first."""
    pids = []

    async def run():
        for i in range(count):
            session = Session(f'p{user_id}-{i}', user_id, {})
            recovery.live[f's{user_id}-{i}'] = session
            await recovery.stop(f's{user_id}-{i}', ())
            pids.append(session.pid)
    asyncio.run(run())
    return pids


def test_a_user_looping_connects_keeps_only_the_newest_sessions():
    from server.transport.recovery_saved import SAVED_PER_USER
    recovery = Recovery(_Server(), None, Metrics(), 60, 100)
    looping = _stop_sessions(recovery, 1, SAVED_PER_USER + 5)
    other = _stop_sessions(recovery, 2, 1)
    assert list(recovery.frozen.local) == looping[5:] + other


def test_a_user_looping_connects_keeps_only_the_newest_sessions_in_redis(
        tmp_path):
    import redis.asyncio as aioredis
    from server.transport.recovery_saved import SAVED_PER_USER
    from tests.redisproc import RedisProcess

    class Shared:
        key_prefix = 'pbtest'

    proc = RedisProcess(tmp_path).start()
    try:
        recovery = Recovery(_Server(), None, Metrics(), 60, 100)
        recovery.shared = Shared()

        async def taken(user_id, pids):
            recovery.shared.redis = aioredis.from_url(proc.url)
            try:
                return [await recovery.frozen.take(user_id, pid) is not None
                        for pid in pids]
            finally:
                await recovery.shared.redis.aclose()

        async def stop_all():
            recovery.shared.redis = aioredis.from_url(proc.url)
            try:
                pids = []
                for i in range(SAVED_PER_USER + 5):
                    session = Session(f'p{i}', 1, {})
                    recovery.live[f's{i}'] = session
                    await recovery.stop(f's{i}', ())
                    pids.append(session.pid)
                return pids
            finally:
                await recovery.shared.redis.aclose()
        pids = asyncio.run(stop_all())
        assert asyncio.run(taken(1, pids)) == [False] * 5 + \
            [True] * SAVED_PER_USER
    finally:
        proc.stop()


def test_one_emit_to_many_opted_in_sockets_gives_each_its_own_offset():
    """The payload is encoded once per emit; each socket still gets the
    whole event with its own offset, and a changed payload is encoded
    anew."""
    server, metrics = _Server(), Metrics()
    recovery = Recovery(server, None, metrics, 60, 100)
    for sid, count in (('a', 0), ('b', 4)):
        session = recovery.live[sid] = Session('p' + sid, 1, {7: 9})
        for seq in range(count):
            session.record((8, seq + 1), keep=100)
    data = {'room_id': 7, 'seq': 10, 'body': 'é "quoted" ]'}

    async def run():
        for sid in ('a', 'b'):
            await recovery.deliver(sid, 'eio', 'message', data)
        await recovery.deliver('a', 'eio', 'message',
                               {**data, 'seq': 11, 'body': 'next'})
    asyncio.run(run())
    assert server.sent == [['message', data, '1'], ['message', data, '5'],
                           ['message', {**data, 'seq': 11, 'body': 'next'},
                            '2']]


def test_sessions_taken_or_expired_leave_nothing_behind():
    """A process that saw many users come and go keeps nothing of those
    whose sessions were taken back or expired."""
    recovery = Recovery(_Server(), None, Metrics(), 60, 100)
    pids = {user: _stop_sessions(recovery, user, 3) for user in (1, 2, 3)}

    async def take_all():
        for user in (1, 2):
            for pid in pids[user]:
                assert await recovery.frozen.take(user, pid) is not None
    asyncio.run(take_all())
    for session in recovery.frozen.local.values():
        session.saved_at -= 61  # user 3's are past the window
    recovery.frozen._expire()
    assert not recovery.frozen.local and not recovery.frozen._mine
