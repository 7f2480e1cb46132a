"""What every service needs: the store, the config and a few caches."""
import time

from server.services.ratelimit import Limiter


def now_ms() -> int:
    return int(time.time() * 1000)


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
        self.send_limiter = Limiter(config.send_rate_per_second,
                                    config.send_burst)
