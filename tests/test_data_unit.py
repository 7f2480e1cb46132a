"""Fast tests of the writer's batching, the data layer's dialect and the
message services, in this process against a temporary SQLite file (no
server subprocess): what a caller of the services sees."""
import asyncio
import contextlib
import sqlite3
import threading
from typing import NamedTuple

import pytest

import models
from models import Membership, Message, Room, User
from server.config import Config, ConfigError, load_config
from server.data import messages as data
from server.data import database as database_module
from server.data.database import (SQL_CACHE_MAX, SQLITE_CHUNK_ROWS,
                                   SqliteDialect, WriterTurns, open_database)
from server.data.faults import BUSY, ERROR, classify
from server.errors import Conflict, Forbidden, Invalid, TooLarge
from server.services import (groups, messages, outbox, rooms, search,
                             sending)
from server.services.context import Context
from server.services.live import Typing
from server.store import GATHER_BELOW, GATHER_SKIP, Batched, Store


def _context(store, config):
    try:  # the context built once, with its services
        return Context(store, config, 'x' * 32, typing=Typing(2.0))
    except TypeError:  # the context services are attached to later
        ctx = Context(store, config, 'x' * 32)
        ctx.typing = Typing(2.0)
        return ctx


@pytest.fixture
async def world(tmp_path):
    """(ctx, alice id, bob id, their dm room id, batch sizes committed)."""
    config = Config()
    database = open_database(f'sqlite:///{tmp_path / "unit.db"}', config)
    batches = []
    store = Store(database, on_batch=lambda size, _: batches.append(size))
    store.start()
    ctx = _context(store, config)

    def people():
        return [User.create(username=name, display_name=name.title(),
                            created_at=0).id for name in ('alice', 'bob')]
    alice, bob = await store.write(people)
    room, created = await rooms.open_dm(ctx, alice, 'bob')
    assert created
    await store.flush()
    batches.clear()
    yield ctx, alice, bob, room['id'], batches
    await store.close()
    database.close()
    models.db.initialize(None)


async def _queued(store, count):
    """Wait (yielding to the loop) until ``count`` writes are queued."""
    async def until():
        while store.pending < count:
            await asyncio.sleep(0)
    await asyncio.wait_for(until(), 10)


async def _blocked_writer(store):
    """Hold the writer inside a write until the returned event is set, so
    that what queues meanwhile meets in its next batch."""
    running, release = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(10)
    held = store.write(hold)
    await asyncio.get_running_loop().run_in_executor(None, running.wait, 10)
    return held, release


async def test_queued_sends_commit_as_one_batch_with_gapless_seqs(
        world, monkeypatch):
    ctx, alice, bob, room_id, batches = world
    runs = []
    many = sending.store_sends.many
    monkeypatch.setattr(sending.store_sends, 'many',
                        lambda requests: runs.append(len(requests))
                        or many(requests))
    held, release = await _blocked_writer(ctx.store)
    sends = [asyncio.ensure_future(messages.send_message(
        ctx, alice if i % 2 else bob, f'm{i}', f'c{i}', room_id=room_id))
        for i in range(20)]
    # Every send checked and queued before the writer is let go.
    await _queued(ctx.store, 21)
    release.set()
    await held
    sent = await asyncio.gather(*sends)
    assert batches == [1, 20] and runs == [20]
    assert [s.message['seq'] for s in sent] == list(range(1, 21))
    assert all(s.created for s in sent)
    page = await messages.history(ctx, alice, room_id, limit=100)
    assert [m['body'] for m in page['messages']] == \
        [f'm{i}' for i in range(20)]


