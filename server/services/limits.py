"""Abuse limits that are not message rules: connections per user and per
client address, a token bucket per user over every event (Socket.IO and
HTTP), failed-login and registration throttling and the number of rooms
a user may be in.

They count in this process, except, when Redis is configured, connections
per user and per address (``SharedConnections``), failed logins and
registrations per address (``SharedThrottle``): those counts live in Redis
so the limits hold across processes (a user's sockets, one address's
sockets and a guesser's tries land on any of them).
"""
import logging
import time

from models import Membership
from server.errors import Forbidden, RateLimited
from server.services.ratelimit import Limiter

log = logging.getLogger(__name__)


class TooManyConnections(Exception):
    """A connection over the per-user or per-address limit."""


class Connections:
    """Open sockets per user id and per client address."""

    def __init__(self, per_user: int, per_ip: int):
        self.per_user = per_user
        self.per_ip = per_ip
        self._users = {}
        self._ips = {}

    async def acquire(self, user_id, ip):
        """Count a new socket; raises TooManyConnections (and counts
        nothing) when either limit is reached."""
        if self._users.get(user_id, 0) >= self.per_user:
            raise TooManyConnections('too many connections for this user')
        if self._ips.get(ip, 0) >= self.per_ip:
            raise TooManyConnections('too many connections from this address')
        self._users[user_id] = self._users.get(user_id, 0) + 1
        self._ips[ip] = self._ips.get(ip, 0) + 1

    async def release(self, user_id, ip):
        for counts, key in ((self._users, user_id), (self._ips, ip)):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    async def acquire_address(self, ip):
        """Count a socket of ``ip`` that has no user yet (an Engine.IO
        session before its Socket.IO connect); raises TooManyConnections
        (counting nothing) when the address is at its limit."""
        if self._ips.get(ip, 0) >= self.per_ip:
            raise TooManyConnections('too many connections from this address')
        self._ips[ip] = self._ips.get(ip, 0) + 1

    async def release_address(self, ip):
        left = self._ips.get(ip, 0) - 1
        if left > 0:
            self._ips[ip] = left
        else:
            self._ips.pop(ip, None)


# KEYS: hashes {process id: sockets}, the user's then the address's.
# ARGV: own process id, liveness key prefix, then the limit of each key in
# turn. Adds one socket of this process to every hash, or, when one of them
# is at its limit, to none and returns that key's position (1-based); 0 when
# counted. Counts of processes whose liveness key expired (crashed) are
# dropped, so a crash never locks a user or an address out for long.
ACQUIRE_SCRIPT = """
local me, alive_prefix = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  local total = 0
  local counts = redis.call('HGETALL', key)
  for j = 1, #counts, 2 do
    local host, n = counts[j], tonumber(counts[j + 1])
    if host == me or redis.call('EXISTS', alive_prefix .. host) == 1 then
      total = total + n
    else
      redis.call('HDEL', key, host)
    end
  end
  if total >= tonumber(ARGV[2 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, me, 1)
  redis.call('EXPIRE', key, 86400)
end
return 0
"""

# KEYS: the hashes ACQUIRE_SCRIPT counted in. ARGV[1]: own process id.
# Takes one socket of this process off every hash; in one step, so an
# acquire elsewhere cannot slip in between the decrement and the HDEL of a
# count that reached 0.
RELEASE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('HINCRBY', key, ARGV[1], -1) <= 0 then
    redis.call('HDEL', key, ARGV[1])
  end
end
return 0
"""

# Put this process's counts back after Redis lost them (restart) or missed
# changes (an outage). KEYS: the hashes this process holds sockets in, then
# those it released while Redis was away. ARGV: own process id, how many
# held keys, then the count of each. Sets the held counts, drops the rest.
REGISTER_COUNTS_SCRIPT = """
local me, held = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= held then
    redis.call('HSET', key, me, ARGV[2 + i])
    redis.call('EXPIRE', key, 86400)
  else
    redis.call('HDEL', key, me)
  end
