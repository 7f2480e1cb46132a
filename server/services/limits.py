"""Abuse limits that are not message rules: connections per user and per
client address, a token bucket per user over every event (Socket.IO and
HTTP), failed-login and registration throttling and the number of rooms
a user may be in.

Connection counting and the throttles are each an interface with a local
form (this module: counts of this process) and a Redis form
(``limits_redis.py``: counts shared by every process, so the limits hold
across them); ``Limits(config, cluster)`` picks them.
"""
from server.data.groups import room_counts
from server.errors import Forbidden, RateLimited
from server.services.ratelimit import Limiter, TokenBuckets

# The kinds of connection count, and what a refusal of each says.
USER, ADDRESS = 'user', 'ip'
REFUSALS = {USER: 'too many connections for this user',
            ADDRESS: 'too many connections from this address'}


class TooManyConnections(Exception):
    """A connection over the per-user or per-address limit."""


class Connections:
    """Open sockets per user id and per client address: the interface.
    ``acquire`` counts a socket or raises TooManyConnections (counting
    nothing) when either limit is reached; ``acquire_address`` counts a
    socket that has no user yet (an Engine.IO session before its
    Socket.IO connect). Implementations provide ``_acquire(keys)`` and
    ``_release(keys)`` over (kind, key) pairs; every one keeps this
    process's own counts (``_count``/``_uncount``)."""

    def __init__(self, per_user: int, per_ip: int):
        self.limits = {USER: per_user, ADDRESS: per_ip}
        self._counts = {}  # (kind, key) -> sockets of this process

    async def acquire(self, user_id, ip):
        await self._acquire([(USER, user_id), (ADDRESS, ip)])

    async def release(self, user_id, ip):
        await self._release([(USER, user_id), (ADDRESS, ip)])

    async def acquire_address(self, ip):
        await self._acquire([(ADDRESS, ip)])

    async def release_address(self, ip):
        await self._release([(ADDRESS, ip)])

    async def _acquire(self, keys):
        raise NotImplementedError

    async def _release(self, keys):
        raise NotImplementedError

    def _count(self, keys):
        """Count one socket on every key, or raise (counting nothing)."""
        for kind, key in keys:
            if self._counts.get((kind, key), 0) >= self.limits[kind]:
                raise TooManyConnections(REFUSALS[kind])
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1

    def _uncount(self, keys):
        for key in keys:
            left = self._counts.get(key, 0) - 1
            if left > 0:
                self._counts[key] = left
            else:
                self._counts.pop(key, None)


class LocalConnections(Connections):
    """Connections counted in this process only."""

    async def _acquire(self, keys):
        self._count(keys)

    async def _release(self, keys):
        self._uncount(keys)


class Throttle:
    """Tries that cost us real work (a password check, an Argon2 hash),
    counted in token buckets, one per kind of key: ``buckets`` is a list
    of (kind, TokenBuckets), e.g. a username's and a client address's.
    ``take(*keys)``, one key per kind in that order (None: not counted),
    spends a try from each key's bucket before the work, or raises
    RateLimited (spending nothing) while one of them is used up;
    ``give_back(*keys)`` returns the try when it should not count (a right
    password, an error of ours). ``name`` tells the throttles apart in
    Redis keys and logs. This is the interface and the local form; see
    ``limits_redis.RedisThrottle``.

    The try is spent before the work, not after it: the work takes tens of
    milliseconds, and a burst of concurrent tries would all pass a look at
    the bucket before the first of them had finished."""

    def __init__(self, name, buckets, message):
        self.name = name
        self.buckets = buckets
        self.message = message

    def counted(self, keys):
        """(kind, TokenBuckets, key) of every key that is counted."""
        return [(kind, buckets, key)
                for (kind, buckets), key in zip(self.buckets, keys)
                if key is not None and key != '']

    async def take(self, *keys):
        counted = self.counted(keys)
        # No await between the look and the spend: one step on the loop.
        wait = max([b.wait(key) for _, b, key in counted], default=0.0)
        if wait > 0:
            raise RateLimited(wait, self.message)
        self.spend(counted)

    def spend(self, counted):
        for _, buckets, key in counted:
            buckets.spend(key)

    async def give_back(self, *keys):
        for _, buckets, key in self.counted(keys):
            buckets.give_back(key)


def login_throttle(per_username: int, per_ip: int,
                   refill_per_minute) -> Throttle:
    """Failed logins (and failed old-password checks of a password change)
    per username and per client address: ``take(username, ip)``. A wrong
    guess costs the guesser, and a user locked out by someone else's
    guesses waits minutes, not forever."""
    rate = refill_per_minute / 60.0
    # The address allowance refills proportionally faster, so both empty
    # over the same time.
    return Throttle('login', [
        ('user', TokenBuckets(per_username, rate)),
        ('ip', TokenBuckets(per_ip, rate * per_ip / max(per_username, 1)))],
        'too many failed logins, try later')


def registration_throttle(per_ip: int, refill_per_minute) -> Throttle:
    """Registrations per client address, ``take(ip)``: every one costs an
    Argon2 hash (64 MiB, tens of ms), so each counts, not only failures."""
    return Throttle('register',
                    [('ip', TokenBuckets(per_ip, refill_per_minute / 60.0))],
                    'too many registrations from this address, try later')


def check_room_quota(ctx, user_id):
    """Raises Forbidden when ``user_id`` is already in ``rooms_per_user_max``
    rooms. Called inside the write transaction that adds a room, so the
    count and the new room are one step."""
    limit = ctx.config.rooms_per_user_max
    if room_counts([user_id]).get(user_id, 0) >= limit:
        raise Forbidden(f'you are in {limit} rooms, the most allowed')


class Limits:
    """Every abuse limit of one process, built from the config; with a
    ``cluster`` (``server.cluster.Cluster``) connection counts, failed
    logins and registrations count across processes."""

    def __init__(self, config, cluster=None):
        self.events = Limiter(config.event_rate_per_second,
                              config.event_burst)
        per_user = config.max_connections_per_user
        per_ip = config.max_connections_per_ip
        logins = login_throttle(config.login_failures_per_username,
                                config.login_failures_per_ip,
                                config.login_refill_per_minute)
        registrations = registration_throttle(
            config.registrations_per_ip,
            config.registration_refill_per_minute)
        if cluster is None:
            self.connections = LocalConnections(per_user, per_ip)
            self.logins, self.registrations = logins, registrations
            return
        # Imported here: the Redis forms build on the interfaces above.
        from server.services.limits_redis import RedisConnections, \
            RedisThrottle
        self.connections = RedisConnections(per_user, per_ip, cluster)
        self.logins = RedisThrottle(logins, cluster)
        self.registrations = RedisThrottle(registrations, cluster)
