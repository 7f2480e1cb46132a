"""The Postbox application.

``create_app(config) -> web.Application`` builds everything and runs
nothing; ``main()`` parses the command line, loads the config and serves.
The app is built by setup steps, each storing what it made under a typed
key (server/typedefs.py); resources with a life (the database threads,
Redis, background tasks) start and stop with the app (``cleanup_ctx``).
"""
import argparse
import asyncio
import functools
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from server import cluster, fastjson, logs
from server.config import ConfigError, ensure_secret, load_config
from server.logs import setup_logging
from server.metrics import METRICS, Metrics, instrument_fanout, metrics_view
from server.services import attachments, outbox, presence, push, rooms
from server.services import webhooks
from server.services import search as search_service
from server.services.context import Context
from server.services.limits import Limits
from server.services.live import Typing, presence_for
from server.services.serialize import load_users
from server.storage import LocalStorage, private_data
from server.data.database import in_memory
from server.store import Store, open_database
from server.writer_process import WriterProcess
from server.transport import attachments_http, http, http_base
from server.transport import socket as socket_transport
from server.transport.backpressure import bound_send_queues, pace_reads
from server.upstream.socketio_server import Server
from server.upstream.socketio_manager import LocalManager
from server.upstream.socketio_packet import JsonPacket
from server.transport.realtime import Realtime, user_room
from server.transport.recovery import Recovery
from server.typedefs import (CLUSTER, CONFIG, CTX, DISCONNECT_USER,
                             HEALTH_CHECKS, READY_CHECKS, REALTIME, SIO,
                             SOCKETS)

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / 'client_demo'

# After the drain has acked everything in flight, how long aiohttp lets
# connection handlers finish before cancelling them: nothing of value is
# left by then, so a client that stopped answering must not hold the exit.
SHUTDOWN_GRACE_SECONDS = 3.0
# How long a closing websocket waits for the client's close frame.
WS_CLOSE_SECONDS = 2.0
# How long shutdown waits for in-flight events to be committed and acked.
DRAIN_SECONDS = 20
# How long the /readyz database check waits for a trivial query: a
# database that does not answer in this long is not ready, and the probe
# itself must not hang.
CHECK_SECONDS = 2.0
# Cyclic garbage collector thresholds once serving. With Python's default
# (700, 10, 10) a server delivering 3,700 DMs/s ran a full collection every
# few seconds that walked the whole heap (modules, models, caches) for
# 40-60 ms, stalling every socket; the median p99 delivery latency of
# bench/run.py's open-loop run went from about 50 ms to about 30 ms without
# them. The heap built at startup is frozen out of collections, and young
# collections run less often.
GC_THRESHOLDS = (20_000, 50, 100)


def create_app(config) -> web.Application:
    """Build the aiohttp app with Socket.IO attached; runs nothing."""
    app = web.Application(
        middlewares=http_base.MIDDLEWARES,
        client_max_size=config.max_payload_bytes)
    app.on_response_prepare.append(http_base.security_headers)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    store = setup_database(app)
    manager = setup_cluster(app)
    setup_context(app, store, manager)
    setup_socketio(app, manager)
    setup_routes(app)
    setup_background(app)
    app.on_startup.append(_settle_gc)
    app.on_startup.append(_dump_tasks_on_usr2)
    app.on_shutdown.append(_drain)
    return app


def setup_database(app) -> Store:
    """The database and its writer and reader threads (started with the
    app). Readiness (/readyz): the database answers and writes fit on its
    disk. Liveness (/healthz): the writer thread and the reader pool run;
    a database outage is not a reason to restart the process."""
    config, metrics = app[CONFIG], app[METRICS]
    private_data(config)  # data dir 0700, database and files 0600
    url = config.effective_database_url
    database = open_database(url, config)
    store = Store(database, batch_max=config.write_batch_max,
                  reader_threads=config.reader_threads,
                  queue_max=config.write_queue_max,
                  on_batch=metrics.observe_batch,
                  gather_seconds=config.write_gather_ms / 1000,
                  process=(WriterProcess(url, config)
                           if config.writer_process and
                           not in_memory(database)
                           else None))
    metrics.store = store
    app[READY_CHECKS] = [
        ('database', lambda: store.database_ready(CHECK_SECONDS)),
        ('disk', store.disk_ready),
    ]
    app[HEALTH_CHECKS] = [
        ('writer', store.writer_alive),
        ('readers', store.readers_alive),
    ]

    async def database_life(app):
        store.start()
        yield
        await app[CTX].presence.close()
        await store.close()

    app.cleanup_ctx.append(database_life)
    return store


