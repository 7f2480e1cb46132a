"""Presence shared by every process through Redis.

Each process counts its own sockets per user exactly like ``Presence`` (and
keeps the same grace period before a user goes offline). What it adds:

- ``<channel>:online:<user>``: the set of processes holding the user (with
  a socket, or within the grace period). A process counts only while its
  liveness key (kept by the Redis client manager's heartbeat) exists, so the
  users of a crashed process go offline by themselves; a reaper on every
  process announces it (the first one to see the dead process wins).
- ``<channel>:users:<process>``: the users a process holds, for the reaper.
- ``<channel>:seen:<user>``: last seen time in ms, expiring after a month
  (the database keeps it for good).

A user comes online when the first process takes them and goes offline
when the last one lets go; only that process emits the change. If Redis is
unreachable the local view is used, as in a single process, at once while
the manager knows Redis to be unreachable (no timeout per call); once
Redis answers again each process puts back exactly the users it holds.
"""
import asyncio
import logging

from server.services.context import now_ms
from server.services.live import Presence

log = logging.getLogger(__name__)

# Last seen outlives any grace period by far; the database is the record.
SEEN_TTL_SECONDS = 30 * 24 * 3600

_LIVE_OTHERS = """
local function live_others(key, me, alive_prefix)
  local n = 0
  for _, h in ipairs(redis.call('SMEMBERS', key)) do
    if h ~= me then
      if redis.call('EXISTS', alive_prefix .. h) == 1 then
        n = n + 1
      else
        redis.call('SREM', key, h)
      end
    end
  end
  return n
end
"""

# KEYS: online set, this process's user set, process set.
# ARGV: me, alive prefix, user id. Returns how many other live processes
# already held the user.
ADD_SCRIPT = _LIVE_OTHERS + """
local others = live_others(KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return others
"""

# KEYS: online set, this process's user set, seen key.
# ARGV: me, alive prefix, user id, last seen ms, seen ttl.
REMOVE_SCRIPT = _LIVE_OTHERS + """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[3])
local others = live_others(KEYS[1], ARGV[1], ARGV[2])
if others == 0 then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
end
return others
"""

# Put back what this process holds after Redis lost it (restart) or missed
# changes (an outage): KEYS: process set, this process's user set. ARGV:
# me, online prefix, then the users held. Users this process no longer
# holds (they left while Redis was away) are taken off, so they do not
# stay online in Redis for as long as this process lives.
REGISTER_SCRIPT = """
local held = {}
for i = 3, #ARGV do held[ARGV[i]] = true end
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not held[u] then
    redis.call('SREM', ARGV[2] .. u, ARGV[1])
    redis.call('SREM', KEYS[2], u)
  end
end
redis.call('SADD', KEYS[1], ARGV[1])
for i = 3, #ARGV do
  redis.call('SADD', ARGV[2] .. ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return 0
"""

# KEYS: online sets. ARGV: alive prefix. Returns 1/0 per key.
STATUS_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local on = 0
  for _, h in ipairs(redis.call('SMEMBERS', key)) do
    if redis.call('EXISTS', ARGV[1] .. h) == 1 then
      on = 1
      break
    end
  end
  out[i] = on
end
return out
"""

# KEYS: process set. ARGV: alive prefix, users prefix, online prefix,
# seen prefix, now ms, seen ttl, me. Drops dead processes and returns the
# users that no live process holds any more.
REAP_SCRIPT = """
local gone = {}
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= ARGV[7] and redis.call('EXISTS', ARGV[1] .. h) == 0 then
    redis.call('SREM', KEYS[1], h)
    local ukey = ARGV[2] .. h
    for _, u in ipairs(redis.call('SMEMBERS', ukey)) do
      local okey = ARGV[3] .. u
      redis.call('SREM', okey, h)
      local live = false
      for _, o in ipairs(redis.call('SMEMBERS', okey)) do
        if redis.call('EXISTS', ARGV[1] .. o) == 1 then
          live = true
          break
        end
      end
      if not live then
        redis.call('SET', ARGV[4] .. u, ARGV[5], 'EX', ARGV[6])
        table.insert(gone, u)
      end
    end
    redis.call('DEL', ukey)
  end
