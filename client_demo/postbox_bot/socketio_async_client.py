"""Overrides ``socketio.AsyncClient``: the Socket.IO client the bot uses,
which keeps the ``pid`` of the CONNECT reply (connection state recovery,
PROTOCOL v2).

python-socketio's client reads only ``sid`` from the CONNECT reply's data
and drops the rest; the recovery handshake needs the ``pid`` next to it (the
official JS client keeps it the same way). ``RecoveringClient`` records it,
and whether the reply has come yet: the events a recovering server replays
come before that reply.

This is the only module of the SDK that touches a private name of
python-socketio; the version is pinned in ``pyproject.toml``
(``python-socketio>=5.18,<5.19``) and the repo's drift test
(``tests/test_bots.py``) checks every name below against the installed one.
It follows the convention of Postbox's ``server/upstream/``: ``UPSTREAM``,
``PRIVATE_NAMES`` and ``COPIED``.

Upstream names touched: ``AsyncClient._handle_connect(namespace, data)``
(overridden, then called: the CONNECT packet's handler; ``data`` is the
reply's payload, a dict with ``sid`` and, from a recovering server,
``pid``). Its code is hashed in ``COPIED``: the override relies on it
being what turns a CONNECT packet into the ``connect`` event.
"""
import socketio

UPSTREAM = socketio.AsyncClient
PRIVATE_NAMES = {
    'socketio.async_client.AsyncClient._handle_connect':
        'overridden: reads pid from the CONNECT reply, then upstream runs',
}
COPIED = {
    # The override relies on this being the handler of the CONNECT reply,
    # taking (namespace, data).
    'socketio.async_client.AsyncClient._handle_connect': 'd634546aafba01a3',
}


class RecoveringClient(socketio.AsyncClient):
    """An ``AsyncClient`` that keeps the main namespace's ``pid`` (None
    when the server gave none) and sets ``replied`` when the CONNECT reply
    has arrived (events before it are a recovery's replay)."""

    pid = None
    replied = False

    async def _handle_connect(self, namespace, data):
        # Set before anything is awaited: events are handled in arrival
        # order, so the ones queued before this are the replay.
        if (namespace or '/') == '/':
            self.pid = data.get('pid') if isinstance(data, dict) else None
            self.replied = True
        await super()._handle_connect(namespace, data)
