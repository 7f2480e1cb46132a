"""What every service needs, built once per process: the store, the config,
the process's services (metrics, limits, presence, typing, file storage)
and a few bounded caches.

The context is a frozen dataclass: nothing is attached to it later. What
changes while the process runs lives inside its fields (a cache's entries,
the outbox's wake-up hook), each of them safe to use from the event loop
and the database threads at once.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from server.services.ratelimit import Limiter

if TYPE_CHECKING:  # annotations only: these modules import this one
    from server.config import Config
    from server.metrics import Metrics
    from server.services.attachments import Streaming
    from server.services.limits import Limits
    from server.services.live import Presence, Typing
    from server.storage import LocalStorage
    from server.store import Store


def now_ms() -> int:
    return int(time.time() * 1000)


_MISSING = object()


class LruCache:
    """A mapping of at most ``size`` entries; when full, the least recently
    used one goes. Safe to use from the event loop and the reader and
    writer threads at once. A read is two calls into the C OrderedDict,
    each atomic under the GIL, without a lock (reads are the hot path: an
    inbox of 5,000 rooms makes ~15,000 of them; a lock tripled their
    cost); an entry evicted between the two calls is still a correct
    answer. Writes take the lock: they are a check then a change."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._data = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        try:
            self._data.move_to_end(key)
        except KeyError:  # evicted or popped meanwhile
            pass
        return value

    def __getitem__(self, key):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        return key in self._data

    def put(self, key, value):
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            if len(self._data) > self.size:
                self._data.popitem(last=False)

    __setitem__ = put

    def pop(self, key, default=None):
        with self._lock:
            return self._data.pop(key, default)

    def __len__(self) -> int:
        return len(self._data)


class RoomCache(LruCache):
    """Room id -> RoomInfo. ``epoch`` counts the groups forgotten (their
    members, owner or name changed): a load that began before a change may
    have read the old members, so it caches its answer only if the epoch
    is still the one it started with."""

    def __init__(self, size: int):
        super().__init__(size)
        self.epoch = 0

    def forget(self, room_id):
        with self._lock:
            self._data.pop(room_id, None)
            self.epoch += 1

    def forget_all(self):
        """Every room (changes may have been missed: Redis was away)."""
        with self._lock:
            self._data.clear()
            self.epoch += 1


class Wake:
    """A hook the outbox dispatcher sets when it starts and clears when it
    stops; writers call it after a commit that added due rows. Callable
    from any thread; does nothing while no dispatcher runs."""

    def __init__(self):
        self.hook: Optional[Callable[[], Any]] = None

    def __call__(self):
        hook = self.hook
        if hook is not None:
            hook()


def _uploads_streaming():
    from server.services.attachments import Streaming  # imports this module
    return Streaming()


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """Shared state of one process. Caches hold only what is safe to keep
    (users' public fields, a room's kind and members, lookups that never
    change once written, inbox entries checked against the room's seq), so
    they need no invalidation across processes beyond ``rooms.forget``.

    Services are None only in tests of a service that does not use them."""

    store: Optional[Store]
    config: Config
    secret: str
    metrics: Optional[Metrics] = None
    limits: Optional[Limits] = None
    presence: Optional[Presence] = None  # local or Redis form
    typing: Optional[Typing] = None
    storage: Optional[LocalStorage] = None
    # The public VAPID key browsers subscribe with ('' without push).
    vapid_public_key: str = ''
    outbox_wake: Wake = dataclasses.field(default_factory=Wake)
    uploads_streaming: Streaming = dataclasses.field(
        default_factory=_uploads_streaming)
    # Built from the config (below).
    users: LruCache = dataclasses.field(init=False)
    rooms: RoomCache = dataclasses.field(init=False)
    user_ids: LruCache = dataclasses.field(init=False)
    dm_rooms: LruCache = dataclasses.field(init=False)
    inbox_rooms: LruCache = dataclasses.field(init=False)
    inbox_unread: LruCache = dataclasses.field(init=False)
    user_json: LruCache = dataclasses.field(init=False)
    send_limiter: Limiter = dataclasses.field(init=False)
    argon2_slots: asyncio.Semaphore = dataclasses.field(init=False)

    def __post_init__(self):
        config = self.config
        built = {
            # user id -> public user dict; room id -> RoomInfo
            'users': LruCache(config.user_cache_entries),
            'rooms': RoomCache(config.room_cache_entries),
            # username -> user id; 'lowid:highid' -> dm room id
            'user_ids': LruCache(config.lookup_cache_entries),
            'dm_rooms': LruCache(config.lookup_cache_entries),
            # Inbox entries: room id -> (last_seq, room dict, last message);
            # (room id, user id) -> (last_read_seq, last_seq, unread count).
            # Valid while the room's last_seq (and the reader's marker) are
            # what the inbox reads from the database: every change in a
            # room, its members included, takes a seq.
            'inbox_rooms': LruCache(config.inbox_cache_rooms),
            'inbox_unread': LruCache(config.inbox_cache_rooms),
            # user id -> the public user dict serialized (a big group's
            # inbox entry lists its members so; they never change).
            'user_json': LruCache(config.user_cache_entries),
            'send_limiter': Limiter(config.send_rate_per_second,
                                    config.send_burst),
            # The bound on Argon2 work running at once (64 MiB each): a
            # burst of logins queues here instead of taking all memory.
            'argon2_slots': asyncio.Semaphore(
                max(1, config.argon2_concurrency)),
        }
        for name, value in built.items():
            object.__setattr__(self, name, value)
