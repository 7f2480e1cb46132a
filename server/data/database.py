"""Opening the database, plain SQL, and the dialect chosen at open.

``open_database(url, config)`` builds the Peewee database and attaches
its ``Dialect`` (``database.dialect``) and search index: the one place
that looks at which backend this is. ``dialect()`` is the bound
database's, for the data functions that run inside a transaction.
"""
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse

import peewee
from playhouse.db_url import parse as parse_db_url

import models
from models import search as search_index
from models.fold import fold
from server.data.checkpoints import SAFETY_NET_PAGES

# libpq's connect timeout (whole seconds, 2 at least): a database host
# that does not answer at all must not hold a probe or a read for long.
PG_CONNECT_TIMEOUT = 2
# How long a writer waits for its turn (WriterTurns) before its write
# fails as busy (SQLite's busy_timeout below is the same), and how often
# it tries meanwhile.
TURN_WAIT_SECONDS = 30.0
TURN_POLL_SECONDS = 0.001
# Rows per multi-row statement: well under SQLite's limit of 32,766 bound
# parameters at nine per message row.
CHUNK_ROWS = 200
# SQLite's: full slices of this, then powers of two (see ``chunks``).
SQLITE_CHUNK_ROWS = 128
# Prepared statements the writer process's connection keeps (Python's
# default, which every other connection keeps, is 128): its multi-row
# statements in every size ``chunks`` makes, and every other write.
WRITER_STATEMENTS = 512

# ``execute``'s SQL texts with the database's placeholders, by text: at
# most this many (IN lists of every length would otherwise add one each,
# for good); past it, a text is translated on every call.
_SQL_CACHE = {}
SQL_CACHE_MAX = 2048

log = logging.getLogger(__name__)


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
        text = sql.replace('?', database.param)
        if len(_SQL_CACHE) < SQL_CACHE_MAX:
            _SQL_CACHE[key] = text
    return database.execute_sql(text, params)


def placeholders(values) -> str:
    """'?, ?, ?' for an IN list of ``values``."""
    return ', '.join(['?'] * len(values))


def chunks(items):
    """``items`` (a list) in slices for multi-row statements. On SQLite,
    slices of ``SQLITE_CHUNK_ROWS``, the rest in decreasing powers of two
    (77 rows: 64, 8, 4, 1): a statement's SQL depends on its row count,
    and this way few distinct statements are ever made, each parsed once
    and then found in the connection's statement cache. Parsing a
    statement of every batch size the writer met took a tenth of the
    writer process's samples at 5,300 DMs/s. PostgreSQL (no statement
    cache, a round trip per statement) gets slices of ``CHUNK_ROWS``."""
    start, end = 0, len(items)
    exact = dialect().name == 'sqlite'
    size = SQLITE_CHUNK_ROWS if exact else CHUNK_ROWS
    while end - start >= size:
        yield items[start:start + size]
        start += size
    while start < end:
        step = 1 << ((end - start).bit_length() - 1) if exact else size
        yield items[start:start + step]
        start += step


