"""SQLite's trigram index, kept in a file of its own next to the database.

The index is derived data. What a search checks is ``message_text``,
written in the database in the send's own transaction
(``models/search.py``); the trigram index only proposes candidates, for a
caller whose rooms hold very many messages. So it is written after the
messages commit, by an indexer thread (``step``), not in the send's
transaction:

- An FTS5 trigram insert costs about 60 us per row in a 20-row
  transaction and 22 us in a 500-row one: the indexer writes hundreds of
  messages per transaction where the send path writes a few dozen.
- A second file has a write lock of its own: the indexer writes while the
  database's writer commits the next sends.

The file (``<database>-search``) holds:

- ``message_fts``: contentless FTS5, trigram tokens, rowid = message id,
  ``detail=none`` (which messages hold a trigram, no positions).
- ``indexed``: one row. ``through``: every message with this id or a
  smaller one is in the index, if it had text when indexed. ``changes``:
  the last row of the database's ``search_changed`` log (edits) indexed.

A search asks the index for ids up to ``through`` and walks the messages
above it; messages edited since ``changes`` are checked as candidates too.
A deleted or edited message's old trigrams stay in the file (a contentless
table needs the old text to delete them): every candidate is checked
against ``message_text``, so they cost a check, never a wrong answer.

Several processes on one database share the file: a step holds its write
lock (BEGIN IMMEDIATE) from reading ``indexed`` to committing it. The file
may be lost at any time: a missing, unreadable or replaced one is made
again (or opened again) by the next step, and refilled from the database,
oldest messages first, while searches walk. A file that does not match
its database (one of them restored from a backup: the database's newest
message is below ``through``, or edits the file never took were pruned
from the log) is refilled from the start.
"""
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading

log = logging.getLogger(__name__)

# A step waits this long for another process's step to commit.
BUSY_MILLISECONDS = 30_000
FILE_MODE = 0o600

_SCHEMA = [
    'CREATE VIRTUAL TABLE IF NOT EXISTS "message_fts" USING fts5('
    '"text", content=\'\', detail=none, columnsize=0, '
    'tokenize=\'trigram case_sensitive 1\')',
    'CREATE TABLE IF NOT EXISTS "indexed" ("one" INTEGER PRIMARY KEY '
    'CHECK ("one" = 1), "through" INTEGER NOT NULL, '
    '"changes" INTEGER NOT NULL)',
    'INSERT OR IGNORE INTO "indexed" VALUES (1, 0, 0)',
]

# What the indexer reads from the database, in one read transaction.
_TOP = 'SELECT COALESCE(MAX("id"), 0) FROM "message"'
_NEW = ('SELECT m."id", t."text" FROM "message" m JOIN "message_text" t '
        'ON t."room_id" = m."room_id" AND t."message_id" = m."id" '
        'WHERE m."id" > ? AND m."id" <= ? ORDER BY m."id" LIMIT ?')
# The last edit pruned from the log (``models.search.prune_changes``).
_PRUNED = 'SELECT COALESCE(MAX("seq"), 0) FROM "search_pruned"'
# The log's last seq, even once its rows are pruned (AUTOINCREMENT).
_LAST_CHANGE = ('SELECT COALESCE(MAX("seq"), 0) FROM "sqlite_sequence" '
                'WHERE "name" = \'search_changed\'')
_CHANGED = ('SELECT c."seq", t."message_id", t."text" '
            'FROM "search_changed" c JOIN "message" m ON m."id" = '
            'c."message_id" JOIN "message_text" t ON t."room_id" = '
            'm."room_id" AND t."message_id" = m."id" '
            'WHERE c."seq" > ? AND c."seq" <= ? ORDER BY c."seq" LIMIT ?')


def _inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def path_of(database_path):
    """The trigram file of the SQLite database at ``database_path``, or
    None for a database in memory (searches walk)."""
    if database_path in ('', ':memory:') or \
            str(database_path).startswith('file:'):
        return None
    return f'{database_path}-search'


