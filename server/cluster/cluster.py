"""The cluster: this process among the others sharing one Redis.

One ``Cluster`` per process, built by ``server.cluster.build(config)`` and
handed to everything with a Redis form (fan-out, presence, connection
counts, throttles, recovery). It holds:

- the Redis client (single server, Sentinel or Cluster: ``clients.py``)
  and the key prefix every shared key starts with (on a Redis Cluster the
  hash tag ``{<channel>}``: one slot, so every script's keys are valid);
- the host id, and the liveness key ``<prefix>:alive:<id>`` a heartbeat
  keeps alive; a crashed process's key expires, and every script skips
  processes without one (``scripts.ALIVE``);
- the pub/sub listener on the broadcast and this host's channel, and the
  probe that proves it hears (``listener.py``);
- re-registration: whenever the listener (re)subscribes, the liveness key
  is found gone (Redis restarted empty), or something skipped Redis while
  it was unreachable, the ``on_register`` hooks put back what each user
  of the cluster holds;
- reachability: from a failed command until one succeeds, ``reachable``
  is False, so callers with a local fallback use it at once instead of
  each waiting for a timeout (and call ``skipped()``), and the warnings
  are rate limited.

On a Redis Cluster messages travel by sharded pub/sub (SSUBSCRIBE on the
primary that owns each channel's slot, ``clients.ShardedSubscription``),
and a script cannot publish to another slot's channel: the callers
SPUBLISH what their scripts return (``spublish``).
"""
import asyncio
import logging
import time
import uuid

from server.cluster.clients import client, is_cluster_url
from server.cluster.listener import Listener
from server.errors import Unavailable
from server.tasks import cancelled

log = logging.getLogger(__name__)


class RedisNotReady(Unavailable):
    """Raised by ``Cluster.ready`` with the reason, in Postbox's own words
    (``/readyz`` shows it without a token)."""


