"""Ephemeral state of one process: who is typing where, who is online.
Never stored in the database (except a user's last-seen time)."""
import asyncio
import logging
import time

from models import User
from server.errors import PostboxError
from server.services.context import now_ms

log = logging.getLogger(__name__)


class Typing:
    """Typing state per (room, user), with the throttle that keeps a
    chatty client from flooding a room: a refresh of ``typing: true`` is
    forwarded at most once per ``throttle`` seconds."""

    def __init__(self, throttle: float):
        self.throttle = throttle
        self._state = {}  # (room_id, user_id) -> (sid, monotonic time sent)

    def update(self, room_id, user_id, sid, typing: bool) -> bool:
        """Record a typing change; True if it should be broadcast."""
        key = (room_id, user_id)
        if not typing:
            return self._state.pop(key, None) is not None
        now = time.monotonic()
        previous = self._state.get(key)
        if previous and now - previous[1] < self.throttle:
            self._state[key] = (sid, previous[1])
            return False
        self._state[key] = (sid, now)
        return True

    def stop(self, room_id, user_id) -> bool:
        """The user sent a message: True if a ``typing: false`` is due."""
        return self._state.pop((room_id, user_id), None) is not None

    def drop_socket(self, sid) -> list:
        """The socket closed: the (room, user) pairs it was typing in."""
        keys = [k for k, (s, _) in self._state.items() if s == sid]
        for key in keys:
            del self._state[key]
        return keys


class Presence:
    """Online status from this process's sockets. ``on_change(user_id,
    online, last_seen_ms)`` is awaited when a user comes online or, after
    the grace period, goes offline."""

    def __init__(self, store, grace: float, on_change):
        self.store = store
        self.grace = grace
        self.on_change = on_change
        self._sockets = {}   # user id -> open socket count
        self._timers = {}    # user id -> pending offline task
        self._last_seen = {}  # user id -> ms, for users seen by this process

    async def connected(self, user_id):
        self._sockets[user_id] = self._sockets.get(user_id, 0) + 1
        timer = self._timers.pop(user_id, None)
        if timer is not None:
            timer.cancel()  # a reload within the grace period: no flap
            return
        if self._sockets[user_id] == 1:
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
        await self.went_offline(user_id, last_seen)

    async def went_offline(self, user_id, last_seen):
        """Store the user's last-seen time and tell their contacts. While
        the database is away neither can be done (the contacts are read
        from it): that is logged, not raised, as nobody awaits a timer."""
        try:
            await self.store.write(_save_last_seen, user_id, last_seen)
            await self.on_change(user_id, False, last_seen)
        except PostboxError as exc:
            log.info('user %s went offline, not announced: %s', user_id, exc)

    def is_online(self, user_id) -> bool:
        return user_id in self._sockets or user_id in self._timers

    async def status(self, user_ids) -> dict:
        """{user_id: (online, last_seen_ms)}."""
        result = {}
        unknown = []
        for user_id in user_ids:
            if self.is_online(user_id):
                result[user_id] = (True, now_ms())
            elif user_id in self._last_seen:
                result[user_id] = (False, self._last_seen[user_id])
            else:
                unknown.append(user_id)
        return await self._add_stored(result, unknown)

    async def _add_stored(self, result, user_ids) -> dict:
        """Add (offline, stored last seen) for users nobody has seen."""
        if user_ids:
            stored = await self.store.read(_load_last_seen, user_ids)
            for user_id in user_ids:
                result[user_id] = (False, stored.get(user_id))
        return result

    async def close(self):
        for timer in self._timers.values():
            timer.cancel()


def _save_last_seen(user_id, ms):
    User.update(last_seen_at=ms).where(User.id == user_id).execute()


def _load_last_seen(user_ids):
    return dict(User.select(User.id, User.last_seen_at)
                .where(User.id.in_(user_ids)).tuples())
