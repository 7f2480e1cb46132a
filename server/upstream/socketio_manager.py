"""Overrides ``socketio.AsyncManager``: local delivery of emits, without a
task per recipient.

The stock ``AsyncManager.emit`` wraps every recipient's send in its own
task and then waits for all of them. Each send only appends to the
socket's Engine.IO queue (its writer task does the I/O), so the tasks buy
nothing and cost the event loop a task creation and a scheduling round per
recipient. ``local_emit`` sends in a plain loop instead; ``LocalManager``
is the manager of a single process.

Upstream names touched: ``AsyncManager.emit`` is replaced (its callback
path is left to python-socketio; hashed in ``COPIED``); ``rooms``,
``get_participants`` and the server's ``packet_class`` are used as
python-socketio does; packets go out through
``socketio_server.Server.send_eio_packet`` (python-socketio's private
``_send_eio_packet``, made public there).
"""
import logging

import socketio
from engineio import packet as eio_packet
from socketio import packet

from server.transport.recovery import RECOVERY_FIELDS, TRACKED, \
    plain_payload

UPSTREAM = socketio.AsyncManager
PRIVATE_NAMES = {}
COPIED = {
    'socketio.AsyncManager.emit': '01ccd5b82b4f955e',
}

log = logging.getLogger(__name__)


async def local_emit(manager, event, data, namespace, room=None,
                     skip_sid=None):
    """Send ``event`` to this process's sockets in ``room`` (a room name,
    a list of them, or None for everyone), except ``skip_sid`` (a sid or
    a list of them). The packet is encoded once for all recipients."""
    if namespace not in manager.rooms:
        return
    if isinstance(data, tuple):
        data = list(data)
    elif data is not None:
        data = [data]
    else:
        data = []
    payload = data[0] if data else None
    if event in RECOVERY_FIELDS:  # fields only recovery sessions get
        data = [plain_payload(event, payload)] + data[1:]
    if not isinstance(skip_sid, list):
        skip_sid = [skip_sid]
    encoded = manager.server.packet_class(
        packet.EVENT, namespace=namespace, data=[event] + data).encode()
    if not isinstance(encoded, list):
        encoded = [encoded]
    eio_packets = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in encoded]
    # Sockets with a recovery session get the event with its offset.
    recovery = getattr(manager.server, 'recovery', None)
    if recovery is None or not recovery.live or namespace != '/' or \
            event not in TRACKED:
        recovery = None
    for sid, eio_sid in manager.get_participants(namespace, room):
        if sid in skip_sid:
            continue
        if recovery is not None and await recovery.deliver(
                sid, eio_sid, event, payload):
            continue
        for pkt in eio_packets:
            try:
                await manager.server.send_eio_packet(eio_sid, pkt)
            except Exception:  # that socket is closing; the others go on
                log.debug('send to %s failed', sid, exc_info=True)


class LocalManager(socketio.AsyncManager):
    """The single-process client manager, with ``local_emit``."""

    async def emit(self, event, data, namespace, room=None, skip_sid=None,
                   callback=None, to=None, **kwargs):
        if callback is not None:
            return await super().emit(event, data, namespace, room=room,
                                      skip_sid=skip_sid, callback=callback,
                                      to=to, **kwargs)
        await local_emit(self, event, data, namespace, to or room, skip_sid)