class Cluster:
    """This process's membership of the cluster; see the module docstring.

    Counters for metrics: ``listen_failures`` (listener connections lost),
    ``deaf`` (listeners re-created because their own probe did not come
    back). ``listening`` is True while the listener is subscribed."""

    listening = property(lambda self: self.listener.listening)
    listen_failures = property(lambda self: self.listener.failures)
    deaf = property(lambda self: self.listener.deaf)

    def __init__(self, url, channel='postbox', *, max_connections=4,
                 heartbeat=5.0, socket_timeout=5.0, retry_max=2.0,
                 probe_interval=1.0, probe_timeout=3.0):
        self.url = url
        self.channel = channel
        self.heartbeat = heartbeat
        self.socket_timeout = socket_timeout
        self.retry_max = retry_max
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.host_id = uuid.uuid4().hex
        self.is_cluster = is_cluster_url(url)
        self.key_prefix = f'{{{channel}}}' if self.is_cluster else channel
        self.host_channel_prefix = f'{channel}:host:'
        self.host_channel = self.host_channel_prefix + self.host_id
        self.alive_prefix = self.key('alive:')
        self.alive_key = self.alive_prefix + self.host_id
        options = dict(socket_connect_timeout=socket_timeout,
                       socket_keepalive=True)
        # Commands share a small bounded pool: the fan-out's sender needs
        # one connection, the rest is for the occasional change. The
        # listener gets its own client without a read timeout, since a
        # quiet channel is not an error (on a Redis Cluster it opens
        # plain connections to the nodes that own its channels).
        self.redis = client(url, channel, max_connections=max_connections,
                            socket_timeout=socket_timeout, **options)
        self.sub_options = options
        self.sub_redis = None if self.is_cluster else \
            client(url, channel, max_connections=2, **options)
        # async callables run (in order, under ``register_lock``) after the
        # liveness key is set again; callables(subscribed) run when the
        # listener subscribes or loses its subscription.
        self.on_register = []
        self.on_subscription = []
        self.register_lock = asyncio.Lock()
        self.generation = 0  # bumped whenever the listener (re)subscribes
        self.subscribed = False  # or loses its subscription
        self.listener = Listener(self)
        self._heartbeat = None
        self._down_since = None
        self._unreachable_since = None  # a Redis command failed
        self._need_register = False  # something skipped Redis meanwhile
        self._last_log = 0.0

    def key(self, name) -> str:
        """A shared key (or key prefix) ``<prefix>:<name>``."""
        return f'{self.key_prefix}:{name}'

    def script(self, source):
        """A redis-py Script for the Lua ``source`` (``scripts.py``)."""
        return self.redis.register_script(source)

    # -- life cycle ----------------------------------------------------

    async def start(self, consume):
        """Start the heartbeat, the probe and the listener: ``consume`` is
        the coroutine function that iterates ``listen()`` (a deaf listener
        is cancelled and ``consume`` started again)."""
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        self.listener.start(consume)

    async def stop(self):
        """Stop the heartbeat, the probe and the listener."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        await self.listener.stop()

    async def close(self):
        """Withdraw this process (other processes stop counting it at
        once) and close the clients. Call ``stop()`` first."""
        try:
            async with asyncio.timeout(2):
                await self.redis.delete(self.alive_key)
        except Exception as exc:
            log.info('could not withdraw from redis: %s', exc)
        for redis in (self.redis, self.sub_redis):
            try:
                if redis is not None:
                    await redis.aclose()
            except Exception:
                pass

    async def ready(self) -> bool:
        """True if the listener is subscribed, hears its own probes and
        Redis answers; else raises RedisNotReady saying why."""
        if not self.listening:
            raise RedisNotReady(self.listener.not_ready())
        if not self.reachable:
            raise RedisNotReady(
                f'redis commands failing for '
                f'{time.monotonic() - self._unreachable_since:.1f}s '
                f'(local fallbacks in use)')
        reason = self.listener.not_ready()
        if reason:
            raise RedisNotReady(reason)
        try:
            async with asyncio.timeout(2):
                if self.is_cluster:
                    # The shard that holds every shared key (the ones
                    # holding our channels are proven by the probe).
                    await self.redis.exists(self.alive_key)
                else:
                    await self.redis.ping()
        except Exception as exc:
            # Redis's own words (its address) go to the log only.
            log.debug('redis readiness ping failed: %s', exc)
            raise RedisNotReady(f'redis does not answer: '
                                f'{type(exc).__name__}') from None
        return True

    # -- reachability ---------------------------------------------------

    @property
    def reachable(self) -> bool:
        """False from a failed Redis command until one succeeds again.
        Callers with a local fallback (presence, connection counts, login
        throttle) then use it at once instead of each waiting up to a
        timeout for a Redis that hangs; they call ``skipped()`` when
        Redis must learn something later."""
        return self._unreachable_since is None

    def skipped(self):
        """Something was kept from Redis while it was unreachable:
        register everything again (host, hooks) once it answers."""
        self._need_register = True

    def trouble(self, what, exc):
        """A Redis call of a caller with a local fallback failed: mark
        Redis unreachable and log it (rate limited)."""
        self.failed('%s: redis unavailable (%s)', what, exc)

    def assume_reachable(self):
        """Redis answered outside a command (the listener subscribed):
        let the callers with a fallback use it again."""
        self._unreachable_since = None

    def warn(self, msg, *args):
        """Log trouble: one warning when it starts, then at most one
        every 10 s, so an outage does not flood the log at the message
        rate."""
        args = tuple(str(a) or type(a).__name__
                     if isinstance(a, BaseException) else a for a in args)
        now = time.monotonic()
        if self._down_since is None or now - self._last_log >= 10:
            log.warning(msg, *args)
            self._last_log = now
        if self._down_since is None:
            self._down_since = now

    def failed(self, msg, *args):
        """A Redis command failed: report it, and treat Redis as
        unreachable until one succeeds."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
        self.warn(msg, *args)

    def recovered(self):
        """A Redis command succeeded."""
        self._unreachable_since = None
        if self._down_since is not None:
            log.warning('redis is back after %.1fs',
                        time.monotonic() - self._down_since)
            self._down_since = None

    # -- registration ---------------------------------------------------

    @property
    def _ttl(self):
        return max(1, int(self.heartbeat * 3))

    async def register_all(self):
        """Announce this process alive and run every ``on_register`` hook
        (each puts back what it holds)."""
        async with self.register_lock:
            self._need_register = False  # a skip from now on sets it again
            try:
                await self.redis.set(self.alive_key, 1, ex=self._ttl)
                for hook in self.on_register:
                    await hook()
            except BaseException:
                self._need_register = True
                raise

    async def _heartbeat_loop(self):
        while not cancelled():  # not while True: see server/tasks.py
            await asyncio.sleep(self.heartbeat)
            try:
                # NX: the key is missing only if Redis lost it (restart,
                # or we were away past the TTL): then register everything.
                if await self.redis.set(self.alive_key, 1, ex=self._ttl,
                                        nx=True):
                    log.info('redis lost our registration: registering again')
                    await self.register_all()
                else:
                    await self.redis.expire(self.alive_key, self._ttl)
                    await self.register_if_skipped()
                self.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed('redis heartbeat failed: %s', exc)

    async def register_if_skipped(self):
        """Redis answered: if anything skipped it meanwhile (and the
        listener is subscribed, else its own registration comes), register
        everything again."""
        if self._need_register and self.subscribed:
            self._unreachable_since = None  # let the hooks use Redis
            await self.register_all()

    def subscription_changed(self, subscribed):
        """The listener (re)subscribed or lost its subscription: what was
        learnt from notices may be stale (``on_subscription`` hooks)."""
        self.subscribed = subscribed
        self.generation += 1
        for hook in self.on_subscription:
            hook(subscribed)

    # -- publishing -------------------------------------------------------

    async def spublish(self, sends):
        """SPUBLISH each (channel, payload) of ``sends`` (a Redis
        Cluster's sharded pub/sub; redis-py sends each to its primary)."""
        if not sends:
            return
        if len(sends) == 1:
            await self.redis.execute_command('SPUBLISH', *sends[0])
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, payload in sends:
                pipe.execute_command('SPUBLISH', channel, payload)
            await pipe.execute()

    def listen(self):
        """What the listener hears (``Listener.listen``)."""
        return self.listener.listen()
