"""What kind of failure a database error is, and what to do with a
connection after one. Used by the store's writer and readers."""
import errno
import logging
import sqlite3
import threading
import time

import peewee

try:
    import psycopg2
except ImportError:  # SQLite-only installs
    psycopg2 = None

log = logging.getLogger('server.store')

# Failures of the same kind are logged at most once per this many seconds
# (with a count of the ones not logged), so an outage under load is a few
# clear lines, not one per failed read.
LOG_EVERY_SECONDS = 10.0

# Fault kinds, as counted in metrics and shown by /readyz.
DISK_FULL = 'disk_full'      # SQLITE_FULL, ENOSPC, PostgreSQL disk_full
BUSY = 'busy'                # lock timeout, deadlock, serialization failure
CONNECTION = 'connection'    # no connection, or it was lost
ERROR = 'error'              # any other failure of the transaction


class RemoteFault(Exception):
    """A database failure in the writer process (``server.writer_process``),
    by kind; its message is the database's own words."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class ProcessLost(Exception):
    """The writer process failed during a run (gone, hung, a broken
    reply): it may have committed the run or not. ``prepared``: the
    outcomes it sent before its COMMIT, if it got that far, else None."""

    def __init__(self, prepared):
        super().__init__('writer process lost during a run')
        self.prepared = prepared


def classify(exc):
    """The fault kind of a database failure, and the exception (``exc``
    or one it was raised from) whose message says what happened. Peewee
    wraps the driver's exception (first argument) and a failed rollback
    can hide the error that caused it (SQLite's "cannot rollback - no
    transaction is active" after SQLITE_FULL), so the whole chain is
    searched."""
    found = {}
    seen = set()
    stack = [exc]
    while stack:
        error = stack.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        kind = _kind_of(error)
        if kind is not None:
            found.setdefault(kind, error)
        stack.extend(error.args)
        stack.extend((error.__cause__, error.__context__))
    for kind in (DISK_FULL, BUSY, CONNECTION):
        if kind in found:
            return kind, found[kind]
    return ERROR, found.get(ERROR, exc)


def is_database_error(exc) -> bool:
    """Whether a database error (a driver's, Peewee's, or a full disk) is
    ``exc`` or among the exceptions it came from; not a bug elsewhere."""
    return classify(exc)[1] is not exc or _kind_of(exc) is not None


def _kind_of(error):
    if isinstance(error, RemoteFault):
        return error.kind
    text = str(error).lower()
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or \
            'no space left on device' in text or \
            'database or disk is full' in text:
        return DISK_FULL
    if isinstance(error, sqlite3.Error):
        name = getattr(error, 'sqlite_errorname', '') or ''
        if name.startswith('SQLITE_FULL'):
            return DISK_FULL
        if name.startswith(('SQLITE_BUSY', 'SQLITE_LOCKED')) or \
                'database is locked' in text:
            return BUSY
        return ERROR
    if psycopg2 is not None and isinstance(error, psycopg2.Error):
        code = error.pgcode or ''
        if code == '53100':
            return DISK_FULL
        if code in ('40001', '40P01', '55P03'):
            return BUSY
        # Class 08 (connection exception), 57P (operator intervention:
        # shutdown, crash, cannot connect now), or no code at all: libpq
        # lost or could not make the connection.
        if isinstance(error, psycopg2.InterfaceError) or \
                code.startswith(('08', '57P')) or \
                (isinstance(error, psycopg2.OperationalError) and not code):
            return CONNECTION
        return ERROR
    if isinstance(error, peewee.InterfaceError):
        return CONNECTION
    if isinstance(error, peewee.PeeweeException):
        return ERROR
    return None


def drop_connection(database):
    """Close this thread's connection, whatever state it is in, so that
    the next use opens a fresh one."""
    try:
        database.close()
        return
    except Exception:  # broken, or left inside a failed transaction
        pass
    try:
        if not database.is_closed():
            database.connection().close()
    except Exception:
        pass
    database.dispose()


class Throttled:
    """Logs a kind of failure at most once per LOG_EVERY_SECONDS, saying
    how many were not logged since. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last = {}    # kind -> monotonic time logged
        self._quiet = {}   # kind -> failures since

    def __call__(self, kind, message, *args):
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -LOG_EVERY_SECONDS) < \
                    LOG_EVERY_SECONDS:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            self._last[kind] = now
            quiet = self._quiet.pop(kind, 0)
        if quiet:
            message += ' (%s more since the last such line)'
            args += (quiet,)
        log.warning(message, *args)


def one_line(exc) -> str:
    """An exception's message on one line, for logs and /readyz."""
    text = ' '.join(str(exc).split()) or type(exc).__name__
    return text[:300]
