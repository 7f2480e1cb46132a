"""The test kit: what tests and benchmarks share to run Postbox for real.

- ``processes``: a subprocess on a free port with a log and a readiness
  wait (``Process``), ``python -m server`` on it (``ServerProcess``),
  groups of servers (``start_servers``, ``running_servers``: all must
  exit cleanly), ``free_port``, ``rss_kib``.
- ``redis``: a redis-server (``RedisProcess``) and a proxy that makes
  subscribers deaf (``DeafeningProxy``); ``redis_cluster``: a Redis
  Cluster (``RedisCluster``); ``postgres``: a throwaway PostgreSQL cluster.
- ``clients``: HTTP calls, registration, uploads and a Socket.IO client
  that queues events (``Client``, ``connect``, ``pair``, ``dm_across``,
  ``refused``), ``all_events`` (``sync`` paged to its end) and
  ``closed_as_protocol_error`` (a raw websocket the server must close).
- ``wire``: the raw Socket.IO client of the benchmarks (``RawClient``,
  ``FastReceiver``: the protocol spoken directly, cheap per packet); not
  imported here (it needs orjson).

The common names are importable from ``tests.kit`` itself.
"""
from tests.kit.clients import (Client, all_events, closed_as_protocol_error,
                               connect, dm_across, http, pair, refused,
                               register, unique_name, upload)
from tests.kit.processes import (NO_RATE_LIMITS, ROOT, Process, ServerProcess,
                                 astop_servers, free_port, rss_kib,
                                 running_servers, start_servers,
                                 stop_servers)
from tests.kit.redis import FAST_REDIS_ENV, DeafeningProxy, RedisProcess

__all__ = ['Client', 'all_events', 'closed_as_protocol_error', 'connect',
           'dm_across', 'http', 'pair',
           'refused', 'register', 'unique_name', 'upload', 'NO_RATE_LIMITS',
           'ROOT', 'Process', 'ServerProcess', 'astop_servers', 'free_port',
           'rss_kib', 'running_servers', 'start_servers', 'stop_servers',
           'FAST_REDIS_ENV', 'DeafeningProxy', 'RedisProcess']
