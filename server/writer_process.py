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
like a second worker process would. Before its COMMIT it writes the
outcomes (``prepared``) to a memory file shared with the parent, after it
sends them with a word that it committed; or, if the transaction failed,
the kind of fault (``RemoteFault``), which the writer's retry logic reads
as it reads the database's own errors. The parent reads the memory file
only if the child is lost: every message the writer thread waits for is
one more take-back of the GIL from the busy event loop, so a run costs
it one send and one answer (read whole, in one call when it fits).

An item's ``ctx`` (the app's Context, which cannot cross a pipe) is
replaced in the child by ``ChildContext``: its own cache of users' public
fields (they never change), ``presence.connected_here`` asked of the
parent over the same pipe while the transaction runs (a dict lookup
there), and ``outbox_wake`` remembered and done by the parent after the
commit.

The process is a speed-up, never a dependency. If the child is gone, a
message to or from it does not go through within ANSWER_SECONDS, or a run
fails there for a reason that is not the database's (``broken``), the
parent kills it, logs one line, runs that run in its own thread as before
(``ProcessLost``), and starts a new child RESTART_SECONDS later (the pause
doubles while new ones keep failing). A child that died after its COMMIT
but before saying so leaves its sends stored: the writer thread's own run
finds them already stored, and the operation's ``redone`` uses the
outcomes the child had prepared to tell its messages from a client's
retry (``sending._redone``), so nothing is stored twice and nothing is
delivered twice or never. (Not covered: if the writer thread's own run
then fails too, its sends are answered ``unavailable`` and a client's
retry finds them stored: answered, but delivered by ``sync`` only.)
"""
import importlib
import logging
import os
import pickle
import tempfile
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import models
from server.data.database import (TURN_WAIT_SECONDS, WRITER_STATEMENTS,
                                   open_database)
from server.data.faults import (ProcessLost, RemoteFault, classify,
                                drop_connection, is_database_error,
                                one_line)
from server.errors import Internal, PostboxError
from server.services.context import LruCache
from server.services.outbox import connected_here

log = logging.getLogger(__name__)


# Longest the parent waits for one answer: a run may wait its turn behind
# another process's writer for TURN_WAIT_SECONDS before failing as busy.
ANSWER_SECONDS = TURN_WAIT_SECONDS + 10
# Longest a shutdown waits for the child to end before killing it.
CLOSE_SECONDS = 5.0
# A child that failed is started again after this long, doubled after each
# failure in a row up to RESTART_MAX_SECONDS (one that cannot start at all
# costs a try every few minutes, not a log line every few seconds);
# meanwhile the writer thread runs the sends itself.
RESTART_SECONDS = 5.0
RESTART_MAX_SECONDS = 300.0
# What a receive asks of the socket at least: an answer arrives whole.
READ_BYTES = 1 << 16
# How the child is started: a fresh interpreter, not a fork of this
# threaded process, nor multiprocessing's spawn (it would run the
# embedding program's main module again). ``-P``: nothing from the
# current directory (a ``models.py`` there must not be imported). The
# package's own directory goes on the path only if ``server`` would not be
# found there otherwise (a source checkout run from its directory), and
# then only to find this package. One line, as ps and profilers show it.
_BOOT = (
    'import importlib.util, os, sys; root = sys.argv[2]; '
    "spec = importlib.util.find_spec('server'); "
    '(spec is not None and '
    'os.path.dirname(os.path.dirname(spec.origin)) == root) '
    'or sys.path.insert(0, root); '
    'from server.writer_process import main; '
    'main(int(sys.argv[1]), int(sys.argv[3]))')


def operation_name(batched) -> str:
    """Where the child finds a Batched operation's function."""
    many = batched.many
    return f'{many.__module__}:{many.__qualname__}'


