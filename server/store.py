"""Storage off the event loop.

``Store`` owns the database (opened by ``server.data.database``) while the
app runs:

- ``await store.write(fn, *args)`` queues ``fn(*args)`` for the single writer
  thread, which runs whatever is queued as one transaction (group commit),
  each operation inside its own savepoint so one failure does not spoil the
  batch. An operation declared ``Batched`` (the send path) runs all its
  consecutive queued calls at once, in one savepoint. The future resolves
  only after COMMIT returned: an acked message is a committed message.
- ``await store.read(fn, *args)`` runs ``fn(*args)`` in a small reader pool.

Operations are plain functions of the data layer and the models; they never
touch the event loop.

When the database goes away (a restart, an outage, a full disk) the store
heals itself: a reader whose connection broke drops it and the next read
reconnects; a write batch that fails opens a circuit breaker, so writes are
answered ``unavailable`` (with ``retry_after``) at once instead of queueing,
while the writer probes the database with a no-op write transaction every
``PROBE_SECONDS`` and closes the breaker when one commits. The writes
waiting at any time are capped (``queue_max``), and nothing escapes the
writer's loop: whatever goes wrong fails that batch's operations with
``Unavailable`` and the loop goes on.

What a database error is lives in ``server.data.faults``, the SQL in
``server.data``. This module stays at about 500 lines: the writer, its
breaker and the reader pool share one fault state and its counters, which
one class keeps consistent.
"""
import asyncio
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import peewee

import models
from models import SchemaVersion
from models.migrations import migrate
from server.config import GATHER_MS_MAX
from server.data.checkpoints import Checkpointer
from server.data.database import open_database  # noqa: F401 (the app's)
from server.data.database import dialect_of, in_memory, is_sqlite
from server.data.faults import (BUSY, CONNECTION, DISK_FULL, ERROR,
                                LOG_EVERY_SECONDS, ProcessLost, Throttled,
                                classify, drop_connection, one_line)
from server.errors import Conflict, PostboxError, Unavailable

log = logging.getLogger(__name__)

# A batch whose transaction fails for a transient reason (a PostgreSQL
# deadlock between processes, SQLite busy past its timeout) is retried whole:
# the operations are plain functions of the database state, so re-running
# them after a rollback is safe. A lost connection is retried once, at once
# (the database may have restarted while the connection sat idle); a
# database that is still away then opens the breaker.
BATCH_ATTEMPTS = 5
# A batch with sends and other writes interleaved commits in at most this
# many transactions when a writer process takes the sends (see _segments).
SEGMENTS_MAX = 4
# A batch of this many writes spreads its COMMIT thin enough: the writer
# waits for company (``gather_seconds``, ``Store._gather``) only before
# smaller ones. Under a heavy load batches are far bigger, and waiting
# would only slow it. After a wait that brought nothing the next
# GATHER_SKIP chances to wait are let go; a wait is at most the
# configuration's GATHER_MS_MAX.
GATHER_BELOW = 16
GATHER_SKIP = 8
# Retries of one batch stop after this long, so that a client hears
# `unavailable` within a second of the database going away.
RETRY_SECONDS = 0.5
# While the breaker is open the writer probes the database this often:
# service resumes within about this long of the database's return. Each
# probe is one connection attempt and a one-row no-op write, 4 a second.
PROBE_SECONDS = 0.25
# What an `unavailable` answer tells the client to wait before retrying: a
# couple of probes, so a retry after it finds the database back if it is.
RETRY_AFTER_SECONDS = 0.5
# After SQLite failed for lack of disk space, writes stay refused until
# the database's filesystem has this much free again: a disk on the edge
# of full lets a small write through now and then (a probe), and
# flapping between up and down would tell operators nothing. Below it
# /readyz also says the disk is full before a write fails.
DISK_FREE_MIN_BYTES = 1024 * 1024


