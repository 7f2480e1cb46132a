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
copied by the next one. Under a load that never leaves the log whole
behind a checkpoint, the safety net makes a writer finish one itself (on
a log that is mostly copied already), so the log stays bounded either
way. Nothing about durability changes: a commit is durable in the log.
"""
import sqlite3
import threading
import time

from server.data.faults import DISK_FULL, Throttled, classify, one_line

# Pages in the log past which a committing writer checkpoints itself: far
# above what the checkpointer leaves between two of its runs.
SAFETY_NET_PAGES = 10_000
# A checkpoint runs this long after the commit that asked for it, so that
# a page changed by several commits meanwhile is copied once.
INTERVAL_SECONDS = 0.1
# SQLITE_BUSY, SQLITE_LOCKED: another connection is checkpointing.
BUSY_CODES = (5, 6)


class Checkpointer:
    """The checkpoint thread of the SQLite file at ``path``: ``committed()``
    (cheap, from any thread) asks for a checkpoint soon; ``stop()`` ends
    the thread. ``runs`` counts the checkpoints done, ``failures`` those
    that failed (a full disk, the file gone): each is logged, at most one
    line every few seconds (a full disk not at all: the store says it),
    and the next commit asks again."""

    def __init__(self, path, interval=INTERVAL_SECONDS):
        self.path = path
        self.interval = interval
        self.runs = 0
        self.failures = 0
        self._wanted = threading.Event()
        self._stopping = False
        self._log = Throttled()
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
        connection = None
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
                if connection is None:
                    connection = sqlite3.connect(
                        self.path, timeout=0, isolation_level=None,
                        check_same_thread=False)
                connection.execute('PRAGMA wal_checkpoint(PASSIVE)')
                self.runs += 1
            except sqlite3.Error as exc:
                if getattr(exc, 'sqlite_errorcode', None) in BUSY_CODES:
                    continue  # another process's checkpointer: its turn
                self.failures += 1
                # A full disk is the store's to report (once, and in
                # /readyz): the writes fail too.
                if classify(exc)[0] != DISK_FULL:
                    self._log('checkpoint', 'WAL checkpoint failed '
                              '(writers checkpoint themselves past %s '
                              'pages): %s', SAFETY_NET_PAGES, one_line(exc))
                if connection is not None:
                    connection.close()
                connection = None
        if connection is not None:
            connection.close()