class WriterTurns:
    """The writers of one SQLite file in several processes (``workers``
    above 1) take turns: an ``flock`` on a file beside the database, held
    from BEGIN to COMMIT. Without it, a writer waiting for SQLite's write
    lock polls in SQLite's busy handler, asleep for up to 100 ms between
    tries while the lock has long been free: with two workers a DM's p99
    went past a second. Waiting here tries every millisecond. A dead
    process's turn ends with it (the kernel drops its lock); one that
    holds its turn past ``wait`` seconds (stopped, its disk hung) makes
    the others' writes fail as busy, as SQLite's own busy timeout did. The
    turns only make waits shorter: a lock file that cannot be used is
    logged once and writes go on without it."""

    def __init__(self, path, wait=TURN_WAIT_SECONDS):
        self.path = os.path.realpath(path)
        self.wait = wait
        self._fd = None
        self._usable = True

    def __enter__(self):
        if not self._usable:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            deadline = time.monotonic() + self.wait
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise sqlite3.OperationalError(
                            'database is locked: no writer turn within '
                            f'{self.wait:g} s') from None
                    time.sleep(TURN_POLL_SECONDS)
        except OSError as exc:
            self._usable = False
            log.warning('writer turns off (%s: %s): writers of this '
                        'database in other processes wait in SQLite',
                        self.path, exc)

    def __exit__(self, *exc):
        if self._usable and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SqliteDialect:
    """SQLite: one writer holds the database's write lock for the whole
    transaction, so rows need no locks of their own.

    Python's sqlite3 releases the GIL around every step of a statement,
    once per result row. When the event loop is busy, getting the GIL back
    after each costs the writer a forced switch, so the batched send reads
    nothing row by row here: one UPDATE for the seqs of a slice of rooms
    (``chunks``), their new values in a single aggregated row, message ids
    from the last rowid (SQLite numbers the rows of one INSERT
    consecutively while the writer holds the write lock)."""

    name = 'sqlite'
    # BEGIN IMMEDIATE: take the write lock at the start of the writer's
    # transaction, not at its first write (no upgrade deadlock).
    begin = {'lock_type': 'IMMEDIATE'}
    # Claiming queue rows: the write lock already keeps others out.
    skip_locked = ''

    def __init__(self, path=None):
        # Every write transaction runs inside ``writer_turn``.
        self.writer_turn = (WriterTurns(f'{path}-writer.lock')
                            if path and path != ':memory:'
                            else contextlib.nullcontext())

    def lock_rows(self, table, ids):
        """Lock rows for the rest of the transaction: nothing to do."""

    def take_seqs(self, counts, now) -> dict:
        """Add ``counts[room_id]`` to each room's last_seq (and set its
        last activity); {room_id: new last_seq}."""
        lasts = {}
        for room_ids in chunks(sorted(counts)):
            execute(*_take_seqs_update(counts, room_ids, now))
            text = execute(
                'SELECT group_concat("id" || \':\' || "last_seq") FROM '
                f'"room" WHERE "id" IN ({placeholders(room_ids)})',
                room_ids).fetchone()[0]
            lasts.update(map(int, pair.split(':'))
                         for pair in text.split(','))
        return lasts

    def insert_returning_keys(self, sql, params, keys) -> dict:
        """Run a multi-row INSERT of len(``keys``) rows; {key: new id}."""
        last_id = execute(sql, params).lastrowid
        first = last_id - len(keys) + 1
        return {key: first + n for n, key in enumerate(keys)}

    def insert_texts(self, texts):
        """The searchable text of new messages, ``[(room_id, message_id,
        body)]`` (``models/search.py``), folded here and written in
        multi-row INSERTs. Not by a trigger, as on PostgreSQL: the fold is
        Python, and SQLite calling it from inside a statement takes the
        GIL back once per message, each time waiting for the busy event
        loop to let go of it."""
        for chunk in chunks(texts):
            execute('INSERT INTO "message_text" VALUES '
                    + ', '.join(['(?, ?, ?)'] * len(chunk)),
                    [v for room_id, message_id, body in chunk
                     for v in (room_id, message_id, fold(body))])