def setup_cluster(app):
    """With Redis: the Socket.IO manager that fans out across processes,
    started with the app (after the database, stopped before it); else
    None (one process)."""
    config = app[CONFIG]
    if not config.redis_url:
        return None
    manager = cluster.fanout_manager(cluster.build(config), config)
    app[CLUSTER] = manager
    app[READY_CHECKS].append(('redis', manager.ready))

    checks = set()

    async def missed_while_away():
        # Registered again: Redis was away (or this process just started),
        # and other processes' revocations and group changes may have been
        # lost on the way. Checked against the database, apart.
        task = asyncio.create_task(socket_transport.after_redis_returned(
            app[SIO], app[CTX], app[SOCKETS]))
        checks.add(task)
        task.add_done_callback(checks.discard)

    manager.cluster.on_register.append(missed_while_away)

    async def cluster_life(app):
        await manager.start()
        presence_ = app[CTX].presence
        presence_.start()
        yield
        await presence_.close()  # before Redis goes: its timers use it
        for task in list(checks):
            task.cancel()
        await manager.close()

    app.cleanup_ctx.append(cluster_life)
    return manager


def setup_context(app, store, manager) -> Context:
    """The services' shared state, built once (server/services/context.py)."""
    config = app[CONFIG]
    # With a cluster, connections per user and per address, failed logins
    # and registrations per address and presence count across processes.
    shared = manager.cluster if manager is not None else None
    limits = Limits(config, shared)
    presence_ = presence_for(shared, store, config.presence_grace_seconds,
                             functools.partial(_presence_changed, app))
    app[CTX] = ctx = Context(
        store, config, ensure_secret(config), metrics=app[METRICS],
        limits=limits, presence=presence_,
        typing=Typing(config.typing_throttle_seconds),
        storage=LocalStorage(config.attachments_path),
        vapid_public_key=push.public_key(push.load_vapid(config)))
    return ctx


async def _presence_changed(app, user_id, online, last_seen):
    """Tell the user's watchers they came or went. With Redis the user may
    have been seen only by another process."""
    ctx = app[CTX]
    users = await ctx.store.read(load_users, ctx, [user_id])
    user = users.get(user_id)
    if user is None:
        return
    watchers = await presence.watchers(ctx, user_id)
    await app[REALTIME].presence(user, online, last_seen, watchers)


def setup_socketio(app, manager):
    """The Socket.IO server on /socket.io/, its handlers and delivery."""
    config, ctx, metrics = app[CONFIG], app[CTX], app[METRICS]
    # Per-message deflate off unless configured: for chat-sized frames it
    # costs more CPU than it saves. A short close timeout: a client that
    # has gone silent must not hold up a clean shutdown.
    sio = Server(
        async_mode='aiohttp', json=fastjson, serializer=JsonPacket,
        client_manager=manager or LocalManager(),
        cors_allowed_origins=list(config.cors_allowed_origins) or None,
        max_http_buffer_size=config.max_payload_bytes,
        ping_interval=config.ping_interval, ping_timeout=config.ping_timeout,
        websocket_compress=config.websocket_compression,
        websocket_close_timeout=WS_CLOSE_SECONDS,
        connect_timeout=config.connect_timeout_seconds,
        json_max_depth=config.json_max_depth,
        trusted_proxies=config.trusted_proxies,
        logger=False, engineio_logger=False)
    sio.attach(app)
    bound_send_queues(sio, config.socket_send_queue_max,
                      config.socket_send_stall_seconds,
                      on_cut=lambda sid: metrics.slow_clients.inc())
    pace_reads(sio, config.event_rate_per_second, config.event_burst,
               on_pause=metrics.reads_paused.inc)
    metrics.manager = sio.manager
    realtime = Realtime(sio)
    # With Redis, dropped sockets' recovery sessions are kept there (any
    # process recovers them); else in this process and, across a SIGTERM
    # restart, in data_dir.
    sio.recovery = Recovery(sio, ctx, metrics, config.recovery_window_seconds,
                            config.recovery_max_events)
    sio.recovery.shared = manager.cluster if manager is not None else None
    instrument_fanout(realtime, metrics)
    # A group's members changed: every process forgets the cached room.
    realtime.forget_room = functools.partial(rooms.forget_room, ctx)
    if manager is not None:
        manager.on_notice = realtime.on_notice
    else:
        app.on_startup.append(_load_recovery)
    # Engine.IO sessions not (yet) connected to Socket.IO hold a place of
    # their address's connection limit too.
    sio.count_sessions(ctx.limits.connections)
    app[SIO] = sio
    app[REALTIME] = realtime
    app[SOCKETS] = socket_transport.register(sio, ctx, realtime)
    app[DISCONNECT_USER] = functools.partial(_disconnect_user, app)


async def _load_recovery(app):
    app[SIO].recovery.load(app[CONFIG].data_dir)


async def _disconnect_user(app, user_id):
    """Close every socket of the user (revoked tokens): with Redis on every
    process, else this process's."""
    if CLUSTER in app:
        await app[CLUSTER].disconnect_room(user_room(user_id))
        return
    sio = app[SIO]
    for sid in list(app[SOCKETS].by_user.get(user_id, ())):
        await sio.disconnect(sid)


def setup_routes(app):
    http.add_routes(app)
    attachments_http.add_routes(app)
    app.router.add_get('/metrics', metrics_view)
    index = DEMO_DIR / 'index.html'

    async def demo(request):
        return web.FileResponse(index, headers={'Cache-Control': 'no-cache'})

    app.router.add_get('/', demo)
    static = DEMO_DIR / 'static'
    if static.is_dir():
        app.router.add_static('/static/', static)


