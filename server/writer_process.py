"""The batched send's SQL in a process of its own.

The writer thread shares the GIL with the event loop. Python's database
drivers let go of it around every step of every statement and take it
back after, and taking it back waits for the busy event loop (up to the
interpreter's 5 ms switch interval). At half the maximum send rate the
writer thread spent most of its wall time waiting for the GIL, not
working, and the GIL handovers cost both threads CPU. So a ``Batched``
operation declared portable (the batched send, ``store_sends``) runs in a
child process with its own interpreter and its own connection to the
same database; the writer thread hands the run over and waits for its
outcomes on a pipe: one wait, with the GIL released.

Everything else stays as it was: the writer thread takes the batch,
keeps the breaker, counts the batch and resolves the futures after the
child's COMMIT returned, so an ack still follows the commit. The child
runs a run in one transaction of its own through ``Store.run_here`` (the
same savepoints and one-by-one fallback), and takes SQLite's writer turn
like a second worker process would. It answers either the outcomes or the
kind of fault (``RemoteFault``), which the writer's retry logic reads as
it reads the database's own errors.

An item's ``ctx`` (the app's Context, which cannot cross a pipe) is
replaced in the child by ``ChildContext``: its own cache of users' public
fields (they never change), ``presence.connected_here`` asked of the
parent over the same pipe while the transaction runs (a dict lookup
there), and ``outbox_wake`` remembered and done by the parent after the
commit.

The process is a speed-up, never a dependency. If the child is gone, or
does not answer within ANSWER_SECONDS, the parent kills it, logs one line,
runs that run in its own thread as before (``ProcessLost``), and starts a
new child at most once every RESTART_SECONDS. A child that died after its
COMMIT but before answering leaves its sends stored: the writer thread's
own run finds them as already stored, and the operation's ``redone``
tells its own from a client's retry (``sending._redone``), so nothing is
stored twice and nothing is delivered twice or never.
"""
import importlib
import logging
import multiprocessing
import signal
import time

import models
from server.data.database import TURN_WAIT_SECONDS, open_database
from server.data.faults import (ProcessLost, RemoteFault, classify,
                                drop_connection, one_line)
from server.errors import Internal, PostboxError
from server.services.context import LruCache, now_ms
from server.services.outbox import connected_here

log = logging.getLogger(__name__)


# Longest the parent waits for one answer: a run may wait its turn behind
# another process's writer for TURN_WAIT_SECONDS before failing as busy.
ANSWER_SECONDS = TURN_WAIT_SECONDS + 10
# A child that failed is started again at most this often; meanwhile the
# writer thread runs the sends itself.
RESTART_SECONDS = 5.0


def operation_name(batched) -> str:
    """Where the child finds a Batched operation's function."""
    many = batched.many
    return f'{many.__module__}:{many.__qualname__}'


