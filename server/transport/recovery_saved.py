"""Frozen recovery sessions: a dropped socket's session is kept for the
recovery window, in Redis when the service has one (a reconnect to any
process recovers; it is taken with GETDEL, so it recovers once), else in
this process, written to ``recovery.json`` in the data directory on
SIGTERM and read back at start. A SIGKILL (or Redis unreachable) loses
them: those clients get ``recovered: false`` and sync, never a gap."""
import collections
import json
import logging
import math
import os
import time

from server.transport.recovery_session import Session

log = logging.getLogger(__name__)

SAVED_FILE = 'recovery.json'
# Frozen sessions kept at once: per user (the devices and tabs of one
# person that can be away together; a client that loops connects must not
# grow memory or Redis), and in this process overall (each holds up to
# recovery_max_events keys). The oldest go first: their clients sync.
SAVED_PER_USER = 16
SAVED_MAX = 20000


class Frozen:
    """The frozen sessions, by user and pid, for ``window`` seconds."""

    def __init__(self, window_seconds):
        self.window = window_seconds
        self.local = collections.OrderedDict()  # pid -> Session
        # user id -> that user's pids in ``local``, oldest first (pids
        # taken or expired meanwhile are dropped when the list is trimmed).
        self._mine = {}
        # With Redis (the cluster's fan-out manager: ``redis`` and
        # ``key_prefix``): sessions are kept there instead.
        self.shared = None

    def _key(self, user_id, pid=None):
        # The user is in the key: someone else who learns a pid cannot
        # take (and so spoil) that user's session. Without a pid: the
        # list of the user's saved pids, newest first.
        prefix = getattr(self.shared, 'key_prefix', None) or \
            self.shared.channel
        if pid is None:
            return f'{prefix}:recovery:{user_id}'
        return f'{prefix}:recovery:{user_id}:{pid}'

    async def take(self, user_id, pid):
        """Take the user's frozen session ``pid`` (it recovers once), or
        None."""
        if self.shared is None:
            session = self.local.get(pid)
            if session is None or session.user_id != user_id:
                return None
            self.local.pop(pid, None)
            self._forget(user_id)
            return session
        try:
            raw = await self.shared.redis.getdel(self._key(user_id, pid))
            return Session.from_json(json.loads(raw)) if raw else None
        except Exception as exc:  # Redis away: the client syncs instead
            log.warning('recovery: session not read from redis (%s)', exc)
            return None

    async def put(self, session):
        """Keep ``session`` (its ``saved_at`` set) for the window."""
        if self.shared is not None:
            try:
                await self._save_shared(session)
            except Exception as exc:  # lost: that client syncs instead
                log.warning('recovery: session not saved to redis (%s)', exc)
            return
        self.local[session.pid] = session
        self._expire()
        mine = self._mine.setdefault(session.user_id, collections.deque())
        mine.append(session.pid)
        if len(mine) > SAVED_PER_USER:
            # Cost bound by the user's own sessions, never by everyone's:
            # a burst of disconnects must not stall the event loop.
            live = [pid for pid in mine if pid in self.local]
            for pid in live[:-SAVED_PER_USER]:
                del self.local[pid]
            mine.clear()
            mine.extend(live[-SAVED_PER_USER:])
        while len(self.local) > SAVED_MAX:
            _, old = self.local.popitem(last=False)
            self._forget(old.user_id)

    def _forget(self, user_id):
        """Drop the user's entry once none of their pids is kept."""
        mine = self._mine.get(user_id)
        if mine is not None and not any(pid in self.local for pid in mine):
            del self._mine[user_id]

    async def _save_shared(self, session):
        redis, ttl = self.shared.redis, max(1, math.ceil(self.window))
        user = session.user_id
        await redis.set(self._key(user, session.pid),
                        json.dumps(session.to_json()), ex=ttl)
        count = await redis.lpush(self._key(user), session.pid)
        await redis.expire(self._key(user), ttl)
        if count > SAVED_PER_USER:
            for pid in await redis.rpop(self._key(user),
                                        count - SAVED_PER_USER) or ():
                if isinstance(pid, bytes):
                    pid = pid.decode()
                await redis.delete(self._key(user, pid))

    def _expire(self):
        cutoff = time.time() - self.window
        while self.local:
            pid, session = next(iter(self.local.items()))
            if session.saved_at >= cutoff:
                break
            del self.local[pid]
            self._forget(session.user_id)

    # -- restarts ----------------------------------------------------

    def save(self, directory):
        """Write the frozen sessions (after a drain) to ``directory``."""
        self._expire()
        if not self.local:
            return
        path = os.path.join(directory, SAVED_FILE)
        tmp = path + '.tmp'
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            json.dump([s.to_json() for s in self.local.values()], f)
        os.replace(tmp, path)
        log.info('recovery: %s sessions saved', len(self.local))

    def load(self, directory):
        """Read the sessions a drain saved, once (the file goes)."""
        path = os.path.join(directory, SAVED_FILE)
        try:
            with open(path) as f:
                items = json.load(f)
            os.unlink(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning('recovery: saved sessions unreadable (%s)', exc)
            return
        for data in items:
            try:
                session = Session.from_json(data)
            except (KeyError, TypeError, ValueError):
                continue
            self.local[session.pid] = session
            self._mine.setdefault(session.user_id,
                                  collections.deque()).append(session.pid)
        self._expire()
