"""The cluster's pub/sub listener, and the probe that proves it hears.

The listener subscribes to ``<channel>`` (broadcast) and this host's
channel ``<channel>:host:<id>`` (on a Redis Cluster by sharded pub/sub:
``clients.ShardedSubscription``), reconnects by itself with a capped
backoff, and after every (re)subscription has the cluster register
everything again. Every ``probe_interval`` the probe publishes to the
host's own channel and expects it back: a listener that stays connected
but hears nothing (python-socketio issue #1581) is counted (``deaf``),
dropped and re-created, and the cluster is not ready until a probe comes
back.
"""
import asyncio
import logging

from server import fastjson
from server.cluster.clients import ShardedSubscription
from server.tasks import cancelled

log = logging.getLogger(__name__)

# A process's probe to itself, proving its subscription hears.
PROBE = '__postbox_probe'


class Listener:
    """The listener of ``cluster`` (a ``Cluster``). ``listening`` is True
    while it is subscribed; counters for metrics: ``failures``
    (connections lost), ``deaf`` (re-created: own probe not back)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.listening = False
        self.failures = 0
        self.deaf = 0
        self.task = None  # the task consuming ``listen()``
        self._consume = None
        self._prober = None
        # Probes sent and not yet heard back (number -> loop time sent),
        # whether one came back since the listener last subscribed, and
        # why the listener was last found deaf (until a probe is heard).
        self._probes = {}
        self._probe_n = 0
        self._heard = False
        self._deaf_reason = None
        self._probe_wake = asyncio.Event()

    def start(self, consume):
        """Run ``consume`` (a coroutine function iterating ``listen()``)
        as the listener's task, and the probe."""
        self._consume = consume
        self.task = asyncio.create_task(consume())
        self._prober = asyncio.create_task(self._probe_loop())

    async def stop(self):
        # The probe first: it may replace the listener's task.
        for task in (self._prober, self.task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._prober = self.task = None

    def not_ready(self):
        """Why the listener cannot be relied on, or None."""
        if not self.listening:
            return self._deaf_reason or 'listener not subscribed to redis'
        overdue = self._probe_overdue()
        if overdue:
            return f'listener deaf: own probe not back after {overdue:.1f}s'
        if not self._heard:
            return self._deaf_reason or \
                'listener subscribed, own probe not back yet'
        return None

    async def listen(self):
        """Yield what arrives on the broadcast and host channels forever:
        the items of a batch (a JSON list) one by one, anything else as
        the raw message; reconnect with a capped backoff. Our own probes
        are taken out."""
        cluster = self.cluster
        channels = [cluster.channel, cluster.host_channel]
        delay = 0.1
        while not cancelled():  # not while True: see server/tasks.py
            if cluster.is_cluster:
                pubsub = ShardedSubscription(cluster.redis, channels,
                                             cluster.sub_options)
            else:
                pubsub = cluster.sub_redis.pubsub(
                    ignore_subscribe_messages=True)
            try:
                if cluster.is_cluster:
                    if self.failures:
                        # A shard may have moved (failover): read the slot
                        # map afresh before asking who owns our channels.
                        await cluster.redis.nodes_manager.initialize()
                    await pubsub.subscribe(cluster.socket_timeout)
                else:
                    await pubsub.subscribe(*channels)
                    if self.failures:
                        await self._drop_idle_connections()
                    await self._subscription_active()
                self._resubscribed(True)
                cluster.assume_reachable()  # it answered: register
                await cluster.register_all()
                self.listening = True
                self._probe_wake.set()  # prove it hears, now
                delay = 0.1
                cluster.recovered()
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
                self.failures += 1
                cluster.failed('redis listener lost (%s), reconnecting in '
                               '%.1fs', exc, delay)
            finally:
                self.listening = False
                self._resubscribed(False)
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, cluster.retry_max)

    async def _drop_idle_connections(self):
        """Close the command pool's idle connections after the listener
        lost Redis: they may be sockets to a Redis that restarted since,
        and each would fail the first command that takes it."""
        try:
            await self.cluster.redis.connection_pool.disconnect(
                inuse_connections=False)
        except Exception as exc:
            log.debug('closing idle redis connections: %s', exc)

    async def _subscription_active(self):
        """Return once Redis has processed our SUBSCRIBE (redis-py does not
        wait for it): from then on, nothing published to us is missed.
        Raises TimeoutError (the listener then reconnects) if that takes
        longer than a command may."""
        async with asyncio.timeout(self.cluster.socket_timeout):
            while True:
                found = await self.cluster.redis.pubsub_numsub(
                    self.cluster.host_channel)
                if found and found[0][1] >= 1:
                    return
                await asyncio.sleep(0.01)

    def _resubscribed(self, subscribed):
        """The listener (re)subscribed or lost its subscription: probes
        sent before are lost with the old subscription, and the cluster
        hears of it (``Cluster.subscription_changed``)."""
        self._probes.clear()
        self._heard = False
        self.cluster.subscription_changed(subscribed)

    # -- probing the listener ------------------------------------------

    async def _probe_loop(self):
        """Every ``probe_interval`` (and at once after each subscription)
        publish a probe to our own channel; if the oldest probe not heard
        back is older than ``probe_timeout``, the listener is deaf."""
        loop = asyncio.get_running_loop()
        while not cancelled():  # not while True: see server/tasks.py
            started = loop.time()
            try:
                async with asyncio.timeout(self.cluster.probe_interval):
                    await self._probe_wake.wait()
            except TimeoutError:
                pass
            self._probe_wake.clear()
            # A loop that could not run on time did not let the listener
            # run either: judge next round, not now.
            stalled = loop.time() - started - self.cluster.probe_interval > \
                self.cluster.probe_timeout / 2
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
        probe = fastjson.dumps([{'method': PROBE,
                                 'host': self.cluster.host_id, 'n': n}])
        try:
            async with asyncio.timeout(self.cluster.socket_timeout):
                # Not through the send queue: a backlog there is not
                # deafness.
                cluster = self.cluster
                if cluster.is_cluster:
                    await cluster.spublish([(cluster.host_channel, probe)])
                else:
                    await cluster.redis.publish(cluster.host_channel, probe)
            self.cluster.recovered()
            await self.cluster.register_if_skipped()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Redis trouble, not deafness: the listener is not to blame.
            self._probes.pop(n, None)
            self.cluster.failed('redis probe failed: %s', exc)

    def _probe_overdue(self) -> float:
        """The age of the oldest probe not heard back if that is more than
        ``probe_timeout``, else 0.0."""
        if not self._probes:
            return 0.0
        age = asyncio.get_running_loop().time() - min(self._probes.values())
        return age if age > self.cluster.probe_timeout else 0.0

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
        old = self.task
        old.cancel()
        try:
            async with asyncio.timeout(self.cluster.socket_timeout):
                await asyncio.gather(old, return_exceptions=True)
        except TimeoutError:
            log.warning('deaf redis listener did not stop in %.1fs',
                        self.cluster.socket_timeout)
        self.task = asyncio.create_task(self._consume())

    def _is_probe(self, item) -> bool:
        """Take our own probe out of what the listener hears."""
        if not isinstance(item, dict) or item.get('method') != PROBE:
            return False
        if item.get('host') == self.cluster.host_id:
            self._probe_heard(item.get('n'))
        return True