class WriterProcess:
    """The parent's handle on the child (used by the writer thread only)."""

    def __init__(self, url, config):
        self._url, self._config = url, config
        self._process = None
        self._conn = None
        self._next_start = 0.0
        # For /metrics (written by the writer thread only).
        self.runs = 0       # runs the child committed or refused
        self.failures = 0   # runs it failed (ProcessLost) or could not take

    def start(self):
        """Start the child; it imports and connects in the background. If
        it cannot start, the writer thread commits the sends meanwhile."""
        try:
            self._start()
        except Exception as exc:
            log.error('writer process cannot start: %s', one_line(exc))
            self._next_start = time.monotonic() + RESTART_SECONDS

    def _start(self):
        context = multiprocessing.get_context('spawn')
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=serve, args=(theirs, self._url, self._config),
            name='pb-write-process', daemon=True)
        self._process.start()
        theirs.close()
        self._conn = ours

    def close(self):
        """Stop the child (it finishes the run it has, if any)."""
        if self._process is None:
            return
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._process.join(ANSWER_SECONDS)
        self._stop()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def run(self, batched, requests, ctx):
        """The outcomes of ``batched.many(requests)`` committed by the
        child: per request (result, error). Raises RemoteFault if the
        database failed the child's transaction, ProcessLost if the child
        failed. None if the child is not there to ask: run it here."""
        if not self._available():
            self.failures += 1
            return None
        since_ms = now_ms()
        try:
            self._conn.send((operation_name(batched),
                             [r._replace(ctx=None) for r in requests]))
            while True:
                if not self._conn.poll(ANSWER_SECONDS):
                    raise TimeoutError(f'no answer in {ANSWER_SECONDS} s')
                answer = self._conn.recv()
                if answer[0] != 'here':
                    break
                self._conn.send(connected_here(ctx, answer[1]))
        except Exception as exc:  # gone, hung, or a reply that broke
            log.error('writer process failed (%s: %s); sends are written '
                      'by the writer thread until it is started again',
                      type(exc).__name__, one_line(exc))
            self._stop()
            self._next_start = time.monotonic() + RESTART_SECONDS
            self.failures += 1
            raise ProcessLost(since_ms) from exc
        self.runs += 1
        if answer[0] == 'fault':
            raise RemoteFault(answer[1], answer[2])
        _, outcomes, woken = answer
        if woken:
            ctx.outbox_wake()
        return outcomes

    def _available(self) -> bool:
        if self._process is not None and self._process.is_alive():
            return True
        if self._process is not None:
            log.error('writer process ended (exit code %s)',
                      self._process.exitcode)
            self._stop()
            self._next_start = time.monotonic() + RESTART_SECONDS
        if time.monotonic() < self._next_start:
            return False
        self.start()
        return self._process is not None

    def _stop(self):
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


# -- the child ----------------------------------------------------------------

class _AskParent:
    """``presence`` in the child: who has a socket on the parent."""

    def __init__(self, conn):
        self._conn = conn

    def connected_here(self, user_ids) -> set:
        self._conn.send(('here', list(user_ids)))
        return self._conn.recv()


class ChildContext:
    """What the batched send uses of the app's Context, in the child."""

    def __init__(self, config, conn):
        self.config = config
        self.users = LruCache(config.user_cache_entries)
        self.presence = _AskParent(conn)
        self.woken = False

    def outbox_wake(self):
        self.woken = True


_OPERATIONS = {}  # name -> Batched, in the child


def _operation(name):
    found = _OPERATIONS.get(name)
    if found is None:
        from server.store import Batched
        module, _, qualname = name.partition(':')
        target = getattr(importlib.import_module(module), qualname)
        found = _OPERATIONS[name] = (target if isinstance(target, Batched)
                                     else Batched(target))
    return found


def _sendable(error):
    """An outcome's error as it can cross the pipe: a PostboxError as it
    is, anything else (a bug, logged here) as ``internal``."""
    if error is None or isinstance(error, PostboxError):
        return error
    return Internal('internal error')


def serve(conn, url, config):
    """The child's loop: take a run, commit it, answer. It ends when the
    parent says so or is gone; a Ctrl-C or SIGTERM meant for the server
    (sent to its whole process group) is the parent's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.logs import setup_logging
    from server.store import Store
    setup_logging(config)
    database = open_database(url, config)
    models.db.initialize(database)
    store = Store(database)
    ctx = ChildContext(config, conn)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if message is None:
            break
        name, requests = message
        ctx.woken = False
        try:
            results = store.run_here(
                _operation(name), [r._replace(ctx=ctx) for r in requests])
            answer = ('done', [(result, _sendable(error))
                               for result, error in results], ctx.woken)
        except Exception as exc:
            kind, cause = classify(exc)
            drop_connection(database)
            answer = ('fault', kind, one_line(cause))
        try:
            conn.send(answer)
        except (EOFError, OSError):
            break
    drop_connection(database)