async def test_a_batch_refuses_each_bad_send_alone(world):
    ctx, alice, bob, room_id, batches = world
    first = await messages.send_message(ctx, alice, 'hello', 'a1',
                                        room_id=room_id)
    held, release = await _blocked_writer(ctx.store)
    calls = [
        messages.send_message(ctx, bob, 'fine', 'b1', room_id=room_id),
        messages.send_message(ctx, alice, 'hello', 'a1', room_id=room_id),
        messages.send_message(ctx, alice, 'other', 'a1', room_id=room_id),
        messages.send_message(ctx, bob, 're', 'b2', room_id=room_id,
                              reply_to=first.message['id'] + 1000),
        messages.send_message(ctx, bob, 'fine', 'b1', room_id=room_id),
        messages.send_message(ctx, bob, 'also', 'b3', room_id=room_id,
                              reply_to=first.message['id']),
    ]
    futures = [asyncio.ensure_future(c) for c in calls]
    await _queued(ctx.store, 1 + len(calls))
    release.set()
    await held
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert batches[-1] == len(calls)
    fine, retry, reused, bad_reply, retry_in_batch, also = results
    assert fine.created and fine.message['seq'] == 2
    assert not retry.created and retry.message['id'] == first.message['id']
    assert isinstance(reused, Conflict) and reused.code == 'conflict'
    assert isinstance(bad_reply, Invalid)
    assert not retry_in_batch.created
    assert retry_in_batch.message['id'] == fine.message['id']
    assert also.message['seq'] == 3 and also.message['reply_to'] == \
        first.message['id']
    # Only what was stored took a seq.
    assert await ctx.store.read(
        lambda: Room.get_by_id(room_id).last_seq) == 3


async def test_checks_refuse_before_anything_is_queued(world):
    ctx, alice, bob, room_id, batches = world
    for body, error in (('', Invalid), (5, Invalid),
                        ('x' * (ctx.config.body_max_chars + 1), TooLarge)):
        with pytest.raises(error):
            await messages.send_message(ctx, alice, body, 'c',
                                        room_id=room_id)
    with pytest.raises(Invalid):
        await messages.send_message(ctx, alice, 'hi', '', room_id=room_id)
    with pytest.raises(Invalid):
        await messages.send_message(ctx, alice, 'hi', 'c')
    assert batches == [] and ctx.store.pending == 0


async def test_a_removed_member_is_refused_inside_the_transaction(world):
    ctx, alice, bob, room_id, batches = world
    group = await groups.create_group(ctx, alice, 'g', ['bob'])
    info = await rooms.member_room(ctx, bob, group['id'])  # cached
    await ctx.store.write(lambda: Membership.delete().where(
        Membership.room == group['id'], Membership.user == bob).execute())
    with pytest.raises(Forbidden):
        await ctx.store.write(sending.store_sends, sending.SendRequest(
            ctx, info, bob, 'late', 'l1', (), None))


async def test_sending_ends_the_senders_typing(world):
    ctx, alice, bob, room_id, batches = world
    assert ctx.typing.update(room_id, alice, 'sid', True)
    sent = await messages.send_message(ctx, alice, 'hi', 't1',
                                       room_id=room_id)
    assert sent.typing_stopped
    assert ctx.typing.update(room_id, alice, 'sid', True)
    again = await messages.send_message(ctx, alice, 'hi', 't1',
                                        room_id=room_id)
    assert not again.created and not again.typing_stopped


async def test_a_batch_wider_than_one_statement_stores_every_send(world):
    """One batch of sends to more rooms than a multi-row statement holds
    (``SQLITE_CHUNK_ROWS``), its rows written in slices of 128, 16, 4 and 2:
    each room takes its next seq, each message its own id and text, and
    a retry in the next batch finds its message."""
    ctx, alice, bob, room_id, batches = world
    count = SQLITE_CHUNK_ROWS + 22

    def people():
        return [User.create(username=f'wide{i}', display_name='W',
                            created_at=0).id for i in range(count)]
    others = await ctx.store.write(people)
    room_ids = [(await rooms.open_dm(ctx, alice, f'wide{i}'))[0]['id']
                for i in range(count)]
    held, release = await _blocked_writer(ctx.store)
    sends = [asyncio.ensure_future(messages.send_message(
        ctx, others[i], f'wide body {i}', f'w{i}', room_id=r))
        for i, r in enumerate(room_ids)]
    await _queued(ctx.store, count + 1)
    release.set()
    await held
    sent = [s.message for s in await asyncio.gather(*sends)]
    assert batches[-1] == count
    assert [(m['room_id'], m['seq'], m['body']) for m in sent] == \
        [(r, 1, f'wide body {i}') for i, r in enumerate(room_ids)]
    assert len({m['id'] for m in sent}) == count
    again = await asyncio.gather(*(messages.send_message(
        ctx, others[i], f'wide body {i}', f'w{i}', room_id=r)
        for i, r in enumerate(room_ids)))
    assert [(a.message['id'], a.created) for a in again] == \
        [(m['id'], False) for m in sent]
    last = await messages.send_message(ctx, alice, 'and back', 'b1',
                                       room_id=room_ids[-1])
    assert last.message['seq'] == 2
    for i in (0, SQLITE_CHUNK_ROWS, count - 1):  # a search finds each one's text
        found = await search.search(ctx, alice, f'body {i}',
                                    room_id=room_ids[i])
        assert [m['id'] for m in found['results']] == [sent[i]['id']]


