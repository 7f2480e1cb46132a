"""Fast tests of the writer's batching, the data layer's dialect and the
message services, in this process against a temporary SQLite file (no
server subprocess): what a caller of the services sees."""
import asyncio
import contextlib
import sqlite3
import threading

import pytest

import models
from models import Membership, Message, Room, User
from server.config import Config, ConfigError, load_config
from server.data import messages as data
from server.data.database import SqliteDialect, WriterTurns, open_database
from server.data.faults import BUSY, classify
from server.errors import Conflict, Forbidden, Invalid, TooLarge
from server.services import groups, messages, outbox, rooms, sending
from server.services.context import Context
from server.services.live import Typing
from server.store import GATHER_BELOW, Batched, Store


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
    marker, unread, moved = await messages.mark_read(ctx, bob, room_id, 99)
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


@contextlib.asynccontextmanager
async def gathering(tmp_path, batch_max=512):
    """(store, batch sizes committed) of a store whose writer waits a
    second for company, the most it may: long enough that a write queued
    just after the writer took a batch joins that batch if, and only if,
    the writer waited (``_then_one``)."""
    database = open_database(f'sqlite:///{tmp_path / "g.db"}', Config())
    batches = []
    store = Store(database, gather_seconds=1.0, batch_max=batch_max,
                  on_batch=lambda size, _: batches.append(size))
    store.start()
    try:
        yield store, batches
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


async def _then_one(store, batches):
    """Once the writer has taken what is queued, queue one more write;
    the batches committed, once everything is. The write joins the batch
    taken if the writer waited for company, else it commits alone."""
    while store._queue.qsize():
        await asyncio.sleep(0.001)
    await store.write(_nothing)
    while store.pending:
        await asyncio.sleep(0.001)
    return batches


async def _two_in_a_row(store, first):
    """Make the writer find writes queued twice in a row: ``first`` (a
    list of writes, the first a Gate) taken together, then, while the
    Gate holds the writer, what the returned writes queue; the returned
    Gate releases it. Batches so far: [1 (a held write), len(first)]."""
    held, release = await _blocked_writer(store)
    futures = [store.write(fn) for fn in first]
    await _queued(store, 1 + len(first))
    release.set()
    await held
    await first[0].entered()
    return futures


async def test_a_lone_write_never_waits_for_company(tmp_path):
    async with gathering(tmp_path) as (store, batches):
        for _ in range(3):
            await store.write(_nothing)
        assert await _then_one(store, batches) == [1, 1, 1, 1]


async def test_under_load_a_write_waits_for_company(tmp_path):
    """The writer found two writes queued, then finds one more: it waits,
    and a write queued meanwhile joins them."""
    async with gathering(tmp_path) as (store, batches):
        gate = Gate()
        await _two_in_a_row(store, [gate, _nothing])
        store.write(_nothing)
        gate.opened.set()
        assert await _then_one(store, batches) == [1, 2, 2]


async def test_a_writer_that_waited_for_its_batch_does_not_wait(tmp_path):
    async with gathering(tmp_path) as (store, batches):
        gate = Gate()
        await _two_in_a_row(store, [gate, _nothing])
        gate.opened.set()
        while store.pending:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)  # the writer waits for the next write
        store.write(_nothing)
        assert await _then_one(store, batches) == [1, 2, 1, 1]


@pytest.mark.parametrize('batch_max, last, now', [
    (512, GATHER_BELOW, 1),  # the last batch was big enough
    (512, 2, GATHER_BELOW),  # this one is
    (4, 2, 4)])              # this one is full
async def test_a_big_batch_does_not_wait(tmp_path, batch_max, last, now):
    async with gathering(tmp_path, batch_max) as (store, batches):
        gate = Gate()
        await _two_in_a_row(store, [gate] + [_nothing] * (last - 1))
        for _ in range(now):
            store.write(_nothing)
        gate.opened.set()
        assert await _then_one(store, batches) == [1, last, now, 1]


async def test_a_wait_that_brought_nothing_is_not_repeated(tmp_path):
    """A few clients each waiting for its ack: nobody joins a wait, so
    the writer stops waiting for a while."""
    async with gathering(tmp_path) as (store, batches):
        first, second = Gate(), Gate()
        await _two_in_a_row(store, [first, _nothing])
        store.write(second)
        store.write(_nothing)
        first.opened.set()
        await second.entered()  # taken with its company after a wait
        store.write(_nothing)
        second.opened.set()
        assert await _then_one(store, batches) == [1, 2, 2, 1, 1]


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