def setup_background(app):
    """Tasks that run while the app serves: expired uploads are removed;
    messages stored before the upgrade that added search are indexed, a
    batch per write transaction, and SQLite's trigram file is kept; bot
    webhooks and pushes are delivered; sockets whose token expired are
    closed."""
    app.cleanup_ctx.append(_task_while_serving(attachments.cleanup_forever))
    app.cleanup_ctx.append(_task_while_serving(search_service.maintain))
    app.cleanup_ctx.append(_outbox_life)
    app.cleanup_ctx.append(_task_while_serving(
        lambda ctx: socket_transport.disconnect_expired(app[SIO], ctx,
                                                        app[SOCKETS])))


def _task_while_serving(run):
    """A ``cleanup_ctx`` step running ``await run(ctx)`` as a task from
    startup to cleanup."""
    async def task_life(app):
        task = asyncio.create_task(run(app[CTX]))
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return task_life


async def _outbox_life(app):
    """Bot webhooks and pushes: rows written with each send, delivered in
    the background (server/services/outbox.py)."""
    ctx, config = app[CTX], app[CONFIG]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.outbox_timeout_seconds),
        connector=aiohttp.TCPConnector(
            limit=config.outbox_concurrency,
            resolver=None if config.webhook_allow_private
            else webhooks.PublicResolver()))
    dispatcher = outbox.Dispatcher(ctx, {
        'webhook': webhooks.WebhookSender(ctx, session),
        'push': push.PushSender(ctx, session)}, ctx.metrics)
    ctx.metrics.outbox = dispatcher
    loop = asyncio.get_running_loop()
    ctx.outbox_wake.hook = lambda: loop.call_soon_threadsafe(dispatcher.wake)
    dispatcher.start()
    yield
    ctx.outbox_wake.hook = None
    await dispatcher.close()
    await session.close()


async def _settle_gc(app):
    """Runs after the store and background tasks have started: what
    exists now lives as long as the process, so the collector stops
    walking it (``gc.freeze``), and collects less often from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _dump_tasks_on_usr2(app):
    """SIGUSR2 writes every asyncio task's stack to the log."""
    logs.dump_tasks_on(signal.SIGUSR2)


async def _drain(app):
    """SIGTERM: refuse new events, let the ones in flight commit and ack,
    then close every socket."""
    sockets = app[SOCKETS]
    sockets.draining = True
    ctx = app[CTX]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_SECONDS
    while (sockets.in_flight or ctx.store.pending) and \
            loop.time() < deadline:
        await asyncio.sleep(0.02)
    sio = app[SIO]
    for sid in list(sockets.users):
        try:
            await sio.disconnect(sid)
        except Exception:  # the socket may be closing already
            log.debug('disconnect %s failed', sid, exc_info=True)
    log.info('drained: %s events in flight left', sockets.in_flight)
    config = app[CONFIG]
    if not config.redis_url:
        try:
            sio.recovery.save(config.data_dir)
        except OSError as exc:
            log.warning('recovery sessions not saved: %s', exc)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='postbox', description='Postbox real-time DM server')
    parser.add_argument('--config', help='YAML config file (see config.yaml)')
    parser.add_argument('--host', help='listen address (POSTBOX_HOST)')
    parser.add_argument('--port', type=int, help='port (POSTBOX_PORT)')
    parser.add_argument('--workers', type=int,
                        help='processes sharing the port (POSTBOX_WORKERS); '
                             'more than 1 needs POSTBOX_REDIS_URL')
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (('host', args.host), ('port', args.port),
                                   ('workers', args.workers))
                 if v is not None}
    try:
        config = load_config(args.config, **overrides)
    except (ConfigError, OSError) as exc:
        parser.error(str(exc))
    if config.workers < 1:
        parser.error('--workers must be at least 1')
    if config.workers > 1 and not config.redis_url:
        parser.error('--workers above 1 needs Redis (POSTBOX_REDIS_URL): '
                     'without it a message reaches only the sockets of the '
                     'process that stored it')
    setup_logging(config)
    if config.workers > 1:
        from server.workers import run_workers
        return run_workers(config, config.workers, serve)
    return serve(config)


def serve(config, reuse_port=False) -> int:
    """Build the app and serve it until SIGTERM; returns the exit code.
    ``reuse_port`` lets several processes listen on one port."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    # Until the loop's task dump is installed (startup), SIGUSR2 is
    # ignored rather than fatal (its default).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    app = create_app(config)
    log.info('postbox serving on http://%s:%s (pid %s)', config.host,
             config.port, os.getpid())
    web.run_app(app, host=config.host, port=config.port, print=None,
                shutdown_timeout=SHUTDOWN_GRACE_SECONDS, access_log=None,
                reuse_port=reuse_port or None)
    return 0


if __name__ == '__main__':
    sys.exit(main())
