"""Redis clients for a URL: single server, Sentinel or Redis Cluster, and
the sharded subscription a cluster's listener uses.

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` and ``redis+sentinel://``
with the same syntax python-socketio accepts, and ``redis+cluster://`` (or
``rediss+cluster://``) for a Redis Cluster: ``host:port`` of one or more
nodes separated by commas, ``redis+cluster://[:password@]h1:p1,h2:p2``.
"""
import asyncio
from urllib.parse import urlparse

from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from socketio.redis_manager import parse_redis_sentinel_url


class ShardedSubscription:
    """SSUBSCRIBE to ``channels`` on a Redis Cluster: a plain connection to
    each primary that owns one of their slots (as the cluster client's
    slot map says), their messages merged into one ``listen()`` stream.
    That stream raises as soon as any connection fails or Redis takes a
    channel away (``sunsubscribe``: its slot moved, e.g. a failover); the
    caller then subscribes afresh with a new slot map."""

    def __init__(self, cluster, channels, options):
        self.cluster = cluster
        self.channels = channels
        self.options = options
        self._subs = []  # (client, pubsub)
        self._readers = []
        # Bounded, so a slow consumer slows the readers (as one socket
        # would) instead of piling up messages.
        self._queue = asyncio.Queue(1000)

    async def subscribe(self, timeout):
        """Subscribe everywhere; returns once every node confirmed (from
        then on nothing published to the channels is missed)."""
        await self.cluster.initialize()  # a no-op once it has a slot map
        by_node = {}
        for channel in self.channels:
            node = self.cluster.get_node_from_key(channel)
            by_node.setdefault((node.host, node.port), []).append(channel)
        async with asyncio.timeout(timeout):
            for (host, port), channels in by_node.items():
                # No retries of its own: a lost node is for the caller to
                # re-resolve, not to reconnect to for seconds.
                client = aioredis.Redis(host=host, port=port,
                                        retry=Retry(NoBackoff(), 0),
                                        **self.options)
                pubsub = client.pubsub()
                self._subs.append((client, pubsub))
                for channel in channels:  # one slot per SSUBSCRIBE
                    await pubsub.ssubscribe(channel)
                pending = set(channels)
                while pending:
                    message = await pubsub.get_message(timeout=timeout)
                    if message and message['type'] == 'ssubscribe':
                        channel = message['channel']
                        pending.discard(channel.decode()
                                        if isinstance(channel, bytes)
                                        else channel)
        self._readers = [asyncio.create_task(self._read(pubsub))
                         for _, pubsub in self._subs]

    async def _read(self, pubsub):
        try:
            async for message in pubsub.listen():
                kind = message['type']
                if kind == 'smessage':
                    await self._queue.put(message)
                elif kind == 'sunsubscribe':
                    raise ConnectionError(
                        f'shard channel {message["channel"]!r} moved')
            raise ConnectionError('subscription ended')
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._queue.put(exc)

    async def listen(self):
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self):
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for client, pubsub in self._subs:
            for closing in (pubsub, client):
                try:
                    await closing.aclose()
                except Exception:
                    pass


def is_cluster_url(url) -> bool:
    return urlparse(url).scheme in ('redis+cluster', 'rediss+cluster')


def _cluster_client(url, options):
    """A RedisCluster for ``redis+cluster://[user:password@]h1:p1,h2:p2``
    (``rediss+cluster://`` for TLS): the nodes it starts from."""
    parsed = urlparse(url)
    userinfo, _, hosts = parsed.netloc.rpartition('@')
    username, _, password = userinfo.partition(':')
    nodes = []
    for part in hosts.split(','):
        host, _, port = part.strip().rpartition(':')
        nodes.append(ClusterNode(host or part.strip(), int(port or 6379)))
    options.pop('max_connections', None)  # per node, unbounded: it raises
    # Postbox needs only the shards of the shared slot and of its
    # processes' channels: a shard down elsewhere must not stop it.
    return RedisCluster(startup_nodes=nodes, username=username or None,
                        password=password or None,
                        require_full_coverage=False,
                        ssl=parsed.scheme == 'rediss+cluster', **options)


def client(url, channel, **options):
    """A redis.asyncio client for ``url``; Sentinel URLs go through
    python-socketio's own parser so they mean the same thing."""
    if is_cluster_url(url):
        return _cluster_client(url, options)
    if urlparse(url).scheme in ('redis+sentinel', 'valkey+sentinel'):
        sentinels, service, kwargs = parse_redis_sentinel_url(url)
        options.pop('max_connections', None)
        sentinel = aioredis.sentinel.Sentinel(sentinels, **kwargs, **options)
        return sentinel.master_for(service or channel)
    # Waiting for a free connection is bounded like a command: a pool
    # that stays empty is trouble to report, not a queue to join.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, timeout=options.get('socket_timeout') or
        options['socket_connect_timeout'], **options)
    return aioredis.Redis(connection_pool=pool)
