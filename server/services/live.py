"""Ephemeral state: who is typing where (per process), who is online
(the ``Presence`` interface and its one-process form). Never stored in
the database (except a user's last-seen time)."""
import asyncio
import logging
import math
import time

from server.data import presence as presence_data
from server.errors import PostboxError
from server.services.context import now_ms

log = logging.getLogger(__name__)

# Past this many remembered (room, user) typing times, the old ones are
# forgotten.
SENT_PRUNE_AT = 10_000


class Typing:
    """Typing state per (room, user), with the throttle that keeps a
    chatty client from flooding a room: a refresh of ``typing: true`` is
    forwarded at most once per ``throttle`` seconds. After a ``false``
    (the user cleared the box), a ``true`` shows again, but no sooner
    than a quarter of that after the last one: true, false, true as fast
    as the event bucket allows would otherwise forward every true. A sent
    message ends the period: the next message's typing shows at once."""

    def __init__(self, throttle: float):
        self.throttle = throttle
        self._state = {}  # (room_id, user_id) -> sid, while shown typing
        self._sent = {}  # (room_id, user_id) -> monotonic time of last true
        self._pruned = time.monotonic()

    def update(self, room_id, user_id, sid, typing: bool) -> bool:
        """Record a typing change; True if it should be broadcast."""
        key = (room_id, user_id)
        if not typing:
            return self._state.pop(key, None) is not None
        now = time.monotonic()
        showing = key in self._state
        wait = self.throttle if showing else self.throttle / 4
        if now - self._sent.get(key, -math.inf) < wait:
            if showing:
                self._state[key] = sid  # a refresh, from this socket now
            return False
        if len(self._sent) >= SENT_PRUNE_AT and \
                now - self._pruned >= self.throttle:
            self._prune(now)
        self._sent[key] = now
        self._state[key] = sid
        return True

    def _prune(self, now):
        """Forget the times of trues older than the throttle: they stop
        nothing any more (the map stays as large as the active typists).
        At most once per throttle period: a scan of the whole map."""
        self._pruned = now
        self._sent = {k: t for k, t in self._sent.items()
                      if now - t < self.throttle}

    def stop(self, room_id, user_id) -> bool:
        """The user sent a message: True if a ``typing: false`` is due."""
        self._sent.pop((room_id, user_id), None)
        return self._state.pop((room_id, user_id), None) is not None

    def drop_socket(self, sid) -> list:
        """The socket closed: the (room, user) pairs it was typing in."""
        keys = [k for k, s in self._state.items() if s == sid]
        for key in keys:
            del self._state[key]
        return keys


class Presence:
    """Online status: the interface, and the counting every form shares.
    A user is online while this process holds a socket of theirs and for
    ``grace`` seconds after the last one closed (a reload does not flap).
    ``on_change(user_id, online, last_seen_ms)`` is awaited when a user
    comes online or goes offline, by the process that saw it.

    Implementations say what other processes know: ``_claim(user_id)``
    (this process took the user: how many others held them already),
    ``_release(user_id, last_seen)`` (this process let go: how many
    others still hold them) and ``_status_elsewhere(user_ids)`` (users
    not online here). ``LocalPresence`` is one process;
    ``presence_redis.RedisPresence`` shares it through Redis."""

    def __init__(self, store, grace: float, on_change):
        self.store = store
        self.grace = grace
        self.on_change = on_change
        self._sockets = {}   # user id -> open socket count
        self._timers = {}    # user id -> pending offline task
        self._last_seen = {}  # user id -> ms, for users seen by this process

    def start(self):
        """Start background work, if the implementation has any."""

    async def connected(self, user_id):
        self._sockets[user_id] = self._sockets.get(user_id, 0) + 1
        timer = self._timers.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # a reload within the grace period: no flap
            return
        if self._sockets[user_id] == 1 and not await self._claim(user_id):
            await self.on_change(user_id, True, now_ms())

    async def disconnected(self, user_id):
        count = self._sockets.get(user_id, 0) - 1
        if count > 0:
            self._sockets[user_id] = count
            return
        self._sockets.pop(user_id, None)
        self._last_seen[user_id] = now_ms()
        self._timers[user_id] = asyncio.create_task(self._expire(user_id))

    async def _expire(self, user_id):
        await asyncio.sleep(self.grace)
        self._timers.pop(user_id, None)
        last_seen = self._last_seen.get(user_id, now_ms())
        if not await self._release(user_id, last_seen):
            await self.went_offline(user_id, last_seen)

    async def went_offline(self, user_id, last_seen):
        """Store the user's last-seen time and tell their contacts. While
        the database is away neither can be done (the contacts are read
        from it): that is logged, not raised, as nobody awaits a timer."""
        try:
            await self.store.write(presence_data.save_last_seen, user_id,
                                   last_seen)
            await self.on_change(user_id, False, last_seen)
        except PostboxError as exc:
            log.info('user %s went offline, not announced: %s', user_id, exc)

    def is_online(self, user_id) -> bool:
        """Online as this process sees it."""
        return user_id in self._sockets or user_id in self._timers

    def connected_here(self, user_ids) -> set:
        """The users among ``user_ids`` with a socket open on this process
        (not those in their grace period). Safe from another thread: one
        dict lookup per user, atomic under the GIL."""
        sockets = self._sockets
        return {u for u in user_ids if u in sockets}

    def held(self) -> set:
        """The users this process counts as online."""
        return set(self._sockets) | set(self._timers)

    async def status(self, user_ids) -> dict:
        """{user_id: (online, last_seen_ms)}."""
        result = {u: (True, now_ms()) for u in user_ids if self.is_online(u)}
        rest = [u for u in user_ids if u not in result]
        if rest:
            result.update(await self._status_elsewhere(rest))
        return result

    async def _claim(self, user_id) -> int:
        raise NotImplementedError

    async def _release(self, user_id, last_seen) -> int:
        raise NotImplementedError

    async def _status_elsewhere(self, user_ids) -> dict:
        raise NotImplementedError

    async def _status_here(self, user_ids) -> dict:
        """(offline, last seen) of users offline here, from what this
        process saw or else the database."""
        result, unknown = {}, []
        for user_id in user_ids:
            if user_id in self._last_seen:
                result[user_id] = (False, self._last_seen[user_id])
            else:
                unknown.append(user_id)
        return await self._add_stored(result, unknown)

    async def _add_stored(self, result, user_ids) -> dict:
        """Add (offline, stored last seen) for users nobody has seen."""
        if user_ids:
            stored = await self.store.read(presence_data.last_seen, user_ids)
            for user_id in user_ids:
                result[user_id] = (False, stored.get(user_id))
        return result

    async def close(self):
        for timer in self._timers.values():
            timer.cancel()


class LocalPresence(Presence):
    """Presence of one process: nobody else holds anyone."""

    async def _claim(self, user_id) -> int:
        return 0

    async def _release(self, user_id, last_seen) -> int:
        return 0

    async def _status_elsewhere(self, user_ids) -> dict:
        return await self._status_here(user_ids)


def presence_for(cluster, store, grace: float, on_change) -> Presence:
    """``LocalPresence`` without a cluster, ``RedisPresence`` on one."""
    if cluster is None:
        return LocalPresence(store, grace, on_change)
    # Imported here: the Redis form builds on the interface above.
    from server.services.presence_redis import RedisPresence
    return RedisPresence(store, grace, on_change, cluster)