async def test_the_sql_text_cache_stays_bounded(world):
    """``execute`` keeps at most ``SQL_CACHE_MAX`` translated texts: IN
    lists of ever new lengths do not grow it for good, and a text past
    the bound still runs."""
    ctx, alice, bob, room_id, batches = world

    def many():
        return [data.execute(
            f'SELECT "id" FROM "user" WHERE "id" IN ({", ".join("?" * n)})',
            [alice] * n).fetchone()[0] for n in range(1, SQL_CACHE_MAX + 50)]
    found = await ctx.store.read(many)
    assert found == [alice] * (SQL_CACHE_MAX + 49)
    assert len(database_module._SQL_CACHE) <= SQL_CACHE_MAX


async def test_edit_react_delete_take_the_next_seqs(world):
    ctx, alice, bob, room_id, batches = world
    sent = await messages.send_message(ctx, alice, 'hi', 'e1',
                                       room_id=room_id)
    mid = sent.message['id']
    edited, changed, _ = await messages.edit_message(ctx, alice, mid, 'hey')
    assert changed and edited['update_seq'] == 2 and edited['body'] == 'hey'
    with pytest.raises(Forbidden):
        await messages.edit_message(ctx, bob, mid, 'mine now')
    reacted, changed, _ = await messages.react(ctx, bob, mid, '👍', True)
    assert changed and reacted['reactions'] == {'👍': [bob]}
    gone, changed, _ = await messages.delete_message(ctx, alice, mid)
    assert changed and gone['deleted'] and gone['reactions'] == {}
    caught_up = await messages.sync(ctx, bob, {str(room_id): 1})
    assert [(e['type'], e['seq']) for e in caught_up['events']] == [
        ('message_updated', 2), ('message_updated', 3),
        ('message_updated', 4)]
    marker, unread, moved, _ = await messages.mark_read(ctx, bob, room_id,
                                                        99)
    assert (marker, unread, moved) == (4, 0, True)


async def test_the_dialect_is_chosen_when_the_database_opens(tmp_path):
    database = open_database(f'sqlite:///{tmp_path / "d.db"}', Config())
    assert isinstance(database.dialect, SqliteDialect)
    assert database.dialect.begin == {'lock_type': 'IMMEDIATE'}


def test_batched_alone_raises_its_refusal():
    op = Batched(lambda items: [Invalid('no') if i < 0 else i * 2
                                for i in items])
    assert op(4) == 8
    with pytest.raises(Invalid):
        op(-1)
    assert 'Batched' in repr(op)


async def test_data_functions_read_what_the_send_wrote(world):
    ctx, alice, bob, room_id, batches = world
    sent = await messages.send_message(ctx, alice, 'hi', 'd1',
                                       room_id=room_id)

    def read():
        return (data.stored_ids({(alice, 'd1'), (bob, 'd1')}),
                data.rooms_of({sent.message['id'], 10 ** 9}),
                data.events_after(room_id, 0, 10),
                Message.get_by_id(sent.message['id']).update_seq)
    stored, where, events, update_seq = await ctx.store.read(read)
    assert stored == {(alice, 'd1'): sent.message['id']}
    assert where == {sent.message['id']: room_id}
    assert events == [(1, 'message', sent.message['id'], None)]
    assert update_seq == 1


async def test_the_outbox_stops_when_woken_as_it_is_closed(world):
    """A delivery that finishes (and wakes the dispatcher) in the loop turn
    where shutdown closes it: the dispatcher still stops. On Python 3.11
    ``asyncio.wait_for`` swallowed that cancel and the server's SIGTERM
    shutdown never finished."""
    ctx = world[0]
    for _ in range(3):
        dispatcher = outbox.Dispatcher(ctx, {})
        dispatcher.start()
        while dispatcher.queued is None:  # claimed nothing, now waiting
            await asyncio.sleep(0.01)
        dispatcher.wake()
        await asyncio.sleep(0)  # the wait ends in this turn...
        await asyncio.wait_for(dispatcher.close(), 5)  # ...as it is closed


