"""WAL checkpoints of a SQLite database, off the commit path.

SQLite's own checkpoint runs inside the COMMIT that takes the write-ahead
log past ``wal_autocheckpoint`` pages: that writer copies the log's pages
into the database file and syncs it before its COMMIT returns, and every
send waiting for the next batch waits with it. At half the maximum send
rate that was one batch in four taking 5-25 ms instead of under 5, and a
third more on the median send.

So the writers' threshold is raised to a safety net
(``SAFETY_NET_PAGES``, set by ``open_database``), and a ``Checkpointer``
thread per process, on a connection of its own, runs a PASSIVE checkpoint
``INTERVAL_SECONDS`` after a commit. PASSIVE takes no lock that a writer
or a reader waits for: commits go on meanwhile, and what they add is
copied by the next one. Normally, that is: under a steady load the log
is seldom copied whole before the next commit, so it does not start over
at its beginning; it grows to the safety net (about 40 MB), where a
writer checkpoints inside its COMMIT again, on a log mostly copied by
then, and the file keeps that size. Nothing about durability changes: a
commit is durable in the log.
"""
import sqlite3
import threading
import time
from urllib.parse import quote

from server.data.faults import DISK_FULL, Throttled, classify, one_line

# Pages in the log past which a committing writer checkpoints itself: far
# above what the checkpointer leaves between two of its runs.
SAFETY_NET_PAGES = 10_000
# A checkpoint runs this long after the commit that asked for it, so that
# a page changed by several commits meanwhile is copied once.
INTERVAL_SECONDS = 0.1


class Checkpointer:
    """The checkpoint thread of the SQLite file at ``path``: ``committed()``
    (cheap, from any thread) asks for a checkpoint soon; ``stop()`` ends
    the thread. Its connection syncs as the writers' do (``synchronous``,
    SQLite's 0-3). ``runs`` counts the checkpoints that copied the whole
    log; one that could not (a reader still needs old pages, another
    process was checkpointing, commits came meanwhile) asks again after
    the interval. ``failures`` counts those that failed (a full disk, the
    file gone): each is logged, at most one line every few seconds (a full
    disk not at all: the store says it), and the next commit asks again.
    """

    def __init__(self, path, synchronous=2, interval=INTERVAL_SECONDS):
        self.path = path
        self.synchronous = int(synchronous)
        self.interval = interval
        self.runs = 0
        self.failures = 0
        self._wanted = threading.Event()
        self._stopping = False
        self._log = Throttled()
        self._connection = None
        self._thread = threading.Thread(target=self._loop,
                                        name='pb-checkpoint', daemon=True)

    def start(self):
        self._thread.start()

    def committed(self):
        self._wanted.set()

    def stop(self):
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _loop(self):
        while True:
            self._wanted.wait()
            if self._stopping:
                break
            time.sleep(self.interval)
            # A commit from now on asks again; so does a stop(), which
            # the clear must not lose (it may have come during the sleep).
            self._wanted.clear()
            if self._stopping:
                break
            try:
                if self._checkpoint():
                    self.runs += 1
                else:
                    self._wanted.set()  # the rest, after the interval
            except Exception as exc:
                self.failures += 1
                self._close()
                # A full disk is the store's to report (once, and in
                # /readyz): the writes fail too.
                if not isinstance(exc, sqlite3.Error) or \
                        classify(exc)[0] != DISK_FULL:
                    self._log('checkpoint', 'WAL checkpoint failed '
                              '(writers checkpoint themselves past %s '
                              'pages): %s', SAFETY_NET_PAGES, one_line(exc))
        self._close()

    def _checkpoint(self) -> bool:
        """One PASSIVE checkpoint: whether it copied the whole log."""
        if self._connection is None:
            # mode=rw: a database that is gone is not made anew, empty.
            self._connection = sqlite3.connect(
                f'file:{quote(self.path)}?mode=rw', uri=True, timeout=0,
                isolation_level=None, check_same_thread=False)
            self._connection.execute(
                f'PRAGMA synchronous = {self.synchronous}')
        busy, log, copied = self._connection.execute(
            'PRAGMA wal_checkpoint(PASSIVE)').fetchone()
        return not busy and copied == log

    def _close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None
