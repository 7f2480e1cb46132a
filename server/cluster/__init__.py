"""Postbox across processes: the cluster (host id, heartbeat, live hosts,
listener, re-registration) and what runs on it.

- ``cluster.py``: ``Cluster``, this process's membership, handed to every
  component that has a Redis form; ``listener.py`` its pub/sub listener
  and the probe that proves it hears;
- ``scripts.py``: every Lua script, with the one "is this host alive"
  helper they share;
- ``clients.py``: Redis clients for a URL (single, Sentinel, Cluster);
- ``fanout.py`` and ``holders.py``: messages to the processes that need
  them, for the Socket.IO manager
  (``server/upstream/socketio_pubsub_manager.py``).

The Redis forms of presence, connection counts and throttles live with
their local forms in ``server/services`` and take a ``Cluster``.

``build(config)`` gives the cluster (None without Redis) and
``fanout_manager(cluster, config)`` the Socket.IO client manager on it.
"""
from server.cluster.cluster import Cluster, RedisNotReady

__all__ = ['Cluster', 'RedisNotReady', 'build', 'fanout_manager']


def build(config):
    """The ``Cluster`` for ``config.redis_url``, or None without Redis.
    Builds clients only: nothing connects until ``start``."""
    if not config.redis_url:
        return None
    return Cluster(
        config.redis_url, config.redis_channel,
        max_connections=config.redis_max_connections,
        heartbeat=config.redis_heartbeat_seconds,
        socket_timeout=config.redis_timeout_seconds,
        retry_max=config.redis_retry_max_seconds,
        probe_interval=config.redis_probe_seconds,
        probe_timeout=config.redis_probe_timeout_seconds)


def fanout_manager(cluster, config):
    """The Socket.IO client manager that fans out through ``cluster``."""
    # Imported here: the manager imports the transport, which imports
    # the services that take a Cluster.
    from server.upstream.socketio_pubsub_manager import RedisManager
    return RedisManager(cluster, queue_max=config.redis_publish_queue_max)