end
return 0
"""


class SharedConnections(Connections):
    """Connections per user and per client address counted in Redis
    across every process: with N processes behind one port either would
    otherwise allow N times its limit. Both are checked and counted in one
    script call, so a refused connection counts nothing anywhere.
    ``manager`` is the Redis client manager: its ``redis`` client,
    ``host_id`` and ``alive_prefix``. This process's own counts are kept
    too and checked first; if Redis is unreachable they alone decide, so an
    outage does not refuse everyone (at once while the manager knows Redis
    to be unreachable: a hung Redis must not hold up every connect). When
    Redis is back (restarted empty, or having missed counts) the manager's
    re-registration puts this process's counts back exactly."""

    REFUSALS = ('too many connections for this user',
                'too many connections from this address')

    def __init__(self, per_user, per_ip, manager, prefix):
        super().__init__(per_user, per_ip)
        self.manager = manager
        self.prefix = prefix
        self._acquire = manager.redis.register_script(ACQUIRE_SCRIPT)
        self._release = manager.redis.register_script(RELEASE_SCRIPT)
        self._register = manager.redis.register_script(
            REGISTER_COUNTS_SCRIPT)
        self._released_away = set()  # keys whose release missed Redis
        manager.on_register.append(self._register_all)

    async def _register_all(self):
        """Set this process's count in every hash it holds sockets in to
        what it holds, and drop it from those it released while Redis was
        away (the manager calls this after every re-registration)."""
        held = {f'{self.prefix}:conns:{user_id}': n
                for user_id, n in self._users.items()}
        held.update({f'{self.prefix}:conns:ip:{ip}': n
                     for ip, n in self._ips.items() if ip is not None})
        gone = self._released_away - held.keys()
        self._released_away = set()
        try:
            await self._register(keys=[*held, *gone],
                                 args=[self.manager.host_id, len(held),
                                       *held.values()])
        except BaseException:
            self._released_away |= gone
            raise

    def _missed(self, keys, exc=None):
        """A count change that did not reach Redis: put right at the next
        re-registration."""
        self._released_away.update(keys)
        self.manager.skipped()
        if exc is not None:
            self.manager.trouble('shared connection count', exc)

    def _keys(self, user_id, ip):
        """The Redis hashes of ``user_id`` and ``ip`` (the user's only when
        the address is unknown)."""
        # The user's key is the one used before addresses were shared, so
        # processes of both versions count a user in the same place.
        keys = [f'{self.prefix}:conns:{user_id}']
        if ip is not None:
            keys.append(f'{self.prefix}:conns:ip:{ip}')
        return keys

    async def acquire(self, user_id, ip):
        await super().acquire(user_id, ip)
        if not self.manager.reachable:
            return self.manager.skipped()  # the local count stands
        try:
            refused = await self._acquire(
                keys=self._keys(user_id, ip),
                args=[self.manager.host_id, self.manager.alive_prefix,
                      self.per_user, self.per_ip])
        except Exception as exc:  # Redis down: the local count stands
            return self._missed((), exc)
        if refused:
            await super().release(user_id, ip)
            raise TooManyConnections(self.REFUSALS[refused - 1])

    async def release(self, user_id, ip):
        await super().release(user_id, ip)
        try:
            # Tried even while Redis is known to be unreachable: a count
            # left behind would refuse the user for a day.
            await self._release(keys=self._keys(user_id, ip),
                                args=[self.manager.host_id])
        except Exception as exc:
            self._missed(self._keys(user_id, ip), exc)

    async def acquire_address(self, ip):
        await super().acquire_address(ip)
        if not self.manager.reachable:
            return self.manager.skipped()  # the local count stands
        try:
            refused = await self._acquire(
                keys=self._keys(None, ip)[1:],
                args=[self.manager.host_id, self.manager.alive_prefix,
                      self.per_ip])
        except Exception as exc:  # Redis down: the local count stands
            return self._missed((), exc)
        if refused:
            await super().release_address(ip)
            raise TooManyConnections(self.REFUSALS[1])

    async def release_address(self, ip):
        await super().release_address(ip)
        try:
            await self._release(keys=self._keys(None, ip)[1:],
                                args=[self.manager.host_id])
        except Exception as exc:
            self._missed(self._keys(None, ip)[1:], exc)


