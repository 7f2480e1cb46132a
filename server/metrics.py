"""Prometheus metrics of one process, served at ``GET /metrics``.

Each app gets its own ``CollectorRegistry`` (so several apps in one process,
as in tests, do not collide). Metric objects are thread-safe: the store's
writer thread reports its batches directly.
"""
from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry,
                               Counter, Gauge, Histogram, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.data.checkpoints import SAFETY_NET_PAGES

SECONDS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The metrics Postbox exports; one instance per app."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.sockets = Gauge('postbox_connected_sockets',
                             'Socket.IO connections open on this process',
                             registry=registry)
        self.connections = Counter(
            'postbox_connections', 'Socket.IO connection attempts by outcome',
            ['outcome'], registry=registry)
        self.events = Counter(
            'postbox_events', 'Socket.IO events by name and outcome '
            '(ok or the error code)', ['event', 'outcome'], registry=registry)
        self.event_seconds = Histogram(
            'postbox_event_seconds', 'Time from receiving an event to its ack',
            ['event'], buckets=SECONDS, registry=registry)
        self.batch_size = Histogram(
            'postbox_store_batch_size', 'Operations per write transaction',
            buckets=SIZES, registry=registry)
        self.batch_seconds = Histogram(
            'postbox_store_batch_seconds', 'Time to run and commit one write '
            'transaction', buckets=SECONDS, registry=registry)
        self.fanout = Histogram(
            'postbox_message_recipients', 'Users a new message is delivered '
            'to (delivery fan-out)', buckets=SIZES, registry=registry)
        self.rate_limited = Counter(
            'postbox_rate_limited', 'Requests refused by a rate or '
            'connection limit', ['limit'], registry=registry)
        self.recoveries = Counter(
            'postbox_recoveries', 'Connection state recoveries: attempted, '
            'succeeded, fallback (with its reason)', ['outcome', 'reason'],
            registry=registry)
        self.recovery_duplicates = Counter(
            'postbox_recovery_duplicates_dropped', 'Live events not sent to '
            'a recovered socket because its replay already had them',
            registry=registry)
        self.slow_clients = Counter(
            'postbox_slow_client_disconnects', 'Sockets cut off because '
            'their send queue was full (the client stopped reading)',
            registry=registry)
        self.reads_paused = Counter(
            'postbox_socket_reads_paused', 'Times a socket\'s reading '
            'waited: it sent frames faster than twice the event rate',
            registry=registry)
        self.http = Counter(
            'postbox_http_requests', 'HTTP requests by route and status',
            ['method', 'route', 'status'], registry=registry)
        # The outbox (bot webhooks, pushes), by row kind.
        self.outbox_sent = Counter(
            'postbox_outbox_sent', 'Outbox deliveries done (2xx, or no '
            'longer owed)', ['kind'], registry=registry)
        self.outbox_failed = Counter(
            'postbox_outbox_failed', 'Outbox delivery attempts that failed '
            '(retried later)', ['kind'], registry=registry)
        self.outbox_dead = Counter(
            'postbox_outbox_dead', 'Outbox deliveries given up after '
            'outbox_dead_seconds', ['kind'], registry=registry)
        self.outbox_latency = Histogram(
            'postbox_outbox_latency_seconds', 'Time from the event to its '
            'delivery', ['kind'],
            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=registry)
        self.outbox = None  # the Dispatcher, for the queued gauge
        registry.register(_OutboxCollector(self))
        self.manager = None
        registry.register(_ManagerCollector(self))
        self.store = None
        registry.register(_StoreCollector(self))

    def observe_batch(self, size, seconds):
        """The store's ``on_batch`` callback (runs on the writer thread)."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _OutboxCollector:
    """``postbox_outbox_queued``: deliveries waiting (all processes'),
    counted by the dispatcher after each round."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        outbox = self.metrics.outbox
        if outbox is None or outbox.queued is None:
            return
        gauge = GaugeMetricFamily('postbox_outbox_queued',
                                  'Outbox deliveries waiting to be sent')
        gauge.add_metric([], outbox.queued)
        yield gauge


class _ManagerCollector:
    """Redis publishes and publish/listen failures, read from the
    Socket.IO client manager when it counts them (``published``,
    ``publish_failures``, ``listen_failures``, ``deaf`` attributes): a single
    process has none to report."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        manager = self.metrics.manager
        for attr, help_text in (
                ('published', 'Messages handed to Redis for other '
                 'processes (emits whose recipients are all local are not)'),
                ('publish_failures', 'Failed publishes to Redis'),
                ('listen_failures', 'Lost or failed Redis subscriptions'),
                ('deaf', 'Redis listeners found deaf (own probe not back '
                 'in time) and re-created')):
            value = getattr(manager, attr, None)
            if isinstance(value, (int, float)):
                family = CounterMetricFamily('postbox_redis_' + attr,
                                             help_text)
                family.add_metric([], value)
                yield family


class _StoreCollector:
    """The store's health, read from its attributes at scrape time: the
    writer's breaker (``fault``), the writes waiting (``pending``) and its
    failure counters."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        store = self.metrics.store
        if store is None:
            return
        up = GaugeMetricFamily(
            'postbox_store_up', '1 while database writes go through, 0 '
            'while they are answered unavailable (database away or disk '
            'full; the writer probes it every 0.25 s)')
        up.add_metric([], 0 if store.fault else 1)
        yield up
        full = GaugeMetricFamily(
            'postbox_store_disk_full', '1 while writes fail because the '
            "database's disk is full")
        full.add_metric([], 1 if store.fault == 'disk_full' else 0)
        yield full
        waiting = GaugeMetricFamily(
            'postbox_store_write_queue', 'Writes queued or being committed '
            '(capped by write_queue_max)')
        waiting.add_metric([], store.pending)
        yield waiting
        for attr, name, label, help_text in (
                ('refused', 'postbox_store_writes_refused', 'reason',
                 'Writes answered unavailable: down (at once, the database '
                 'is away), queue_full (at once, write_queue_max reached), '
                 'failed (their transaction failed)'),
                ('write_errors', 'postbox_store_write_errors', 'kind',
                 'Failed write transactions (each attempt) by kind: '
                 'connection, disk_full, busy, error'),
                ('read_errors', 'postbox_store_read_errors', 'kind',
                 'Reads answered unavailable by kind: connection, '
                 'disk_full, busy, error')):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key, value in dict(getattr(store, attr)).items():
                family.add_metric([key], value)
            yield family
        checkpointer = store.checkpointer
        if checkpointer is not None:
            for attr, help_text in (
                    ('runs', 'Checkpoints by the checkpoint thread, off '
                     'the writers\' COMMIT, that copied the whole SQLite '
                     'write-ahead log (one that could not is tried again)'),
                    ('failures', 'Checkpoints that failed (full disk, ...); '
                     'the writers checkpoint themselves past '
                     f'{SAFETY_NET_PAGES} pages of log')):
                family = CounterMetricFamily(
                    f'postbox_wal_checkpoint_{attr}', help_text)
                family.add_metric([], getattr(checkpointer, attr))
                yield family
        process = store.process
        if process is not None:
            alive = GaugeMetricFamily(
                'postbox_writer_process_up', '1 when the writer process '
                '(which commits the sends) answered the last run of sends; '
                '0 before the first, and while the writer thread commits '
                'them itself')
            alive.add_metric([], 1 if process.up else 0)
            yield alive
            for attr, help_text in (
                    ('runs', 'Runs of sends the writer process answered'),
                    ('failures', 'Runs of sends the writer thread ran '
                     'itself: the writer process had failed, hung or was '
                     'not started yet again')):
                family = CounterMetricFamily(
                    f'postbox_writer_process_{attr}', help_text)
                family.add_metric([], getattr(process, attr))
                yield family


def instrument_fanout(realtime, metrics):
    """Count the recipients of each new message: wraps
    ``realtime.message`` so the send path itself stays unchanged."""
    deliver = realtime.message

    async def message(message, member_ids):
        metrics.fanout.observe(len(member_ids))
        await deliver(message, member_ids)

    realtime.message = message


METRICS = web.AppKey('metrics', Metrics)


async def metrics_view(request):
    """``GET /metrics``: Prometheus text format, no token (bind it to a
    private network or filter it at the proxy)."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={'Content-Type':
                                            CONTENT_TYPE_LATEST})


def route_name(request) -> str:
    """A low-cardinality label for a request: the route pattern, not the
    path (``/api/rooms/{room_id}/messages``)."""
    route = request.match_info.route
    resource = getattr(route, 'resource', None)
    if resource is None:
        return 'unmatched'
    return resource.canonical
