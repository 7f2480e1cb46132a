"""Presence shared by every process of a cluster through Redis.

Each process counts its own sockets per user exactly like
``LocalPresence`` (and keeps the same grace period before a user goes
offline). What it adds:

- ``<prefix>:online:<user>``: the set of processes holding the user (with
  a socket, or within the grace period). A process counts only while it is
  alive (the cluster's heartbeat), so the users of a crashed process go
  offline by themselves; a reaper on every process announces it (the first
  one to see the dead process wins).
- ``<prefix>:users:<process>``: the users a process holds, for the reaper.
- ``<prefix>:seen:<user>``: last seen time in ms, expiring after a month
  (the database keeps it for good).

A user comes online when the first process takes them and goes offline
when the last one lets go; only that process emits the change. If Redis is
unreachable the local view is used, as in a single process, at once while
the cluster knows Redis to be unreachable (no timeout per call); once
Redis answers again each process puts back exactly the users it holds.
"""
import asyncio
import logging

from server.cluster.scripts import PRESENCE_ADD_SCRIPT, \
    PRESENCE_REAP_SCRIPT, PRESENCE_REGISTER_SCRIPT, PRESENCE_REMOVE_SCRIPT, \
    PRESENCE_STATUS_SCRIPT
from server.services.context import now_ms
from server.services.live import Presence
from server.tasks import cancelled

log = logging.getLogger(__name__)

# Last seen outlives any grace period by far; the database is the record.
SEEN_TTL_SECONDS = 30 * 24 * 3600


class RedisPresence(Presence):
    """``Presence`` across the processes of ``cluster``."""

    def __init__(self, store, grace: float, on_change, cluster):
        super().__init__(store, grace, on_change)
        self.cluster = cluster
        self.me = cluster.host_id
        self._online = cluster.key('online:')
        self._users = cluster.key('users:')
        self._seen = cluster.key('seen:')
        self._hosts = cluster.key('hosts')
        self._add = cluster.script(PRESENCE_ADD_SCRIPT)
        self._remove = cluster.script(PRESENCE_REMOVE_SCRIPT)
        self._status = cluster.script(PRESENCE_STATUS_SCRIPT)
        self._reap = cluster.script(PRESENCE_REAP_SCRIPT)
        self._register = cluster.script(PRESENCE_REGISTER_SCRIPT)
        self._reaper = None
        cluster.on_register.append(self._register_all)

    def start(self):
        """Start the reaper of crashed processes' users."""
        self._reaper = asyncio.create_task(self._reap_loop())

    async def _shared(self, script, keys, args) -> int:
        """Run a presence script; 0 (nobody else) while Redis is away,
        to be put right by the re-registration once it answers."""
        if not self.cluster.reachable:
            self.cluster.skipped()
            return 0
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:
            self.cluster.skipped()
            self.cluster.trouble('presence', exc)
            return 0

    async def _claim(self, user_id) -> int:
        return await self._shared(
            self._add,
            [self._online + str(user_id), self._users + self.me, self._hosts],
            [self.me, self.cluster.alive_prefix, user_id])

    async def _release(self, user_id, last_seen) -> int:
        return await self._shared(
            self._remove,
            [self._online + str(user_id), self._users + self.me,
             self._seen + str(user_id)],
            [self.me, self.cluster.alive_prefix, user_id, last_seen,
             SEEN_TTL_SECONDS])

    async def _status_elsewhere(self, user_ids) -> dict:
        """As every process sees it; this process's view if Redis is
        away."""
        try:
            if not self.cluster.reachable:
                raise ConnectionError('known to be unreachable')
            online = await self._status(
                keys=[self._online + str(u) for u in user_ids],
                args=[self.cluster.alive_prefix])
            seen = await self.cluster.redis.mget(
                [self._seen + str(u) for u in user_ids])
        except Exception as exc:
            if self.cluster.reachable:
                self.cluster.trouble('presence', exc)
            return await self._status_here(user_ids)
        result, unknown = {}, []
        for user_id, on, ms in zip(user_ids, online, seen):
            if on:
                result[user_id] = (True, now_ms())
            elif ms is not None:
                result[user_id] = (False, int(ms))
            else:
                unknown.append(user_id)
        return await self._add_stored(result, unknown)

    async def _register_all(self):
        """Redis came back (possibly empty) or missed changes: hold
        exactly our users again (one script call: no pipeline whose
        connection could stay out of the pool)."""
        await self._register(keys=[self._hosts, self._users + self.me],
                             args=[self.me, self._online, *self.held()])

    async def _reap_loop(self):
        while not cancelled():  # not while True: see server/tasks.py
            await asyncio.sleep(self.cluster.heartbeat)
            if not self.cluster.reachable:
                continue
            try:
                now = now_ms()
                gone = await self._reap(keys=[self._hosts], args=[
                    self.cluster.alive_prefix, self._users, self._online,
                    self._seen, now, SEEN_TTL_SECONDS, self.me])
                for raw in gone:
                    user_id = int(raw)
                    if self.is_online(user_id):
                        continue
                    log.info('presence: user %s went with a dead process',
                             user_id)
                    await self.went_offline(user_id, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug('presence reaper: %s', exc)

    async def close(self):
        await super().close()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