class Failures:
    """A token bucket per key that only failures spend: ``wait(key)`` is
    0 while a try is allowed, else the seconds until one is."""

    def __init__(self, allowed: int, refill_per_second: float):
        self.allowed = float(allowed)
        self.rate = refill_per_second
        self._buckets = {}  # key -> (tokens, monotonic time)

    def _tokens(self, key, now):
        tokens, last = self._buckets.get(key, (self.allowed, now))
        return min(self.allowed, tokens + (now - last) * self.rate)

    def wait(self, key) -> float:
        tokens = self._tokens(key, time.monotonic())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def spend(self, key):
        now = time.monotonic()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1), now)
        if len(self._buckets) > 100_000:
            # Keys that refilled completely carry no information.
            for k in [k for k in self._buckets
                      if self._tokens(k, now) >= self.allowed]:
                del self._buckets[k]

    def give_back(self, key):
        """Return a try that ``spend`` took (never above ``allowed``)."""
        now = time.monotonic()
        tokens = min(self.allowed, self._tokens(key, now) + 1)
        if tokens >= self.allowed:
            self._buckets.pop(key, None)
        else:
            self._buckets[key] = (tokens, now)


class Throttle:
    """Tries that cost us real work (a password check, an Argon2 hash),
    counted in ``Failures`` buckets, one per kind of key: ``buckets`` is a
    list of (kind, Failures), e.g. a username's and a client address's.
    ``take(*keys)``, one key per kind in that order (None: not counted),
    spends a try from each key's bucket before the work, or raises
    RateLimited (spending nothing) while one of them is used up;
    ``give_back(*keys)`` returns the try when it should not count (a right
    password, an error of ours). ``name`` tells the throttles apart in
    Redis keys and logs.

    The try is spent before the work, not after it: the work takes tens of
    milliseconds, and a burst of concurrent tries would all pass a look at
    the bucket before the first of them had finished."""

    def __init__(self, name, buckets, message):
        self.name = name
        self.buckets = buckets
        self.message = message

    def counted(self, keys):
        """(kind, Failures, key) of every key that is counted."""
        return [(kind, failures, key)
                for (kind, failures), key in zip(self.buckets, keys)
                if key is not None and key != '']

    async def take(self, *keys):
        counted = self.counted(keys)
        # No await between the look and the spend: one step on the loop.
        wait = max([f.wait(key) for _, f, key in counted], default=0.0)
        if wait > 0:
            raise RateLimited(wait, self.message)
        for _, failures, key in counted:
            failures.spend(key)

    async def give_back(self, *keys):
        for _, failures, key in self.counted(keys):
            failures.give_back(key)


class LoginThrottle(Throttle):
    """Failed logins (and failed old-password checks of a password change)
    per username and per client address: ``take(username, ip)``. A wrong
    guess costs the guesser, and a user locked out by someone else's
    guesses waits minutes, not forever."""

    def __init__(self, per_username: int, per_ip: int, refill_per_minute):
        rate = refill_per_minute / 60.0
        self.usernames = Failures(per_username, rate)
        # The address allowance refills proportionally faster, so both
        # empty over the same time.
        self.ips = Failures(per_ip, rate * per_ip / max(per_username, 1))
        super().__init__('login', [('user', self.usernames),
                                   ('ip', self.ips)],
                         'too many failed logins, try later')


def registration_throttle(per_ip: int, refill_per_minute) -> Throttle:
    """Registrations per client address, ``take(ip)``: every one costs an
    Argon2 hash (64 MiB, tens of ms), so each counts, not only failures."""
    return Throttle('register',
                    [('ip', Failures(per_ip, refill_per_minute / 60.0))],
                    'too many registrations from this address, try later')