def test_writer_turns_take_turns_across_handles(tmp_path):
    """Two writers of one SQLite file (as two processes would: two open
    file handles) take turns; a turn ends however its transaction ends;
    one that is held too long fails the waiting write as busy, as SQLite's
    own busy timeout does."""
    path = str(tmp_path / 'db.sqlite-writer.lock')
    first, second = WriterTurns(path), WriterTurns(path, wait=0.2)
    order = []
    with first:
        waiter = threading.Thread(
            target=lambda: second.__enter__() or order.append('second'))
        waiter.start()
        waiter.join(0.05)
        order.append('first done')
    waiter.join(5)
    assert order == ['first done', 'second']
    with pytest.raises(sqlite3.OperationalError) as refused:
        with WriterTurns(path, wait=0.05):
            pass
    assert classify(refused.value)[0] == BUSY
    second.__exit__(None, None, None)
    with pytest.raises(ZeroDivisionError):
        with first:
            1 / 0
    with second:  # the failed transaction's turn ended
        pass
    for turns in (first, second):
        turns.close()


def test_an_unusable_lock_file_does_not_stop_writes(tmp_path):
    turns = WriterTurns(str(tmp_path / 'missing-dir' / 'db-writer.lock'))
    with turns:  # logged, and the write goes on without turns
        pass
    with turns:
        pass


class Gathering(NamedTuple):
    """A store whose writer's wait for company is watched: ``waits``
    counts them, and each wait queues one write (``company``: a write
    that arrived meanwhile) unless ``company`` is False. ``idle`` is set
    when the writer finds the queue empty and waits for the next write."""
    store: Store
    batches: list
    waits: list
    company: list
    idle: threading.Event


class _WatchedQueue:
    """The store's queue, telling when the writer found it empty; while
    ``paused`` is clear, the writer's blocking get waits for it."""

    def __init__(self, queue, idle):
        self._queue, self._idle = queue, idle
        self.paused = threading.Event()
        self.paused.set()

    def empty(self):
        empty = self._queue.empty()
        if empty:
            self._idle.set()
        return empty

    def get(self, *args, **kwargs):
        self.paused.wait(10)
        return self._queue.get(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._queue, name)


@contextlib.asynccontextmanager
async def gathering(tmp_path, batch_max=512):
    database = open_database(f'sqlite:///{tmp_path / "g.db"}', Config())
    batches, waits, company = [], [], [True]
    store = Store(database, gather_seconds=0.002, batch_max=batch_max,
                  on_batch=lambda size, _: batches.append(size))
    loop = asyncio.get_running_loop()

    def wait(seconds):  # on the writer thread
        waits.append(seconds)
        if company[-1]:
            queued = threading.Event()
            loop.call_soon_threadsafe(
                lambda: store.write(_nothing) and queued.set())
            queued.wait(10)
    store._sleep = wait
    store.start()
    idle = threading.Event()
    store._queue = _WatchedQueue(store._queue, idle)
    try:
        yield Gathering(store, batches, waits, company, idle)
    finally:
        await store.close()
        database.close()
        models.db.initialize(None)


def _nothing():
    return None


class Gate:
    """A write that holds the writer inside it until ``opened``."""

    def __init__(self):
        self.running, self.opened = threading.Event(), threading.Event()

    def __call__(self):
        self.running.set()
        self.opened.wait(10)

    async def entered(self):
        await asyncio.get_running_loop().run_in_executor(
            None, self.running.wait, 10)


async def _committed(g):
    """The batches, once every write queued is committed."""
    while g.store.pending:
        await asyncio.sleep(0.001)
    return g.batches


async def _two_in_a_row(g, first):
    """Make the writer find ``first`` (writes, the first a Gate) already
    queued, and hold it in that Gate, so that what the caller queues next
    is found queued too. Batches so far: [1 (a held write), len(first)]."""
    held, release = await _blocked_writer(g.store)
    for fn in first:
        g.store.write(fn)
    await _queued(g.store, 1 + len(first))
    release.set()
    await held
    await first[0].entered()


