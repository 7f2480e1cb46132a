"""The Redis forms of connection counting and throttling, shared by every
process of a ``server.cluster.Cluster``: with N processes behind one port
each limit would otherwise allow N times its value.

Both keep this process's own counts too; while Redis is unreachable they
alone decide (at once while the cluster knows it to be unreachable: a
hung Redis must not hold up every connect or login), and the cluster's
re-registration puts this process's connection counts back exactly once
Redis answers (restarted empty, or having missed changes).
"""
from server.cluster.scripts import COUNT_ACQUIRE_SCRIPT, \
    COUNT_REGISTER_SCRIPT, COUNT_RELEASE_SCRIPT, THROTTLE_SCRIPT
from server.errors import RateLimited
from server.services.limits import ADDRESS, REFUSALS, USER, Connections, \
    Throttle, TooManyConnections


class RedisConnections(Connections):
    """Connections per user and per address, counted in Redis hashes
    ``<prefix>:conns:<user>`` and ``<prefix>:conns:ip:<ip>`` ({process id:
    sockets}); both are checked and counted in one script call, so a
    refused connection counts nothing anywhere. The counts of a process
    that died are dropped by the next acquire."""

    def __init__(self, per_user, per_ip, cluster):
        super().__init__(per_user, per_ip)
        self.cluster = cluster
        self._acquire_script = cluster.script(COUNT_ACQUIRE_SCRIPT)
        self._release_script = cluster.script(COUNT_RELEASE_SCRIPT)
        self._register = cluster.script(COUNT_REGISTER_SCRIPT)
        self._released_away = set()  # keys whose release missed Redis
        cluster.on_register.append(self._register_all)

    def _redis_key(self, kind, key):
        # The user's key is the one used before addresses were shared, so
        # processes of both versions count a user in the same place.
        return self.cluster.key(f'conns:{key}' if kind == USER
                                else f'conns:ip:{key}')

    def _shared(self, keys):
        """The (kind, key) pairs counted in Redis: an unknown address
        (None) is counted here only."""
        return [(kind, key) for kind, key in keys
                if not (kind == ADDRESS and key is None)]

    async def _acquire(self, keys):
        self._count(keys)
        if not self.cluster.reachable:
            return self.cluster.skipped()  # the local count stands
        shared = self._shared(keys)
        try:
            refused = await self._acquire_script(
                keys=[self._redis_key(*k) for k in shared],
                args=[self.cluster.host_id, self.cluster.alive_prefix,
                      *(self.limits[kind] for kind, _ in shared)])
        except Exception as exc:  # Redis down: the local count stands
            return self._missed([], exc)
        if refused:
            self._uncount(keys)
            raise TooManyConnections(REFUSALS[shared[refused - 1][0]])

    async def _release(self, keys):
        self._uncount(keys)
        redis_keys = [self._redis_key(*k) for k in self._shared(keys)]
        if not self.cluster.reachable:
            # Not waited for: every Socket.IO connect gives back its
            # session's address place, and while Redis hung each waited
            # out the Redis timeout here. The re-registration once Redis
            # answers takes the count back (a count left behind would
            # refuse the user for a day).
            self._released_away.update(redis_keys)
            self.cluster.skipped()
            return
        try:
            await self._release_script(keys=redis_keys,
                                       args=[self.cluster.host_id])
        except Exception as exc:
            self._missed(redis_keys, exc)

    def _missed(self, redis_keys, exc):
        """A count change that did not reach Redis: put right at the next
        re-registration."""
        self._released_away.update(redis_keys)
        self.cluster.skipped()
        self.cluster.trouble('shared connection count', exc)

    async def _register_all(self):
        """Set this process's count in every hash it holds sockets in to
        what it holds, and drop it from those it released while Redis was
        away (a cluster ``on_register`` hook)."""
        held = {self._redis_key(*k): n
                for k, n in self._counts.items() if self._shared([k])}
        gone = self._released_away - held.keys()
        self._released_away = set()
        try:
            await self._register(keys=[*held, *gone],
                                 args=[self.cluster.host_id, len(held),
                                       *held.values()])
        except BaseException:
            self._released_away |= gone
            raise


class RedisThrottle:
    """A ``Throttle`` (``local``) with its buckets in Redis, shared by
    every process: with N processes a guesser would otherwise get N times
    the tries. Keys are ``<prefix>:<name>:<kind>:<key>``. If Redis is
    unreachable this process's own buckets decide; they follow every try
    taken in Redis, for that case."""

    def __init__(self, local: Throttle, cluster):
        self.local = local
        self.cluster = cluster
        self._script = cluster.script(THROTTLE_SCRIPT)

    async def _run(self, op, counted) -> float:
        keys, args = [], [op]
        for kind, buckets, key in counted:
            keys.append(self.cluster.key(f'{self.local.name}:{kind}:{key}'))
            args += [buckets.size, buckets.rate]
        return float(await self._script(keys=keys, args=args))

    def _trouble(self, exc):
        self.cluster.trouble(f'shared {self.local.name} throttle', exc)

    async def take(self, *keys):
        counted = self.local.counted(keys)
        if not counted:
            return
        if not self.cluster.reachable:  # no waiting for a timeout
            return await self.local.take(*keys)
        try:
            wait = await self._run('take', counted)
        except Exception as exc:  # Redis down: the local buckets decide
            self._trouble(exc)
            return await self.local.take(*keys)
        if wait > 0:
            raise RateLimited(wait, self.local.message)
        self.local.spend(counted)

    async def give_back(self, *keys):
        await self.local.give_back(*keys)
        counted = self.local.counted(keys)
        if not counted or not self.cluster.reachable:
            return
        try:
            # If Redis was down at ``take`` this returns a try it never
            # took: harmless, a bucket never goes above its allowance.
            await self._run('give', counted)
        except Exception as exc:
            self._trouble(exc)
