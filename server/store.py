"""Storage off the event loop.

``open_database(url, config)`` builds the Peewee database for a URL.
``Store`` owns it while the app runs:

- ``await store.write(fn, *args)`` queues ``fn(*args)`` for the single writer
  thread, which runs whatever is queued as one transaction (group commit),
  each operation inside its own savepoint so one failure does not spoil the
  batch. An operation with a batched form (``fn.many``, the send path)
  runs all its queued calls at once, in one savepoint. The future resolves only after COMMIT returned: an acked message is
  a committed message.
- ``await store.read(fn, *args)`` runs ``fn(*args)`` in a small reader pool.

Operations are plain functions that use the models; they never touch the
event loop.
"""
import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import peewee
from playhouse.db_url import parse as parse_db_url

import models
from models import search as search_index
from models.migrations import migrate
from server.errors import Conflict, PostboxError, Unavailable

log = logging.getLogger(__name__)

# A batch whose transaction fails for a transient reason (a PostgreSQL
# deadlock between processes, SQLite busy past its timeout) is retried whole:
# the operations are plain functions of the database state, so re-running
# them after a rollback is safe.
BATCH_ATTEMPTS = 5


def open_database(url: str, config) -> peewee.Database:
    """Return an unconnected Peewee database for ``url``: ``sqlite:///rel``,
    ``sqlite:////abs`` or ``postgresql://user:pw@host:port/db``."""
    scheme = urlparse(url).scheme
    if scheme == 'sqlite':
        path = url[len('sqlite:///'):]
        if path != ':memory:':
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # attach: the search index's dialect, and its fold function on
        # every connection (the index's triggers call it).
        return search_index.attach(peewee.SqliteDatabase(
            path, timeout=30, pragmas={
                'journal_mode': 'wal',
                'synchronous': config.sqlite_synchronous.upper(),
                'foreign_keys': 1,
                'cache_size': -1024 * config.sqlite_cache_mib,  # KiB if < 0
                'busy_timeout': 30000,
            }))
    if scheme in ('postgres', 'postgresql'):
        params = parse_db_url(url)
        name = params.pop('database')
        return search_index.attach(
            peewee.PostgresqlDatabase(name, autorollback=True, **params))
    raise ValueError(f'unsupported database URL scheme {scheme!r}')


_SQL_CACHE = {}


def execute(sql, params=()):
    """Run plain SQL written with ``?`` placeholders on the bound database
    (inside the caller's transaction) and return the cursor. For the few
    hot statements where Peewee's query builder costs more than the query.
    Identifiers must be double-quoted, which both SQLite and PostgreSQL
    accept."""
    database = models.db.obj
    key = (sql, database.param)
    text = _SQL_CACHE.get(key)
    if text is None:
        text = _SQL_CACHE[key] = sql.replace('?', database.param)
    return database.execute_sql(text, params)


def _runs(batch):
    """Split a batch into runs of consecutive calls: (fn, [(args, future)]).
    Calls of an operation with a batched form (``fn.many``) share a run;
    any other call is a run of its own."""
    runs = []
    for fn, args, future in batch:
        if runs and runs[-1][0] is fn and hasattr(fn, 'many'):
            runs[-1][1].append((args, future))
        else:
            runs.append((fn, [(args, future)]))
    return runs


def is_sqlite(database) -> bool:
    return isinstance(database, peewee.SqliteDatabase)


class Store:
    """The database plus its writer thread and reader pool."""

    def __init__(self, database, *, batch_max=512, reader_threads=4,
                 on_batch=None):
        self.database = database
        self.batch_max = batch_max
        self._on_batch = on_batch  # called (size, seconds) after each commit
        self._queue = queue.SimpleQueue()
        self._readers = ThreadPoolExecutor(reader_threads,
                                           thread_name_prefix='pb-read')
        self._writer = None
        self._loop = None
        self._begin = ({'lock_type': 'IMMEDIATE'} if is_sqlite(database)
                       else {})
        self.pending = 0

    def start(self):
        """Bind the models, create or upgrade the schema, start the writer.
        Call from the event loop thread."""
        models.db.initialize(self.database)
        self.database.connect(reuse_if_open=True)
        migrate(self.database)
        self.database.close()
        self._loop = asyncio.get_running_loop()
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
        self._readers.shutdown(wait=True)

    async def read(self, fn, *args):
        """Run ``fn(*args)`` on a reader thread and return its result."""
        return await self._loop.run_in_executor(self._readers, fn, *args)

    def write(self, fn, *args) -> asyncio.Future:
        """Queue ``fn(*args)`` for the writer. The returned future gets its
        result after the transaction that ran it has committed, or its
        exception (``PostboxError`` from ``fn``, ``Unavailable`` if the
        database failed)."""
        future = self._loop.create_future()
        self.pending += 1
        self._queue.put((fn, args, future))
        return future

    async def flush(self):
        """Wait until everything queued so far is committed."""
        await self.write(lambda: None)

    def ping(self) -> bool:
        """True if the database answers (runs on a reader thread)."""
        self.database.execute_sql('SELECT 1')
        return True

    # -- writer thread -------------------------------------------------

    def _write_loop(self):
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            # Everything that queued while the last commit ran goes into
            # this one: the batch grows with the load on its own.
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            started = time.perf_counter()
            results = self._commit(batch)
            if self._on_batch:
                self._on_batch(len(batch), time.perf_counter() - started)
            self._loop.call_soon_threadsafe(self._resolve, results)
        self.database.close()

    def _commit(self, batch):
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            try:
                return self._run_batch(batch)
            except peewee.DatabaseError as exc:
                log.warning('write batch of %s failed (attempt %s): %s',
                            len(batch), attempt, exc)
                try:
                    self.database.close()
                except peewee.DatabaseError:
                    pass
                time.sleep(0.05 * attempt)
        error = Unavailable('storage is unavailable, try again')
        return [(future, None, error) for _, _, future in batch]

    def _run_batch(self, batch):
        results = []
        self.database.connect(reuse_if_open=True)
        with self.database.atomic(**self._begin):
            for fn, items in _runs(batch):
                if len(items) > 1:
                    results.extend(self._run_many(fn, items))
                else:
                    results.append(self._outcome(fn, *items[0]))
        return results

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
        except peewee.DatabaseError:
            raise  # the transaction is unusable: retry the batch
        except Exception as exc:  # a bug in fn: fail it alone
            log.exception('write operation %s failed', fn)
            return future, None, exc

    def _run_many(self, fn, items):
        """Run consecutive calls of an operation that has a batched form
        (``fn.many(list of args) -> list of result or PostboxError``) in
        one savepoint. If that hits an IntegrityError (another process
        stored the same thing meanwhile), run them one by one instead."""
        try:
            with self.database.atomic():
                outcomes = fn.many([args for args, _ in items])
        except peewee.IntegrityError:
            return [self._outcome(fn, *item) for item in items]
        except peewee.DatabaseError:
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