async def test_a_write_that_reaches_an_idle_writer_never_waits(tmp_path):
    async with gathering(tmp_path) as g:
        for _ in range(3):
            await g.store.write(_nothing)
        # Found queued twice in a row, but the writer had to wait for the
        # second batch: it was idle, so no company is coming.
        gate = Gate()
        await _two_in_a_row(g, [gate, _nothing])
        g.idle.clear()
        gate.opened.set()
        await asyncio.get_running_loop().run_in_executor(None, g.idle.wait,
                                                         10)
        g.store.write(_nothing)
        assert await _committed(g) == [1, 1, 1, 1, 2, 1]
        assert g.waits == []


async def test_a_batch_the_writer_waited_for_is_not_load(tmp_path):
    """Two writes reach an idle writer together, then one more is found
    queued: nobody was queued the first time, so no wait."""
    async with gathering(tmp_path) as g:
        first = Gate()
        g.store.write(first)
        await first.entered()
        g.store._queue.paused.clear()  # its next get waits
        g.idle.clear()
        first.opened.set()
        await asyncio.get_running_loop().run_in_executor(None, g.idle.wait,
                                                         10)
        gate = Gate()
        g.store.write(gate)
        g.store.write(_nothing)
        g.store._queue.paused.set()  # both found at once, by an idle writer
        await gate.entered()
        g.store.write(_nothing)
        gate.opened.set()
        assert await _committed(g) == [1, 2, 1]
        assert g.waits == []


async def test_under_load_a_write_waits_for_company(tmp_path):
    """The writer found two writes queued, then finds one more: it waits,
    and a write queued meanwhile joins them."""
    async with gathering(tmp_path) as g:
        gate = Gate()
        await _two_in_a_row(g, [gate, _nothing])
        g.store.write(_nothing)
        gate.opened.set()
        assert await _committed(g) == [1, 2, 2]
        assert g.waits == [0.002]


@pytest.mark.parametrize('batch_max, last, now', [
    (512, GATHER_BELOW, 1),  # the last batch was big enough
    (512, 2, GATHER_BELOW),  # this one is
    (4, 2, 4)])              # this one is full
async def test_a_big_batch_does_not_wait(tmp_path, batch_max, last, now):
    async with gathering(tmp_path, batch_max) as g:
        gate = Gate()
        await _two_in_a_row(g, [gate] + [_nothing] * (last - 1))
        for _ in range(now):
            g.store.write(_nothing)
        gate.opened.set()
        assert await _committed(g) == [1, last, now]
        assert g.waits == []


async def test_a_wait_that_brought_nothing_is_not_repeated(tmp_path):
    """A few clients each waiting for its ack: nobody joins a wait, so
    the writer lets the next chances to wait go."""
    async with gathering(tmp_path) as g:
        g.company.append(False)
        gates = [Gate() for _ in range(GATHER_SKIP + 3)]
        await _two_in_a_row(g, [gates[0], _nothing])
        for gate, after in zip(gates[1:], gates):
            g.store.write(gate)  # found queued with a write, each time
            g.store.write(_nothing)
            after.opened.set()
            await gate.entered()
        gates[-1].opened.set()
        # The first chance waited for nothing, the next GATHER_SKIP did
        # not wait, the one after waited again.
        assert await _committed(g) == [1] + [2] * (GATHER_SKIP + 3)
        assert len(g.waits) == 2


async def test_no_wait_while_the_breaker_is_open(tmp_path):
    async with gathering(tmp_path) as g:
        gate = Gate()
        await _two_in_a_row(g, [gate, _nothing])
        third = g.store.write(_nothing)
        g.store.fault = ERROR  # as if the last batch had failed
        gate.opened.set()
        await third  # the probe before the batch closes the breaker
        assert await _committed(g) == [1, 2, 1]
        assert g.waits == [] and g.store.fault is None


def test_a_store_refuses_a_wait_out_of_range(tmp_path):
    database = open_database(f'sqlite:///{tmp_path / "r.db"}', Config())
    for seconds in (-0.001, 1.5, float('inf'), float('nan')):
        with pytest.raises(ValueError):
            Store(database, gather_seconds=seconds)
    database.close()


@pytest.mark.parametrize('value', ['-1', '51', 'nan', 'soon'])
def test_a_gather_wait_out_of_range_is_refused(value):
    with pytest.raises(ConfigError) as refused:
        load_config(env={'POSTBOX_WRITE_GATHER_MS': value})
    assert 'write_gather_ms' in str(refused.value)
