"""Token buckets, one per key (a user id)."""
import time

from server.errors import RateLimited


class Limiter:
    """``rate`` tokens per second, at most ``burst`` saved up. ``take(key)``
    spends one token or raises RateLimited with the seconds to wait."""

    def __init__(self, rate: float, burst: int):
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets = {}  # key -> (tokens, last time)

    def take(self, key, cost=1.0):
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            raise RateLimited((cost - tokens) / self.rate)
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > 100_000:
            self._prune(now)

    def _prune(self, now):
        # Buckets that refilled completely carry no information.
        full = [k for k, (t, last) in self._buckets.items()
                if t + (now - last) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]