class StorageUnavailable(Unavailable):
    """``unavailable`` with the ``retry_after`` a client should wait."""

    def __init__(self, message='storage is unavailable, try again',
                 retry_after=RETRY_AFTER_SECONDS):
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class Batched:
    """A write operation with a batched form, declared as such: queued
    calls ``store.write(op, item)`` that meet in one write batch run as a
    single ``many([item, ...])`` in one savepoint, which returns per item
    either its result or the ``PostboxError`` refusing it. Alone, a call
    runs ``many([item])``. The send path is one: every send that queued
    while the last commit ran costs a few statements together.

    ``Batched.portable``: the operation may run in the writer process
    (``server.writer_process``): its items are named tuples whose ``ctx``
    the process replaces, and it uses no more of the context than
    ``ChildContext`` offers."""

    portable = False

    def __init__(self, many):
        self.many = many
        self.__name__ = getattr(many, '__name__', 'batched')

    @classmethod
    def in_writer_process(cls, redone):
        """Decorator: a Batched operation that is portable. ``redone(
        results, prepared)``: the (future, result, error)s of a run the
        writer thread ran again after the writer process failed during it
        having prepared its COMMIT (``prepared``: its outcomes, as it would
        have answered them; it may have committed or not), as they must be
        answered."""
        def portable(many):
            batched = cls(many)
            batched.portable = True
            batched.redone = redone
            return batched
        return portable

    def __call__(self, item):
        (outcome,) = self.many([item])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def __repr__(self):
        return f'Batched({self.__name__})'


def _runs(batch):
    """Split a batch into runs of consecutive calls: (fn, [(args, future)]).
    Calls of the same ``Batched`` operation share a run; any other call
    is a run of its own."""
    runs = []
    for fn, args, future in batch:
        if runs and runs[-1][0] is fn and isinstance(fn, Batched):
            runs[-1][1].append((args, future))
        else:
            runs.append((fn, [(args, future)]))
    return runs


def _segments(batch, most=SEGMENTS_MAX):
    """Split a batch into the parts that commit apart when a writer
    process runs the portable operations: (in_process, items) for each
    run of consecutive calls of one portable operation (True), and for
    whatever lies between them (False); at most ``most`` parts, the last
    taking the rest (False: the writer thread commits it), so sends
    interleaved with other writes do not cost a commit each."""
    segments = []
    for item in batch:
        portable = getattr(item[0], 'portable', False)
        if segments and (len(segments) == most or (
                segments[-1][0] == portable and (
                    not portable or segments[-1][1][-1][0] is item[0]))):
            segments[-1][1].append(item)
        elif len(segments) == most - 1:
            segments.append((False, [item]))
        else:
            segments.append((portable, [item]))
    return segments


