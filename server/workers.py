"""``postbox --workers N``: N server processes sharing one port.

The parent prepares what must happen once (schema migration, the generated
secret), then forks N children before any event loop or thread exists. Each
child builds its own app and listens with SO_REUSEPORT, so the kernel
spreads new connections over them. Websocket clients need nothing more;
long-polling clients need every request of a session on the same process,
which SO_REUSEPORT does not promise: put a sticky load balancer in front
for them (see deploy/README.md). The processes talk through Redis, which is
why more than one worker requires ``redis_url``.

The parent forwards SIGTERM and SIGINT to the children, waits for them and
exits 0 only if every child did. If a child dies on its own, the others are
stopped too and the parent exits non-zero, leaving restarts to the service
manager (systemd, Kubernetes), which knows the policy.
"""
import logging
import os
import signal

import models
from models.migrations import migrate
from server.config import ensure_secret
from server.store import open_database

log = logging.getLogger(__name__)


def prepare(config):
    """Run once in the parent: migrate the schema and make sure the secret
    exists, so N children starting together do not race on either."""
    ensure_secret(config)
    database = open_database(config.effective_database_url, config)
    models.db.initialize(database)
    database.connect()
    try:
        migrate(database)
    finally:
        database.close()


def run_workers(config, count: int, serve) -> int:
    """Fork ``count`` children running ``serve(config, reuse_port=True)``;
    return the exit code for the parent."""
    prepare(config)
    children = {}
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = serve(config, reuse_port=True) or 0
            except BaseException:
                log.exception('worker %s failed', index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
    log.info('postbox: %s workers on http://%s:%s', count, config.host,
             config.port)

    stopping = False

    def tell_children(signum):
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        tell_children(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # Each worker logs its asyncio tasks (server/logs.py).
    signal.signal(signal.SIGUSR2, lambda signum, frame: tell_children(signum))
    failed = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed = True
            log.error('worker %s (pid %s) exited with %s', index, pid, code)
        if not stopping:
            # A worker went away on its own: stop the rest rather than
            # serve on with fewer processes than the operator asked for.
            log.error('worker %s (pid %s) stopped unexpectedly; stopping',
                      index, pid)
            failed = True
            forward(signal.SIGTERM, None)
    return 1 if failed else 0
