"""What every service needs: the store, the config and a few caches."""
import time

from server.services.ratelimit import Limiter


def now_ms() -> int:
    return int(time.time() * 1000)


class LookupCache:
    """A mapping of at most ``size`` entries, for values that never change
    once written; when full, the oldest entry goes. Used from the event
    loop only."""

    def __init__(self, size):
        self.size = size
        self._data = {}

    def get(self, key):
        return self._data.get(key)

    def put(self, key, value):
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
        self.send_limiter = Limiter(config.send_rate_per_second,
                                    config.send_burst)