end
return gone
"""


class RedisPresence(Presence):
    """``Presence`` across processes. ``manager`` is the Redis client
    manager: its client, process id, liveness keys and heartbeat."""

    def __init__(self, store, grace: float, on_change, manager):
        super().__init__(store, grace, on_change)
        self.manager = manager
        self.redis = manager.redis
        self.me = manager.host_id
        prefix = manager.key_prefix  # one hash tag on a Redis Cluster
        self._online = f'{prefix}:online:'
        self._users = f'{prefix}:users:'
        self._seen = f'{prefix}:seen:'
        self._hosts = f'{prefix}:hosts'
        self._add = self.redis.register_script(ADD_SCRIPT)
        self._remove = self.redis.register_script(REMOVE_SCRIPT)
        self._status = self.redis.register_script(STATUS_SCRIPT)
        self._reap = self.redis.register_script(REAP_SCRIPT)
        self._register = self.redis.register_script(REGISTER_SCRIPT)
        self._reaper = None
        manager.on_register.append(self._register_all)

    def start(self):
        """Start the reaper of crashed processes' users."""
        self._reaper = asyncio.create_task(self._reap_loop())

    async def connected(self, user_id):
        self._sockets[user_id] = self._sockets.get(user_id, 0) + 1
        timer = self._timers.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # a reload within the grace period: no flap
            return
        if self._sockets[user_id] != 1:
            return
        others = 0
        if not self.manager.reachable:
            self.manager.skipped()  # registered when Redis answers
        else:
            try:
                others = await self._add(
                    keys=[self._online + str(user_id), self._users + self.me,
                          self._hosts],
                    args=[self.me, self.manager.alive_prefix, user_id])
            except Exception as exc:
                self.manager.skipped()
                self.manager.trouble('presence', exc)
        if not others:
            await self.on_change(user_id, True, now_ms())

    async def _expire(self, user_id):
        await asyncio.sleep(self.grace)
        self._timers.pop(user_id, None)
        last_seen = self._last_seen.get(user_id, now_ms())
        others = 0
        if not self.manager.reachable:
            self.manager.skipped()  # taken off when Redis answers
        else:
            try:
                others = await self._remove(
                    keys=[self._online + str(user_id), self._users + self.me,
                          self._seen + str(user_id)],
                    args=[self.me, self.manager.alive_prefix, user_id,
                          last_seen, SEEN_TTL_SECONDS])
            except Exception as exc:
                self.manager.skipped()
                self.manager.trouble('presence', exc)
        if others:
            return  # still online on another process
        await self.went_offline(user_id, last_seen)

    async def status(self, user_ids) -> dict:
        """{user_id: (online, last_seen_ms)} as every process sees it."""
        user_ids = list(user_ids)
        result = {u: (True, now_ms()) for u in user_ids if self.is_online(u)}
        rest = [u for u in user_ids if u not in result]
        if not rest:
            return result
        try:
            if not self.manager.reachable:
                raise ConnectionError('known to be unreachable')
            online = await self._status(
                keys=[self._online + str(u) for u in rest],
                args=[self.manager.alive_prefix])
            seen = await self.redis.mget([self._seen + str(u) for u in rest])
        except Exception as exc:
            if self.manager.reachable:
                self.manager.trouble('presence', exc)
            result.update(await super().status(rest))
            return result
        unknown = []
        for user_id, on, ms in zip(rest, online, seen):
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
        users = set(self._sockets) | set(self._timers)
        await self._register(keys=[self._hosts, self._users + self.me],
                             args=[self.me, self._online, *users])

    async def _reap_loop(self):
        while True:
            await asyncio.sleep(self.manager.heartbeat)
            if not self.manager.reachable:
                continue
            try:
                now = now_ms()
                gone = await self._reap(keys=[self._hosts], args=[
                    self.manager.alive_prefix, self._users, self._online,
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