class Store:
    """The database plus its writer thread and reader pool."""

    def __init__(self, database, *, batch_max=512, reader_threads=4,
                 queue_max=10000, on_batch=None, process=None,
                 gather_seconds=0.0):
        if not 0 <= gather_seconds * 1000 <= GATHER_MS_MAX:
            raise ValueError(f'gather_seconds: 0 to {GATHER_MS_MAX:g} ms')
        self.database = database
        # The writer process (``server.writer_process.WriterProcess``) that
        # commits the portable operations, or None: the writer thread does.
        self.process = process
        self.batch_max = batch_max
        self.queue_max = queue_max
        self._on_batch = on_batch  # called (size, seconds) after each commit
        self._queue = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(reader_threads,
                                           thread_name_prefix='pb-read')
        self._writer = None
        # Checkpoints of a SQLite file's log, off the COMMIT (None: other).
        self.checkpointer = None
        self._loop = None
        self._begin = dialect_of(database).begin
        self._turn = dialect_of(database).writer_turn
        self.pending = 0  # writes queued or being committed
        self.gather_seconds = gather_seconds
        # The writer thread's own (``_gather``): writes it found already
        # queued last time, chances to wait it still lets go, and how it
        # waits (the tests' hook).
        self._last_taken = 0
        self._skip_gather = 0
        self._sleep = time.sleep
        # The breaker: None while writes go through, else the kind of
        # fault (DISK_FULL, CONNECTION, ...); the database's own words go
        # to the log. Set by the writer thread, read by the event loop.
        self.fault = None
        self._fault_since = 0.0
        self._refused_before = 0
        self._trip_logged = {}  # fault kind -> monotonic time last logged
        self._logged_trip = False  # the current fault's line was logged
        # Counters for /metrics, each written by one thread only (reads:
        # under a lock).
        self.refused = {'down': 0, 'queue_full': 0, 'failed': 0}
        self.write_errors = dict.fromkeys((DISK_FULL, BUSY, CONNECTION,
                                           ERROR), 0)
        self.read_errors = dict(self.write_errors)
        self._read_lock = threading.Lock()
        self._log_read = Throttled()

    def start(self):
        """Bind the models, create or upgrade the schema, start the writer.
        Call from the event loop thread."""
        models.db.initialize(self.database)
        self.database.connect(reuse_if_open=True)
        migrate(self.database)
        if is_sqlite(self.database) and not in_memory(self.database):
            synchronous = self.database.execute_sql(
                'PRAGMA synchronous').fetchone()[0]
            self.checkpointer = Checkpointer(self.database.database,
                                             synchronous)
        self.database.close()
        self._loop = asyncio.get_running_loop()
        if self.process is not None:
            self.process.start()
        if self.checkpointer is not None:
            self.checkpointer.start()
        self._writer = threading.Thread(target=self._write_loop,
                                        name='pb-writer', daemon=True)
        self._writer.start()

    async def close(self):
        """Commit everything queued, then stop the writer and readers."""
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(
                None, self._writer.join)
            self._writer = None
        if self.process is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, self.process.close)
        self._readers.shutdown(wait=True)
        if self.checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, self.checkpointer.stop)
            self.checkpointer = None
        if hasattr(self._turn, 'close'):
            self._turn.close()

    async def read(self, fn, *args):
        """Run ``fn(*args)`` on a reader thread and return its result.
        A database failure raises ``Unavailable``."""
        return await self._loop.run_in_executor(self._readers, self._read,
                                                fn, args)

    def write(self, fn, *args) -> asyncio.Future:
        """Queue ``fn(*args)`` for the writer. The returned future gets its
        result after the transaction that ran it has committed, or its
        exception (``PostboxError`` from ``fn``, ``Unavailable`` if the
        database failed, is away or too many writes are waiting)."""
        future = self._loop.create_future()
        refusal = self._refusal()
        if refusal is not None:
            future.set_exception(refusal)
            return future
        self.pending += 1
        self._queue.put((fn, args, future))
        return future

    def _refusal(self):
        """Why a write must be answered at once, or None."""
        if self.fault is not None:
            self.refused['down'] += 1
            return self._unavailable()
        if self.pending >= self.queue_max:
            self.refused['queue_full'] += 1
            return StorageUnavailable('too many writes waiting, try again')
        if not self.writer_alive():
            self.refused['down'] += 1
            return StorageUnavailable('storage writer stopped')
        return None

    def _unavailable(self):
        if self.fault == DISK_FULL:
            return StorageUnavailable('storage is full, try again later')
        return StorageUnavailable()

    async def flush(self):
        """Wait until everything queued so far is committed."""
        await self.write(lambda: None)

    def ping(self) -> bool:
        """True if the database answers (runs on a reader thread)."""
        self.database.execute_sql('SELECT 1')
        return True

    # -- health ----------------------------------------------------------

    def writer_alive(self) -> bool:
        """True while the writer thread runs (it never leaves its loop
        before ``close``)."""
        return self._writer is not None and self._writer.is_alive()

    def readers_alive(self) -> bool:
        """True while the reader pool takes work. Not whether its reads
        answer: a database that hangs makes the process unready, and
        restarting it would not help."""
        try:
            self._readers.submit(bool)
        except RuntimeError:  # shut down
            return False
        return True

    async def database_ready(self, timeout: float):
        """Raise ``Unavailable`` saying why if the database cannot be used:
        the writer's breaker is open for a reason other than a full disk
        (see ``disk_ready``), or a reader's query does not answer within
        ``timeout``."""
        if self.fault is not None and self.fault != DISK_FULL:
            # The database's own words (hosts, users) are in the log only:
            # /readyz answers without a token.
            raise Unavailable(f'{self.fault}: writes are failing, see '
                              f'the log')
        try:
            await asyncio.wait_for(self.read(self.ping), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f'no answer within {timeout:g} s') from None
        return True

    def disk_ready(self):
        """Raise ``Unavailable`` while the last write failed for lack of
        disk space (cleared by the next write that commits: the writer
        probes every PROBE_SECONDS), or while SQLite's filesystem has less
        than DISK_FREE_MIN_BYTES free."""
        if self.fault == DISK_FULL:
            raise Unavailable('disk full: a write found no space, see '
                              'the log')
        free = self.disk_free()
        if free is not None and free < DISK_FREE_MIN_BYTES:
            raise Unavailable(f'disk full: {free} bytes free for the '
                              f'database')
        return True

    def disk_free(self):
        """Bytes free to SQLite on its file's filesystem; None for
        PostgreSQL (its disk is the database server's) or in memory."""
        if not is_sqlite(self.database) or in_memory(self.database):
            return None
        try:
            stat = os.statvfs(Path(self.database.database).parent)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    # -- reader threads --------------------------------------------------

    def _read(self, fn, args):
        """Run a read; a lost connection is dropped and the read tried once
        more on a new one (the database may have restarted since this
        thread last used it); any database failure is ``Unavailable``."""
        for attempt in (1, 2):
            try:
                return fn(*args)
            except (peewee.DatabaseError, peewee.InterfaceError) as exc:
                kind, cause = classify(exc)
                drop_connection(self.database)
                if attempt == 1 and kind == CONNECTION:
                    continue
                with self._read_lock:
                    self.read_errors[kind] += 1
                self._log_read(kind, 'database read failed (%s): %s', kind,
                               one_line(cause))
                raise StorageUnavailable() from exc

    # -- writer thread -------------------------------------------------

    def _write_loop(self):
        stop = False
        while not stop:
            try:
                stop = self._write_step()
            except BaseException:  # never leave the loop: writes would hang
                log.exception('write loop failed, going on')
                time.sleep(PROBE_SECONDS)
        drop_connection(self.database)

    def _write_step(self) -> bool:
        """Take the next batch and answer it; True once told to stop.
        While the breaker is open, probe the database whenever nothing
        arrives for PROBE_SECONDS, and before running a batch."""
        idle = self._queue.empty()  # the writer waits for the next write
        try:
            item = self._queue.get(
                timeout=PROBE_SECONDS if self.fault is not None else None)
        except queue.Empty:
            self._probe()
            return False
        if item is None:
            return True
        batch = [item]
        stop = False
        started = time.perf_counter()
        try:
            # Everything that queued while the last commit ran goes into
            # this one: the batch grows with the load on its own.
            stop = self._take_queued(batch) or self._gather(batch, idle)
            started = time.perf_counter()
            if self.fault is not None and not self._probe():
                results = self._refuse(batch)
            elif self.process is None:
                results = self._commit(batch)
            else:
                results = []
                for in_process, segment in _segments(batch):
                    # Once a part failed, the rest is refused at once,
                    # as the writes queued behind a failed batch are.
                    results.extend(self._refuse(segment) if self.fault
                                   else self._commit(segment, in_process))
        except BaseException:  # a bug here must not lose the batch's acks
            log.exception('write batch of %s failed', len(batch))
            results = self._refuse(batch)
        if self.checkpointer is not None:
            self.checkpointer.committed()
        if self._on_batch:
            try:
                self._on_batch(len(batch), time.perf_counter() - started)
            except Exception:
                log.exception('on_batch failed')
        try:
            self._loop.call_soon_threadsafe(self._resolve, results)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass
        return stop

    def _gather(self, batch, idle) -> bool:
        """Under a moderate concurrent load, wait a moment for company,
        then add what queued meanwhile to ``batch``; True if the stop mark
        was among it. Each transaction costs its COMMIT (a WAL write and
        fsync) and a round trip to the writer process whatever it holds,
        so fewer, larger ones leave more CPU to the event loop. One
        sleep, not a wait per arrival: each wake-up takes the GIL back
        from the busy event loop.

        The load is moderate when the writer found 2 to GATHER_BELOW - 1
        writes already queued last time and finds writes queued again
        (``idle``: it had to wait for this batch's first), and this batch
        can still grow. After a wait that brought nothing (a few clients
        each waiting for its ack) the next GATHER_SKIP chances to wait
        are let go. Never while the breaker is open: no write can join
        then."""
        last = self._last_taken
        self._last_taken = 0 if idle else len(batch)
        if idle or not (1 < last < GATHER_BELOW and
                        len(batch) < min(GATHER_BELOW, self.batch_max) and
                        self.gather_seconds > 0 and self.fault is None):
            return False
        if self._skip_gather:
            self._skip_gather -= 1
            return False
        before = len(batch)
        self._sleep(self.gather_seconds)
        stop = self._take_queued(batch)
        if len(batch) == before:
            self._skip_gather = GATHER_SKIP
        return stop

    def _take_queued(self, batch) -> bool:
        """Add what is queued to ``batch`` (up to batch_max); True if the
        stop mark was among it."""
        while len(batch) < self.batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _refuse(self, batch):
        self.refused['failed'] += len(batch)
        return [(future, None, self._unavailable())
                for _, _, future in batch]

    def _commit(self, batch, in_process=False):
        deadline = time.monotonic() + RETRY_SECONDS
        lost = []  # a writer process that failed during this batch
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                return self._run_batch(batch, in_process, lost)
            except Exception as exc:
                kind, cause = classify(exc)
                self.write_errors[kind] += 1
                drop_connection(self.database)
                retry = (kind == BUSY or kind == CONNECTION and attempt == 1)
                if not retry or attempt == BATCH_ATTEMPTS or \
                        time.monotonic() >= deadline:
                    self._trip(kind, cause)
                    return self._refuse(batch)
                log.warning('write batch of %s failed (attempt %s, %s): %s',
                            len(batch), attempt, kind, one_line(cause))
                if kind == BUSY:
                    time.sleep(0.05 * attempt)

    def _run_batch(self, batch, in_process, lost):
        """Run a batch in one transaction (``in_process``: a run of one
        portable operation, in the writer process); its (future, result,
        error)s. Once the process failed during the batch (``lost`` holds
        the ProcessLost), this thread runs it, every later attempt too,
        and ``fn.redone`` answers what the process had committed."""
        if not in_process:
            return self._run_locally(batch)
        fn = batch[0][0]
        if not lost:
            items = [args[0] for _, args, _ in batch]
            try:
                outcomes = self.process.run(fn, items, items[0].ctx)
            except ProcessLost as exc:
                lost.append(exc)
            else:
                if outcomes is not None:
                    return [(future, result, error) for (_, _, future),
                            (result, error) in zip(batch, outcomes)]
        results = self._run_locally(batch)
        if lost and lost[0].prepared is not None:
            return fn.redone(results, lost[0].prepared)
        return results

    def _run_locally(self, batch, before_commit=None):
        results = []
        self.database.connect(reuse_if_open=True)
        with self._turn, self.database.atomic(**self._begin):
            for fn, items in _runs(batch):
                if len(items) > 1:
                    results.extend(self._run_many(fn, items))
                else:
                    results.append(self._outcome(fn, *items[0]))
            if before_commit is not None:
                before_commit([(result, error)
                               for _, result, error in results])
        return results

    def run_here(self, fn, items, before_commit=None):
        """Run ``fn(item)`` for each item in one transaction in this thread
        (``fn`` Batched: ``fn.many`` in one savepoint), calling
        ``before_commit`` with the outcomes, per item (result, error),
        before the COMMIT. Raises the database's error if the transaction
        fails. The writer process's form of a write batch."""
        self._run_locally([(fn, (item,), None) for item in items],
                          before_commit)

    def _probe(self) -> bool:
        """While the breaker is open: one no-op write transaction. Closes
        the breaker if it commits; True then. After a full disk, only
        once DISK_FREE_MIN_BYTES are free again."""
        if self.fault == DISK_FULL:
            free = self.disk_free()
            if free is not None and free < DISK_FREE_MIN_BYTES:
                return False
        try:
            self.database.connect(reuse_if_open=True)
            with self._turn, self.database.atomic(**self._begin):
                (SchemaVersion.update(version=SchemaVersion.version)
                 .execute())
        except Exception as exc:
            kind, cause = classify(exc)
            drop_connection(self.database)
            self._trip(kind, cause)
            return False
        if self.fault is not None:
            if self._logged_trip:
                log.warning('database writes work again after %.1f s (%s); '
                            '%s writes were answered unavailable meanwhile',
                            time.monotonic() - self._fault_since, self.fault,
                            sum(self.refused.values()) - self._refused_before)
            self.fault = None
        return True

    def _trip(self, kind, cause):
        """Open the breaker (or note what it is open for now). One log line
        when it opens or the kind of fault changes, not more than once per
        LOG_EVERY_SECONDS per kind (a disk on the edge of full may let
        every other write through)."""
        detail = one_line(cause)
        if self.fault != kind:
            now = time.monotonic()
            if self.fault is None:
                self._fault_since = now
                self._refused_before = sum(self.refused.values())
                self._logged_trip = False
            if now - self._trip_logged.get(kind, -LOG_EVERY_SECONDS) >= \
                    LOG_EVERY_SECONDS:
                self._trip_logged[kind] = now
                self._logged_trip = True
                if kind == DISK_FULL:
                    log.error('database disk is full (%s): writes are '
                              'answered unavailable until one fits again',
                              detail)
                else:
                    log.error('database writes failing (%s: %s): writes are '
                              'answered unavailable until it answers again '
                              '(probed every %s s)', kind, detail,
                              PROBE_SECONDS)
        self.fault = kind

    def _outcome(self, fn, args, future):
        """Run one operation: (future, result, error)."""
        try:
            return future, self._run_one(fn, args), None
        except PostboxError as exc:
            # The savepoint rolled back this operation only.
            return future, None, exc
        except peewee.IntegrityError:
            # Another process made the same change at the same time.
            return future, None, Conflict(
                'a concurrent change conflicted, try again')
        except (peewee.DatabaseError, peewee.InterfaceError):
            # The transaction is unusable (InterfaceError: the connection
            # is gone, e.g. rolling the savepoint back after a restart):
            # retry or refuse the whole batch.
            raise
        except Exception as exc:  # a bug in fn: fail it alone
            log.exception('write operation %s failed', fn)
            return future, None, exc

    def _run_many(self, fn, items):
        """Run consecutive calls of a ``Batched`` operation in one
        savepoint. If that hits an IntegrityError (another process stored
        the same thing meanwhile), run them one by one instead."""
        try:
            with self.database.atomic():
                outcomes = fn.many([item for (item,), _ in items])
        except peewee.IntegrityError:
            return [self._outcome(fn, *item) for item in items]
        except (peewee.DatabaseError, peewee.InterfaceError):
            raise  # the transaction is unusable: retry the batch
        except Exception:  # a bug: each call gets its own answer
            log.exception('batched %s failed, running it call by call', fn)
            return [self._outcome(fn, *item) for item in items]
        return [(future, None, outcome) if isinstance(outcome, Exception)
                else (future, outcome, None)
                for (_, future), outcome in zip(items, outcomes)]

    def _run_one(self, fn, args):
        """Run one operation in its own savepoint. An IntegrityError means
        another process committed the same change first (PostgreSQL: a
        concurrent retry with the same client_msg_id waited on the unique
        index): run it once more, now that the change is visible, so it
        finds and returns the first result instead of failing."""
        try:
            with self.database.atomic():
                return fn(*args)
        except peewee.IntegrityError:
            with self.database.atomic():
                return fn(*args)

    def _resolve(self, results):
        self.pending -= len(results)
        for future, result, error in results:
            if future.done():  # the waiter went away
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