class PostgresDialect:
    """PostgreSQL: rows are locked explicitly (in id order, so two
    processes cannot deadlock each other) and results come back whole, so
    RETURNING it is."""

    name = 'postgresql'
    begin = {}
    # Row locks order the writers of several processes.
    writer_turn = contextlib.nullcontext()
    skip_locked = ' FOR UPDATE SKIP LOCKED'

    def lock_rows(self, table, ids):
        """Lock rows of ``table`` (by id, in id order) for the rest of the
        transaction."""
        ids = sorted(ids)
        execute(f'SELECT 1 FROM "{table}" WHERE "id" IN '
                f'({placeholders(ids)}) ORDER BY "id" FOR UPDATE', ids)

    def take_seqs(self, counts, now) -> dict:
        """As SqliteDialect.take_seqs."""
        room_ids = sorted(counts)
        # Lock the rooms in id order first, so that two processes' runs of
        # sends to the same rooms cannot deadlock each other. (A batch that
        # also edits, locking a room between two runs, still can:
        # PostgreSQL then aborts one transaction, and the writer retries
        # that batch whole.)
        self.lock_rows('room', room_ids)
        sql, params = _take_seqs_update(counts, room_ids, now)
        return dict(execute(sql + ' RETURNING "room"."id", "room"."last_seq"',
                            params).fetchall())

    def insert_returning_keys(self, sql, params, keys) -> dict:
        """``keys`` must be what the rows' ("room_id", "seq") are."""
        rows = execute(sql + ' RETURNING "id", "room_id", "seq"',
                       params).fetchall()
        return {(room_id, seq): row_id for row_id, room_id, seq in rows}

    def insert_texts(self, texts):
        """Nothing: a trigger folds new messages' text in SQL, in the same
        statement (``models/search.py``)."""


def _take_seqs_update(counts, room_ids, now):
    values = ', '.join(['(?, ?)'] * len(room_ids))
    params = [v for r in room_ids for v in (r, counts[r])] + [now]
    return (f'WITH "v"("id", "k") AS (VALUES {values}) UPDATE "room" SET '
            '"last_seq" = "last_seq" + "v"."k", "last_activity_at" = ? '
            'FROM "v" WHERE "room"."id" = "v"."id"', params)


def dialect_of(database):
    """``database``'s dialect (one opened some other way than
    ``open_database`` gets it here, once)."""
    try:
        return database.dialect
    except AttributeError:
        return attach(database).dialect


def dialect():
    """The dialect of the bound database."""
    return dialect_of(models.db.obj)


def is_sqlite(database) -> bool:
    return isinstance(database, peewee.SqliteDatabase)


def in_memory(database) -> bool:
    """A SQLite database with no file: private to its connection, so no
    other process (the writer process) can share it."""
    return is_sqlite(database) and database.database in ('', ':memory:')


def attach(database):
    """Choose ``database``'s dialect and search index, once."""
    database.dialect = (SqliteDialect(database.database)
                        if is_sqlite(database) else PostgresDialect())
    return search_index.attach(database)


def open_database(url: str, config, statements=128) -> peewee.Database:
    """Return an unconnected Peewee database for ``url``: ``sqlite:///rel``,
    ``sqlite:////abs`` or ``postgresql://user:pw@host:port/db``, with its
    dialect attached. ``statements``: prepared statements each SQLite
    connection keeps (``WRITER_STATEMENTS`` for the writer process)."""
    scheme = urlparse(url).scheme
    if scheme == 'sqlite':
        path = url[len('sqlite:///'):]
        if path != ':memory:':
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # search_index.attach (in ``attach``): the fold function on every
        # connection (the index's triggers call it).
        return attach(peewee.SqliteDatabase(
            path, timeout=TURN_WAIT_SECONDS, cached_statements=statements,
            pragmas={
                'journal_mode': 'wal',
                'synchronous': config.sqlite_synchronous.upper(),
                'foreign_keys': 1,
                'cache_size': -1024 * config.sqlite_cache_mib,  # KiB if < 0
                'busy_timeout': int(TURN_WAIT_SECONDS * 1000),
                # A checkpointer thread copies the log (checkpoints.py).
                'wal_autocheckpoint': SAFETY_NET_PAGES,
            }))
    if scheme in ('postgres', 'postgresql'):
        params = parse_db_url(url)
        name = params.pop('database')
        params.setdefault('connect_timeout', PG_CONNECT_TIMEOUT)
        return attach(
            peewee.PostgresqlDatabase(name, autorollback=True, **params))
    raise ValueError(f'unsupported database URL scheme {scheme!r}')
