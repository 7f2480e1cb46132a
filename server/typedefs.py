"""Typed keys of the aiohttp application: what the setup steps of
``server/app.py`` store in ``app[...]`` and the views and shutdown read.
A typed ``web.AppKey`` (not a string) lets a type checker see what
``app[CTX]`` is, and two modules cannot collide on a name."""
from collections.abc import Awaitable, Callable
from typing import Union

import socketio
from aiohttp import web

from server.config import Config
from server.metrics import METRICS  # noqa: F401 (defined with its view)
from server.services.context import Context
from server.transport.realtime import Realtime
from server.transport.socket import Sockets

# A readiness or health check: ``(name, check)``; ``check()`` returns (or
# resolves to) True when that part works; see http.checked.
Check = tuple[str, Callable[[], Union[bool, Awaitable[bool]]]]

CONFIG = web.AppKey('config', Config)
CTX = web.AppKey('ctx', Context)
REALTIME = web.AppKey('realtime', Realtime)
SIO = web.AppKey('sio', socketio.AsyncServer)
SOCKETS = web.AppKey('sockets', Sockets)
# The Socket.IO client manager that fans out across processes (Redis);
# absent in a single process.
CLUSTER = web.AppKey('cluster', socketio.AsyncManager)
# /readyz (dependencies: the database, its disk, Redis) and /healthz (this
# process's own parts: the writer thread, the reader pool).
READY_CHECKS = web.AppKey('ready_checks', list[Check])
HEALTH_CHECKS = web.AppKey('health_checks', list[Check])
# ``await disconnect_user(user_id)`` closes the user's live sockets (after
# a logout or password change revoked their tokens), on every process.
DISCONNECT_USER = web.AppKey('disconnect_user',
                             Callable[[int], Awaitable[None]])
