"""What every service needs: the store, the config and a few caches."""
import threading
import time

from server.services.ratelimit import Limiter


def now_ms() -> int:
    return int(time.time() * 1000)


class LookupCache:
    """A mapping of at most ``size`` entries; when full, the oldest entry
    goes. Safe to use from the event loop and the reader threads at once
    (a get is one dict lookup; a put takes a lock)."""

    def __init__(self, size):
        self.size = size
        self._data = {}
        self._lock = threading.Lock()

    def get(self, key):
        return self._data.get(key)

    def put(self, key, value):
        with self._lock:
            if key not in self._data and len(self._data) >= self.size:
                del self._data[next(iter(self._data))]
            self._data[key] = value


class Context:
    """Shared state of one process. Caches hold only what never changes
    once written (users' public fields, a room's kind and members), so they
    need no invalidation across processes."""

    def __init__(self, store, config, secret):
        self.store = store
        self.config = config
        self.secret = secret
        self.users = {}         # user id -> public user dict
        self.rooms = {}         # room id -> RoomInfo
        # username -> user id; 'lowid:highid' -> dm room id
        self.user_ids = LookupCache(config.lookup_cache_entries)
        self.dm_rooms = LookupCache(config.lookup_cache_entries)
        # Inbox entries: room id -> (last_seq, room dict, last message);
        # (room id, user id) -> (last_read_seq, last_seq, unread count).
        # Valid while the room's last_seq (and the reader's marker) are
        # what the inbox reads from the database: every change in a room,
        # its members included, takes a seq.
        self.inbox_rooms = LookupCache(config.inbox_cache_rooms)
        self.inbox_unread = LookupCache(config.inbox_cache_rooms)
        self.send_limiter = Limiter(config.send_rate_per_second,
                                    config.send_burst)
