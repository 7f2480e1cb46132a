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
- the pub/sub listener on ``<channel>`` (broadcast) and this host's
  channel ``<channel>:host:<id>``, reconnecting by itself with a capped
  backoff, and the probe: every ``probe_interval`` it publishes to its own
  channel and expects it back; a listener that stays connected but hears
  nothing (python-socketio issue #1581) is counted (``deaf``), dropped and
  re-created, and readiness fails until a probe comes back;
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

from server import fastjson
from server.cluster.clients import ShardedSubscription, client, \
    is_cluster_url

log = logging.getLogger(__name__)

# A process's probe to itself, proving its subscription hears.
PROBE = '__postbox_probe'


class RedisNotReady(Exception):
    """Raised by ``Cluster.ready`` with the reason."""


class Cluster:
    """This process's membership of the cluster; see the module docstring.

    Counters for metrics: ``listen_failures`` (listener connections lost),
    ``deaf`` (listeners re-created because their own probe did not come
    back). ``listening`` is True while the listener is subscribed."""

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
        self._sub_options = options
        self._sub_redis = None if self.is_cluster else \
            client(url, channel, max_connections=2, **options)
        # async callables run (in order, under ``register_lock``) after the
        # liveness key is set again; callables(subscribed) run when the
        # listener subscribes or loses its subscription.
        self.on_register = []
        self.on_subscription = []
        self.register_lock = asyncio.Lock()
        self.generation = 0  # bumped whenever the listener (re)subscribes
        self.subscribed = False  # or loses its subscription
        self.listening = False
        self.listen_failures = 0
        self.deaf = 0
        self.listener = None  # the task consuming ``listen()``
        self._consume = None
        self._tasks = []
        self._down_since = None
        self._unreachable_since = None  # a Redis command failed
        self._need_register = False  # something skipped Redis meanwhile
        self._last_log = 0.0
        # Probes sent and not yet heard back (number -> loop time sent),
        # whether one came back since the listener last subscribed, and
        # why the listener was last found deaf (until a probe is heard).
        self._probes = {}
        self._probe_n = 0
        self._heard = False
        self._deaf_reason = None
        self._probe_wake = asyncio.Event()

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
        self._consume = consume
        self.listener = asyncio.create_task(consume())
        self._tasks = [asyncio.create_task(self._heartbeat_loop()),
                       asyncio.create_task(self._probe_loop())]

    async def stop(self):
        """Stop the probe, the heartbeat and the listener."""
        # The probe first: it may replace the listener's task.
        for task in [*self._tasks[::-1], self.listener]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._tasks, self.listener = [], None

    async def close(self):
        """Withdraw this process (other processes stop counting it at
        once) and close the clients. Call ``stop()`` first."""
        try:
            async with asyncio.timeout(2):
                await self.redis.delete(self.alive_key)
        except Exception as exc:
            log.info('could not withdraw from redis: %s', exc)
        for redis in (self.redis, self._sub_redis):
            try:
                if redis is not None:
                    await redis.aclose()
            except Exception:
                pass

    async def ready(self) -> bool:
        """True if the listener is subscribed, hears its own probes and
        Redis answers; else raises RedisNotReady saying why."""
        if not self.listening:
            raise RedisNotReady(self._deaf_reason or
                                'listener not subscribed to redis')
        if not self.reachable:
            raise RedisNotReady(
                f'redis commands failing for '
                f'{time.monotonic() - self._unreachable_since:.1f}s '
                f'(local fallbacks in use)')
        overdue = self._probe_overdue()
        if overdue:
            raise RedisNotReady(f'listener deaf: own probe not back after '
                                f'{overdue:.1f}s')
        if not self._heard:
            raise RedisNotReady(self._deaf_reason or
                                'listener subscribed, own probe not back yet')
        try:
            async with asyncio.timeout(2):
                if self.is_cluster:
                    # The shard that holds every shared key (the ones
                    # holding our channels are proven by the probe).
                    await self.redis.exists(self.alive_key)
                else:
                    await self.redis.ping()
        except Exception as exc:
            raise RedisNotReady(f'redis does not answer: '
                                f'{exc or type(exc).__name__}') from None
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
        while True:
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
                    await self._register_if_skipped()
                self.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed('redis heartbeat failed: %s', exc)

    async def _register_if_skipped(self):
        """Redis answered: if anything skipped it meanwhile (and the
        listener is subscribed, else its own registration comes), register
        everything again."""
        if self._need_register and self.subscribed:
            self._unreachable_since = None  # let the hooks use Redis
            await self.register_all()

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

    # -- listening --------------------------------------------------------

    async def listen(self):
        """Yield what arrives on the broadcast and host channels forever:
        the items of a batch (a JSON list) one by one, anything else as
        the raw message; reconnect with a capped backoff. Our own probes
        are taken out."""
        delay = 0.1
        while True:
            if self.is_cluster:
                pubsub = ShardedSubscription(
                    self.redis, [self.channel, self.host_channel],
                    self._sub_options)
            else:
                pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self.is_cluster:
                    if self.listen_failures:
                        # A shard may have moved (failover): read the slot
                        # map afresh before asking who owns our channels.
                        await self.redis.nodes_manager.initialize()
                    await pubsub.subscribe(self.socket_timeout)
                else:
                    await pubsub.subscribe(self.channel, self.host_channel)
                    if self.listen_failures:
                        await self._drop_idle_connections()
                    await self._subscription_active()
                self._resubscribed(True)
                self._unreachable_since = None  # it answered: register
                await self.register_all()
                self.listening = True
                self._probe_wake.set()  # prove it hears, now
                delay = 0.1
                self.recovered()
                async for message in pubsub.listen():
                    if message.get('type') not in ('message', 'smessage'):
                        continue
                    data = message['data']
                    if data[:1] != b'[':
                        yield data
                        continue
                    for item in fastjson.loads(data):  # a batch
                        if not self._is_probe(item):
                            yield item
                raise ConnectionError('subscription ended')
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listen_failures += 1
                self.failed('redis listener lost (%s), reconnecting in '
                            '%.1fs', exc, delay)
            finally:
                self.listening = False
                self._resubscribed(False)
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _drop_idle_connections(self):
        """Close the command pool's idle connections after the listener
        lost Redis: they may be sockets to a Redis that restarted since,
        and each would fail the first command that takes it."""
        try:
            await self.redis.connection_pool.disconnect(
                inuse_connections=False)
        except Exception as exc:
            log.debug('closing idle redis connections: %s', exc)

    async def _subscription_active(self):
        """Return once Redis has processed our SUBSCRIBE (redis-py does not
        wait for it): from then on, nothing published to us is missed.
        Raises TimeoutError (the listener then reconnects) if that takes
        longer than a command may."""
        async with asyncio.timeout(self.socket_timeout):
            while True:
                found = await self.redis.pubsub_numsub(self.host_channel)
                if found and found[0][1] >= 1:
                    return
                await asyncio.sleep(0.01)

    def _resubscribed(self, subscribed):
        """The listener (re)subscribed or lost its subscription: what was
        learnt from notices may be stale (``on_subscription``), and probes
        sent before are lost with the old subscription."""
        self.subscribed = subscribed
        self.generation += 1
        self._probes.clear()
        self._heard = False
        for hook in self.on_subscription:
            hook(subscribed)

    # -- probing the listener ------------------------------------------

    async def _probe_loop(self):
        """Every ``probe_interval`` (and at once after each subscription)
        publish a probe to our own channel; if the oldest probe not heard
        back is older than ``probe_timeout``, the listener is deaf."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                async with asyncio.timeout(self.probe_interval):
                    await self._probe_wake.wait()
            except TimeoutError:
                pass
            self._probe_wake.clear()
            # A loop that could not run on time did not let the listener
            # run either: judge next round, not now.
            stalled = loop.time() - started - self.probe_interval > \
                self.probe_timeout / 2
            if not self.listening:
                continue
            overdue = self._probe_overdue()
            if overdue and not stalled:
                await self._deaf(overdue)
                continue
            await self._send_probe(loop)

    async def _send_probe(self, loop):
        self._probe_n += 1
        n = self._probe_n
        # Counted from before the publish: the probe may come back before
        # PUBLISH answers.
        self._probes[n] = loop.time()
        probe = fastjson.dumps([{'method': PROBE, 'host': self.host_id,
                                  'n': n}])
        try:
            async with asyncio.timeout(self.socket_timeout):
                # Not through the send queue: a backlog there is not
                # deafness.
                if self.is_cluster:
                    await self.spublish([(self.host_channel, probe)])
                else:
                    await self.redis.publish(self.host_channel, probe)
            self.recovered()
            await self._register_if_skipped()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Redis trouble, not deafness: the listener is not to blame.
            self._probes.pop(n, None)
            self.failed('redis probe failed: %s', exc)

    def _probe_overdue(self) -> float:
        """The age of the oldest probe not heard back if that is more than
        ``probe_timeout``, else 0.0."""
        if not self._probes:
            return 0.0
        age = asyncio.get_running_loop().time() - min(self._probes.values())
        return age if age > self.probe_timeout else 0.0

    def _probe_heard(self, n):
        """Our probe ``n`` came back: so did every earlier one."""
        if not isinstance(n, int):
            return
        for k in [k for k in self._probes if k <= n]:
            del self._probes[k]
        if self._deaf_reason:
            log.warning('redis listener hears again (own probe back)')
        self._heard = True
        self._deaf_reason = None

    async def _deaf(self, waited):
        """The listener is subscribed as far as it knows but did not hear
        its own probe: count it, drop it and subscribe afresh (which
        registers every room again)."""
        self.deaf += 1
        self._deaf_reason = (f'listener deaf: own probe not back after '
                             f'{waited:.1f}s; subscription re-created, '
                             f'waiting for a probe to come back')
        log.warning('redis listener deaf: own probe not back after %.1fs; '
                    'dropping and re-creating the subscription', waited)
        old = self.listener
        old.cancel()
        try:
            async with asyncio.timeout(self.socket_timeout):
                await asyncio.gather(old, return_exceptions=True)
        except TimeoutError:
            log.warning('deaf redis listener did not stop in %.1fs',
                        self.socket_timeout)
        self.listener = asyncio.create_task(self._consume())

    def _is_probe(self, item) -> bool:
        """Take our own probe out of what the listener hears."""
        if not isinstance(item, dict) or item.get('method') != PROBE:
            return False
        if item.get('host') == self.host_id:
            self._probe_heard(item.get('n'))
        return True