class Channel:
    """Pickled messages over a socket, each prefixed with its length. A
    send or receive given a timeout fails (``TimeoutError``) past it, so a
    hung child cannot hold the writer thread however big the run."""

    def __init__(self, sock):
        self.sock = sock
        self._buffer = bytearray()  # received, not yet taken

    def send(self, message, timeout=None):
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self.sock.settimeout(timeout)  # for the whole sendall
        self.sock.sendall(len(data).to_bytes(8, 'big') + data)

    def recv(self, timeout=None):
        """The next message; EOFError once the other side is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        size = int.from_bytes(self._take(8, deadline), 'big')
        return pickle.loads(self._take(size, deadline))

    def _take(self, size, deadline) -> bytes:
        buffer = self._buffer
        while len(buffer) < size:
            if deadline is not None:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self.sock.recv(max(size - len(buffer), READ_BYTES))
            if not chunk:
                raise EOFError('the other side closed')
            buffer += chunk
        taken = bytes(buffer[:size])
        del buffer[:size]
        return taken

    def close(self):
        self.sock.close()


class WriterProcess:
    """The parent's handle on the child (used by the writer thread only)."""

    def __init__(self, url, config):
        self._url, self._config = url, config
        self._process = None
        self._channel = None
        self._prepared = None  # the memory file the child prepares runs in
        self._number = 0  # of the last run handed over
        self._next_start = 0.0
        self._failed_in_row = 0
        # For /metrics, written by the writer thread only: whether the
        # last run was answered by the child, runs it answered, runs it
        # failed (ProcessLost) or could not take.
        self.up = False
        self.runs = 0
        self.failures = 0

    def start(self):
        """Start the child; it imports and connects in the background. If
        it cannot start, the writer thread commits the sends meanwhile."""
        try:
            self._start()
        except Exception as exc:
            log.error('writer process cannot start: %s', one_line(exc))
            self._failed()

    def _start(self):
        # The child sees the end of its socket when this process ends,
        # however it ends, and then ends too. A session of its own: a
        # Ctrl-C in the terminal is for the server, which stops it.
        ours, theirs = socket.socketpair()
        self._prepared = _memory_file()
        root = str(Path(__file__).resolve().parent.parent)
        try:
            self._process = subprocess.Popen(
                [sys.executable, '-P', '-c', _BOOT, str(theirs.fileno()),
                 root, str(self._prepared)],
                pass_fds=[theirs.fileno(), self._prepared],
                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        self._channel = Channel(ours)
        self._channel.send((self._url, self._config), ANSWER_SECONDS)

    def _failed(self):
        """The child failed (or could not start): stop it, and start the
        next one only after a pause that grows while they keep failing."""
        self._stop()
        self._failed_in_row += 1
        self._next_start = time.monotonic() + min(
            RESTART_SECONDS * 2 ** (self._failed_in_row - 1),
            RESTART_MAX_SECONDS)

    def close(self):
        """Stop the child: it is idle (the writer thread, which alone
        gives it runs, has stopped), so it ends at once; if not within
        CLOSE_SECONDS, it is killed."""
        if self._process is None:
            return
        try:
            self._channel.send(None, CLOSE_SECONDS)
            self._process.wait(CLOSE_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._stop()

    def run(self, batched, requests, ctx):
        """The outcomes of ``batched.many(requests)`` committed by the
        child: per request (result, error). Raises RemoteFault if the
        database failed the child's transaction, ProcessLost if the child
        failed. None if the child is not there to ask: run it here."""
        if not self._available():
            self.failures += 1
            return None
        self._number += 1
        number, prepared = self._number, None
        try:
            self._channel.send((number, operation_name(batched),
                                [r._replace(ctx=None) for r in requests]),
                               ANSWER_SECONDS)
            while True:
                answer = self._channel.recv(ANSWER_SECONDS)
                if answer[0] != 'here':
                    break
                self._channel.send(connected_here(ctx, answer[1]),
                                   ANSWER_SECONDS)
            if answer[0] == 'broken':
                raise RuntimeError(answer[1])
            if answer[0] == 'committed':
                ran, prepared = pickle.loads(answer[2])
                if ran != number or len(prepared) != len(requests):
                    raise RuntimeError('committed without its outcomes')
            elif answer[0] != 'fault':
                raise RuntimeError(f'unexpected answer {answer[0]!r}')
        except Exception as exc:  # gone, hung, broken, or a bad reply
            log.error('writer process failed (%s: %s); sends are written '
                      'by the writer thread until it is started again',
                      type(exc).__name__, one_line(exc))
            prepared = self._lost(number)
            self.failures += 1
            raise ProcessLost(prepared) from exc
        self.runs += 1
        self.up = True
        self._failed_in_row = 0
        if answer[0] == 'fault':
            raise RemoteFault(answer[1], answer[2])
        woken = answer[1]
        if woken:
            ctx.outbox_wake()
        return prepared

    def _lost(self, number):
        """The child failed run ``number``: stop it, and return the
        outcomes it had prepared for that run before its COMMIT, if it
        got that far (None if not)."""
        self._kill()  # it writes nothing more
        prepared = None
        try:
            size = int.from_bytes(os.pread(self._prepared, 8, 0), 'big')
            ran, outcomes = pickle.loads(os.pread(self._prepared, size, 8))
            if ran == number:
                prepared = outcomes
        except Exception:  # nothing prepared (or not whole): not committed
            pass
        self._failed()
        return prepared

    def _available(self) -> bool:
        if self._process is not None and self._process.poll() is None:
            return True
        if self._process is not None:
            log.error('writer process ended (exit code %s)',
                      self._process.returncode)
            self._failed()
        if time.monotonic() < self._next_start:
            return False
        self.start()
        return self._process is not None

    def _kill(self):
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def _stop(self):
        self.up = False
        self._kill()
        channel, prepared = self._channel, self._prepared
        self._process = self._channel = self._prepared = None
        if channel is not None:
            channel.close()
        if prepared is not None:
            os.close(prepared)


def _memory_file() -> int:
    """A file descriptor of a file in memory (an unlinked temporary file
    where Linux's memfd is not available), for the child to inherit."""
    if hasattr(os, 'memfd_create'):
        return os.memfd_create('postbox-prepared')  # close-on-exec
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


# -- the child ----------------------------------------------------------------

class ParentGone(BaseException):
    """The parent is gone mid-run (its end closed, or this process was
    handed to another parent). A BaseException, so that the
    store's per-operation error handling lets it through: the transaction
    rolls back and the child ends."""


class _AskParent:
    """``presence`` in the child: who has a socket on the parent."""

    def __init__(self, channel):
        self._channel = channel

    def connected_here(self, user_ids) -> set:
        try:
            self._channel.send(('here', list(user_ids)))
            return self._channel.recv()
        except (EOFError, OSError) as exc:
            raise ParentGone() from exc


class ChildContext:
    """What the batched send uses of the app's Context, in the child."""

    def __init__(self, config, channel):
        self.config = config
        self.users = LruCache(config.user_cache_entries)
        self.presence = _AskParent(channel)
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
    """An outcome's error as it can cross to the parent: a PostboxError as
    it is, anything else (a bug, logged here) as ``internal``."""
    if error is None or isinstance(error, PostboxError):
        return error
    return Internal('internal error')


def serve(sock, prepared_fd):
    """The child's loop: take a run, commit it, answer. It ends when the
    parent says so or is gone; a Ctrl-C or SIGTERM meant for the server
    (sent to its whole process group) is the parent's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.logs import setup_logging
    from server.store import Store
    channel = Channel(sock)
    try:
        url, config = channel.recv()
    except (EOFError, OSError):
        return
    setup_logging(config)
    database = open_database(url, config, statements=WRITER_STATEMENTS)
    models.db.initialize(database)
    store = Store(database)
    ctx = ChildContext(config, channel)

    run = {}  # the run's number, and its outcomes once prepared
    parent = os.getppid()

    def prepared(results):  # inside the transaction, before its COMMIT
        if os.getppid() != parent:  # never acked: roll back, a retry
            raise ParentGone()      # elsewhere stores them as new
        data = pickle.dumps((run['number'], [
            (result, _sendable(error)) for result, error in results]),
            pickle.HIGHEST_PROTOCOL)
        record = len(data).to_bytes(8, 'big') + data
        if os.pwrite(prepared_fd, record, 0) != len(record):
            raise RuntimeError('the prepared outcomes were not written whole')
        run['prepared'] = data

    while True:
        try:
            message = channel.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        except Exception as exc:  # a run it cannot read: not this code's
            log.exception('writer process cannot read a run')
            channel.send(('broken', one_line(exc)))
            continue
        if message is None:
            break
        run['number'], name, requests = message
        ctx.woken = False
        try:
            store.run_here(_operation(name),
                           [r._replace(ctx=ctx) for r in requests],
                           before_commit=prepared)
            answer = ('committed', ctx.woken, run.pop('prepared'))
        except ParentGone:  # rolled back: the parent went away meanwhile
            break
        except Exception as exc:
            drop_connection(database)
            if not is_database_error(exc):  # a bug, not the database's
                log.exception('writer process run failed')
                answer = ('broken', one_line(exc))
            else:
                kind, cause = classify(exc)
                answer = ('fault', kind, one_line(cause))
        try:
            channel.send(answer)
        except OSError:
            break
    drop_connection(database)


def main(fd, prepared_fd):
    """The child's entry (``_BOOT``): serve on the inherited socket,
    preparing runs in the inherited memory file."""
    serve(socket.socket(fileno=fd), prepared_fd)
