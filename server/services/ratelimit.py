"""Token buckets, one per key: the event and send rate limits
(``Limiter``) and the failed-try throttles (``server.services.limits``)."""
import time

from server.errors import RateLimited

# Past this many buckets, the full ones (which carry no information) go.
PRUNE_ABOVE = 100_000


class TokenBuckets:
    """A bucket of at most ``size`` tokens per key, refilled at ``rate``
    tokens per second; a key never seen has a full bucket."""

    def __init__(self, size: float, rate: float):
        self.size = float(size)
        self.rate = float(rate)
        self._buckets = {}  # key -> (tokens, monotonic time)

    def tokens(self, key, now) -> float:
        tokens, last = self._buckets.get(key, (self.size, now))
        return min(self.size, tokens + (now - last) * self.rate)

    def wait(self, key, cost=1.0) -> float:
        """0.0 while ``cost`` tokens are there, else the seconds until
        they are."""
        tokens = self.tokens(key, time.monotonic())
        return 0.0 if tokens >= cost else (cost - tokens) / self.rate

    def spend(self, key, cost=1.0):
        """Take ``cost`` tokens (never below 0)."""
        now = time.monotonic()
        self._set(key, max(0.0, self.tokens(key, now) - cost), now)

    def give_back(self, key):
        """Return a token that ``spend`` took (never above ``size``)."""
        now = time.monotonic()
        tokens = min(self.size, self.tokens(key, now) + 1)
        if tokens >= self.size:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = (tokens, now)

    def _set(self, key, tokens, now):
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > PRUNE_ABOVE:
            for k in [k for k in self._buckets
                      if self.tokens(k, now) >= self.size]:
                del self._buckets[k]


class Limiter(TokenBuckets):
    """``rate`` tokens per second, at most ``burst`` saved up. ``take(key)``
    spends one token or raises RateLimited with the seconds to wait."""

    def __init__(self, rate: float, burst: int):
        super().__init__(burst, rate)

    def take(self, key, cost=1.0):
        now = time.monotonic()
        tokens = self.tokens(key, now)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            raise RateLimited((cost - tokens) / self.rate)
        self._set(key, tokens - cost, now)