class TrigramFile:
    """The file, its readers (any thread: a connection each) and its
    indexer (``step``, ``close``: one thread)."""

    def __init__(self, path, source):
        self.path = path  # the trigram file
        self.source = source  # the database file it indexes
        self._local = threading.local()
        self._readers = []
        self._readers_lock = threading.Lock()
        self._opened = 0  # counts ``close`` calls: readers open again
        self._index = None  # the indexer's connections
        self._index_inode = None
        self._source = None

    # -- readers ---------------------------------------------------------

    def _reader(self):
        """This thread's connection to the file, opened again if the file
        was replaced (made again by any process) since."""
        inode = _inode(self.path)
        if inode is None:
            raise sqlite3.OperationalError('no search index file')
        conn = getattr(self._local, 'conn', None)
        if conn is not None and (self._local.inode, self._local.opened) != \
                (inode, self._opened):
            conn.close()  # closed already if ``close`` ran since
            conn = None
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False,
                                   isolation_level=None)
            conn.execute('PRAGMA query_only = 1')
            self._local.conn, self._local.inode = conn, inode
            self._local.opened = self._opened
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def indexed(self):
        """(through, changes): see the module's docstring; (0, 0) before
        the indexer made the file. Raises sqlite3.Error if the file cannot
        be read (the caller walks)."""
        if _inode(self.path) is None:
            return 0, 0
        row = self._reader().execute(
            'SELECT "through", "changes" FROM "indexed"').fetchone()
        return row or (0, 0)

    def candidates(self, match, below, limit) -> list:
        """Ids below ``below`` of at most ``limit`` index rows holding every
        trigram of ``match`` (an FTS5 query), newest first. An edited
        message may come twice."""
        return [r[0] for r in self._reader().execute(
            'SELECT rowid FROM "message_fts" WHERE "message_fts" MATCH ? '
            'AND rowid < ? ORDER BY rowid DESC LIMIT ?',
            (match, below, limit)).fetchall()]

    # -- the indexer -----------------------------------------------------

    def create(self):
        """Make the file if it is missing (the indexer's thread)."""
        self._connections()

    def _connections(self):
        if self._index is not None and \
                self._index_inode != _inode(self.path):
            self._drop()  # deleted or made again by another process
        if self._index is None:
            self._index = self._open_index()
            self._index_inode = _inode(self.path)
            self._source = sqlite3.connect(self.source, isolation_level=None)
            self._source.execute(f'PRAGMA busy_timeout = {BUSY_MILLISECONDS}')
        return self._index, self._source

    def _drop(self):
        for conn in (self._index, self._source):
            if conn is not None:
                conn.close()
        self._index = self._source = None

    def _open_index(self):
        """The indexer's connection, the schema made; an unreadable file is
        made again, by one process at a time (the others then use it)."""
        try:
            return self._open_file()
        except sqlite3.OperationalError:
            raise  # busy, locked, disk: the next step tries again
        except sqlite3.DatabaseError:
            pass
        with self._remaking():
            try:
                return self._open_file()  # made again by another process?
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                log.warning('search index file %s unreadable (%s): making '
                            'it again', self.path, exc)
            for suffix in ('', '-wal', '-shm'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path + suffix)
            return self._open_file()

    @contextlib.contextmanager
    def _remaking(self):
        fd = os.open(f'{self.path}-lock', os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _open_file(self):
        self._private()
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f'PRAGMA busy_timeout = {BUSY_MILLISECONDS}')
            conn.execute('PRAGMA journal_mode = wal')
            # FULL: what a step committed is on disk before the edit log
            # it read from is pruned (one fsync per step).
            conn.execute('PRAGMA synchronous = FULL')
            conn.execute('BEGIN IMMEDIATE')
            for sql in _SCHEMA:
                conn.execute(sql)
            conn.execute('COMMIT')
            return conn
        except BaseException:
            conn.close()
            raise

    def _private(self):
        """The file holds what messages say: readable by the server's user
        only, as the database is (SQLite gives its -wal and -shm files the
        database file's mode)."""
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        for path in (self.path, f'{self.path}-wal', f'{self.path}-shm'):
            try:
                if os.stat(path).st_mode & 0o077:
                    os.chmod(path, FILE_MODE)
            except FileNotFoundError:
                pass

    def step(self, batch) -> tuple:
        """Index up to ``batch`` messages committed since the last step and
        up to ``batch`` edits logged since; returns how many of each it
        indexed (fewer than ``batch`` of both: caught up). Raises
        sqlite3.Error (the caller logs it and tries again later)."""
        index, source = self._connections()
        index.execute('BEGIN IMMEDIATE')
        try:
            through, changes = index.execute(
                'SELECT "through", "changes" FROM "indexed"').fetchone()
            source.execute('BEGIN')  # one snapshot for every read below
            try:
                if source.execute('SELECT 1 FROM "search_backfill"'
                                  ).fetchone():
                    # Old messages are still getting their text: going
                    # past them now would leave them out for good.
                    index.execute('ROLLBACK')
                    return 0, 0
                top = source.execute(_TOP).fetchone()[0]
                pruned = source.execute(_PRUNED).fetchone()[0]
                if top < through or changes < pruned:
                    # The database is older than the file (restored from
                    # a backup: ids below ``through`` will be reused), or
                    # the file older than the database (edits it never
                    # took were pruned): start again.
                    log.warning('search index file does not match the '
                                'database: indexing again from the start')
                    index.execute('INSERT INTO "message_fts" '
                                  '("message_fts") VALUES (\'delete-all\')')
                    through = changes = 0
                new = source.execute(_NEW, (through, top, batch)).fetchall()
                last = source.execute(_LAST_CHANGE).fetchone()[0]
                if last < changes:
                    changes = 0
                edited = source.execute(_CHANGED,
                                        (changes, last, batch)).fetchall()
            finally:
                source.execute('COMMIT')
            index.executemany('INSERT INTO "message_fts" ("rowid", "text") '
                              'VALUES (?, ?)', new)
            index.executemany('INSERT INTO "message_fts" ("rowid", "text") '
                              'VALUES (?, ?)',
                              [(mid, text) for _, mid, text in edited])
            through = new[-1][0] if len(new) == batch else top
            changes = edited[-1][0] if len(edited) == batch else last
            index.execute('UPDATE "indexed" SET "through" = ?, '
                          '"changes" = ?', (through, changes))
            index.execute('COMMIT')
        except BaseException as exc:
            if index.in_transaction:
                index.execute('ROLLBACK')
            if isinstance(exc, sqlite3.DatabaseError) and \
                    not isinstance(exc, sqlite3.OperationalError):
                self._drop()  # corrupt? the next step opens it again
            raise
        return len(new), len(edited)

    def close(self):
        """Close the indexer's connections (on its thread) and the
        readers'."""
        self._drop()
        with self._readers_lock:
            self._opened += 1
            for conn in self._readers:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:
                    pass
            self._readers.clear()
