"""Two processes writing to one room at once, on a real PostgreSQL (a
throwaway cluster the tests start) and on one shared SQLite file, joined by
a real Redis: seq stays 1..N without gaps and retries stay idempotent."""
import asyncio

import pytest

from tests.kit import FAST_REDIS_ENV, connect, register, running_servers


@pytest.fixture(scope='module', params=['postgres', 'sqlite'])
def pair_of_processes(request, tmp_path_factory, redis):
    env = {'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
           'POSTBOX_REDIS_CHANNEL': 'pb-' + request.param,
           'POSTBOX_SEND_RATE_PER_SECOND': '100000',
           'POSTBOX_SEND_BURST': '100000',
           'POSTBOX_EVENT_RATE_PER_SECOND': '100000',
           'POSTBOX_EVENT_BURST': '100000'}
    if request.param == 'postgres':
        env['POSTBOX_DATABASE_URL'] = \
            request.getfixturevalue('pg_cluster').create_database()
    data_dir = tmp_path_factory.mktemp(request.param)
    with running_servers(data_dir, 2, env) as servers:
        yield servers


async def test_seq_without_gaps_with_two_writers(pair_of_processes):
    p1, p2 = pair_of_processes
    alice, ta = await register(p1.url)
    bob, tb = await register(p2.url)
    senders = [await connect(p1.url, ta), await connect(p2.url, ta),
               await connect(p1.url, tb), await connect(p2.url, tb)]
    watcher = await connect(p2.url, tb)
    ack = await senders[0].call('open_dm', {'username': bob['username']})
    room_id = ack['room']['id']
    count = 120
    acks = await asyncio.gather(*[
        senders[i % 4].call('send_dm', {
            'room_id': room_id, 'body': f'm{i}', 'client_msg_id': f'c{i}'})
        for i in range(count)])
    assert [a for a in acks if not a['ok']] == []
    assert sorted(a['message']['seq'] for a in acks) == \
        list(range(1, count + 1))
    for server, token in ((p1, ta), (p2, tb)):
        reader = await connect(server.url, token)
        hist = await reader.call('history', {'room_id': room_id,
                                             'after': 0, 'limit': 100})
        more = await reader.call('history', {'room_id': room_id,
                                             'after': 100, 'limit': 100})
        await reader.close()
        seqs = [m['seq'] for m in hist['messages'] + more['messages']]
        assert seqs == list(range(1, count + 1))
    # A socket on one process saw every message live, once.
    seen = sorted([(await watcher.next('message'))['seq']
                   for _ in range(count)])
    assert seen == list(range(1, count + 1))
    await watcher.nothing('message', 0.3)
    for client in senders + [watcher]:
        await client.close()


async def test_concurrent_retries_on_two_processes_make_one_message(
        pair_of_processes):
    p1, p2 = pair_of_processes
    alice, ta = await register(p1.url)
    bob, tb = await register(p2.url)
    a1 = await connect(p1.url, ta)
    a2 = await connect(p2.url, ta)
    b = await connect(p2.url, tb)
    ack = await a1.call('open_dm', {'username': bob['username']})
    room_id = ack['room']['id']
    count = 30
    for i in range(count):
        # The same send, retried from a socket on each process at once.
        first, second = await asyncio.gather(*[
            client.call('send_dm', {'room_id': room_id, 'body': f'r{i}',
                                    'client_msg_id': f'same-{i}'})
            for client in (a1, a2)])
        assert first['ok'] and second['ok'], (first, second)
        assert first['message']['id'] == second['message']['id']
        assert first['message']['seq'] == i + 1
    hist = await b.call('history', {'room_id': room_id, 'limit': 100})
    assert [m['body'] for m in hist['messages']] == \
        [f'r{i}' for i in range(count)]
    # Bob got each message once (live events from two processes may
    # interleave; clients order by seq).
    got = sorted([await b.next('message') for _ in range(count)],
                 key=lambda m: m['seq'])
    assert [m['body'] for m in got] == [f'r{i}' for i in range(count)]
    await b.nothing('message', 0.3)
    for client in (a1, a2, b):
        await client.close()


async def test_bursts_of_the_same_sends_on_two_processes_store_each_once(
        pair_of_processes):
    """A burst of sends, retried as a burst on another process at the same
    moment: each process stores them in one batch, the two batches collide
    on the unique (sender, client_msg_id) index, and each send still
    becomes one message, acked with it on both sides."""
    p1, p2 = pair_of_processes
    alice, ta = await register(p1.url)
    bob, tb = await register(p2.url)
    a1 = await connect(p1.url, ta)
    a2 = await connect(p2.url, ta)
    ack = await a1.call('open_dm', {'username': bob['username']})
    room_id = ack['room']['id']
    count = 40
    for burst in range(3):
        calls = [client.call('send_dm', {
            'room_id': room_id, 'body': f'{burst}.{i}',
            'client_msg_id': f'burst-{burst}-{i}'})
            for i in range(count) for client in (a1, a2)]
        acks = await asyncio.gather(*calls)
        assert [a for a in acks if not a['ok']] == []
        for i in range(count):
            first, second = acks[2 * i], acks[2 * i + 1]
            assert first['message']['id'] == second['message']['id']
            assert first['message']['body'] == f'{burst}.{i}'
        seqs = sorted({a['message']['seq'] for a in acks})
        assert seqs == list(range(burst * count + 1, (burst + 1) * count + 1))
    stored = []
    for after in (0, 100):
        page = await a1.call('history', {'room_id': room_id, 'after': after,
                                         'limit': 100})
        stored += page['messages']
    assert [m['seq'] for m in stored] == list(range(1, 3 * count + 1))
    for client in (a1, a2):
        await client.close()
