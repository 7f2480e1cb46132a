"""The SQLite write-ahead log is copied into the database file by the
checkpoint thread, off the writers' COMMIT (server/data/checkpoints.py)."""
import asyncio
import logging
import shutil
import sqlite3
import threading
import time

from server.data.checkpoints import Checkpointer
from tests.kit import NO_RATE_LIMITS, ServerProcess, connect
from tests.test_durability import setup_room
from tests.test_writer_process import metric


def stored_in_file_alone(path, tmp_path) -> set:
    """The client_msg_ids in the database file as it is on disk, its log
    left out (a copy opened immutable: SQLite reads no -wal beside it)."""
    copy = tmp_path / 'file-alone.db'
    shutil.copyfile(path, copy)
    try:
        with sqlite3.connect(f'file:{copy}?immutable=1', uri=True) as db:
            return {cmid for (cmid,) in
                    db.execute('SELECT client_msg_id FROM message')}
    except sqlite3.DatabaseError:  # copied while a checkpoint wrote it
        return set()


async def test_acked_messages_reach_the_database_file_soon(tmp_path):
    """A few messages are far below the point where a writer would
    checkpoint itself (SQLite's default of 1,000 pages, now 10,000): the
    checkpoint thread copies them into the database file within moments,
    and /metrics counts its runs."""
    server = ServerProcess(tmp_path, env=NO_RATE_LIMITS).start()
    try:
        ta, _, room = await setup_room(server.url)
        client = await connect(server.url, ta)
        acked = set()
        for i in range(30):
            ack = await client.call('send_dm', {
                'room_id': room['id'], 'body': f'm{i}',
                'client_msg_id': f'c{i}'})
            assert ack['ok'], ack
            acked.add(f'c{i}')
        await client.close()
        deadline = time.monotonic() + 10
        while not acked <= stored_in_file_alone(
                tmp_path / 'postbox.db', tmp_path):
            assert time.monotonic() < deadline, \
                'acked messages still only in the write-ahead log'
            await asyncio.sleep(0.1)
        assert await metric(server, 'postbox_wal_checkpoint_runs_total') >= 1
        assert await metric(server,
                            'postbox_wal_checkpoint_failures_total') == 0
    finally:
        assert server.stop() == 0


async def test_a_failed_checkpoint_is_logged_and_the_next_commit_retries(
        tmp_path, caplog):
    """A checkpoint that fails (here: the database is not there) is
    counted and logged once, and makes no empty database; the thread goes
    on, and the next commit's checkpoint runs once the database is back.
    stop() ends it."""
    path = tmp_path / 'x.db'
    checkpointer = Checkpointer(str(path), interval=0)
    checkpointer.start()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                checkpointer.committed()
                await until(lambda n=checkpointer.failures + 1:
                            checkpointer.failures >= n)
        assert checkpointer.runs == 0
        assert not path.exists()
        lines = [r for r in caplog.records if 'checkpoint failed' in
                 r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        with sqlite3.connect(path) as db:
            db.execute('PRAGMA journal_mode=wal')
            db.execute('CREATE TABLE t (x)')
        checkpointer.committed()
        await until(lambda: checkpointer.runs == 1)
    finally:
        assert stops(checkpointer)


async def test_a_checkpoint_a_reader_holds_back_is_finished_later(tmp_path):
    """A reader still on an old snapshot keeps a checkpoint from copying
    the whole log: the thread tries again by itself, with no commit
    asking, and finishes once the reader is done."""
    path = tmp_path / 'x.db'
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute('PRAGMA journal_mode=wal')
    writer.execute('PRAGMA wal_autocheckpoint=0')
    writer.execute('CREATE TABLE t (x)')
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute('BEGIN')
    reader.execute('SELECT count(*) FROM t').fetchone()  # its snapshot
    writer.execute('INSERT INTO t VALUES (1)')
    checkpointer = Checkpointer(str(path), interval=0.01)
    checkpointer.start()
    try:
        checkpointer.committed()
        await asyncio.sleep(0.3)  # tries, again and again
        assert checkpointer.runs == 0 and checkpointer.failures == 0
        reader.execute('COMMIT')
        await until(lambda: checkpointer.runs == 1)
    finally:
        assert stops(checkpointer)
        reader.close()
        writer.close()


async def test_stop_while_a_checkpoint_is_due(tmp_path):
    """stop() as the thread waits to run an asked-for checkpoint: the
    thread ends, and stop() with it (the server's SIGTERM waits for it)."""
    checkpointer = Checkpointer(str(tmp_path / 'x.db'), interval=0.3)
    checkpointer.start()
    checkpointer.committed()
    await asyncio.sleep(0.1)  # the thread is in its interval now
    assert stops(checkpointer)


def stops(checkpointer) -> bool:
    """Whether ``stop()`` returns within 5 s (from a daemon thread: a
    stop that hangs fails the test instead of hanging it)."""
    stopper = threading.Thread(target=checkpointer.stop, daemon=True)
    stopper.start()
    stopper.join(5)
    return not stopper.is_alive()


async def until(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        await asyncio.sleep(0.01)