# The Failures buckets in Redis, all of one try in one step. KEYS: the
# buckets. ARGV[1]: 'take' (spend a try from every bucket, or from none and
# return the seconds to wait while one is below 1) or 'give' (return a
# try); then allowed and refill per second for each key in turn. Returns
# the seconds to wait as a string (Lua numbers become integers on the way
# out), '0' when the try was taken.
FAILURES_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local take = ARGV[1] == 'take'
local tokens, wait = {}, 0
for i, key in ipairs(KEYS) do
  local allowed, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', key, 'tokens', 'at')
  local n = tonumber(b[1]) or allowed
  local at = tonumber(b[2]) or now
  tokens[i] = math.min(allowed, n + (now - at) * rate)
  if take and tokens[i] < 1 then
    wait = math.max(wait, (1 - tokens[i]) / rate)
  end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local allowed, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local n = take and tokens[i] - 1 or math.min(allowed, tokens[i] + 1)
  if n >= allowed then
    redis.call('DEL', key)  -- a full bucket is the same as none
  else
    redis.call('HSET', key, 'tokens', tostring(n), 'at', tostring(now))
    redis.call('EXPIRE', key, math.ceil(allowed / rate) + 60)
  end
end
return '0'
"""


class SharedThrottle:
    """A ``Throttle`` (``local``) with its buckets in Redis, shared by
    every process: with N processes a guesser would otherwise get N times
    the tries. Keys are ``<prefix>:<name>:<kind>:<key>`` (the login
    throttle's are the ones used before it was generalised). If Redis is
    unreachable this process's own buckets decide."""

    def __init__(self, local: Throttle, manager, prefix):
        self.local = local
        self.prefix = prefix
        self.manager = manager
        self._script = manager.redis.register_script(FAILURES_SCRIPT)

    async def _run(self, op, counted) -> float:
        keys, args = [], [op]
        for kind, failures, key in counted:
            keys.append(f'{self.prefix}:{self.local.name}:{kind}:{key}')
            args += [failures.allowed, failures.rate]
        return float(await self._script(keys=keys, args=args))

    async def take(self, *keys):
        counted = self.local.counted(keys)
        if not counted:
            return
        if not self.manager.reachable:  # no waiting for a timeout
            return await self.local.take(*keys)
        try:
            wait = await self._run('take', counted)
        except Exception as exc:  # Redis down: the local buckets decide
            self.manager.trouble(f'shared {self.local.name} throttle', exc)
            return await self.local.take(*keys)
        if wait > 0:
            raise RateLimited(wait, self.local.message)
        # The local buckets follow too, for a Redis outage.
        for _, failures, key in counted:
            failures.spend(key)

    async def give_back(self, *keys):
        await self.local.give_back(*keys)
        counted = self.local.counted(keys)
        if not counted or not self.manager.reachable:
            return
        try:
            # If Redis was down at ``take`` this returns a try it never
            # took: harmless, a bucket never goes above its allowance.
            await self._run('give', counted)
        except Exception as exc:
            self.manager.trouble(f'shared {self.local.name} throttle', exc)


def _room_count(user_id):
    return Membership.select().where(Membership.user == user_id).count()


def check_room_quota(ctx, user_id):
    """Raises Forbidden when ``user_id`` is already in ``rooms_per_user_max``
    rooms. Called inside the write transaction that adds a room, so the
    count and the new room are one step."""
    limit = ctx.config.rooms_per_user_max
    if _room_count(user_id) >= limit:
        raise Forbidden(f'you are in {limit} rooms, the most allowed')


class Limits:
    """Every abuse limit of one process, built from the config."""

    def __init__(self, config):
        self.connections = Connections(config.max_connections_per_user,
                                       config.max_connections_per_ip)
        self.events = Limiter(config.event_rate_per_second,
                              config.event_burst)
        self.logins = LoginThrottle(config.login_failures_per_username,
                                    config.login_failures_per_ip,
                                    config.login_refill_per_minute)
        self.registrations = registration_throttle(
            config.registrations_per_ip,
            config.registration_refill_per_minute)
