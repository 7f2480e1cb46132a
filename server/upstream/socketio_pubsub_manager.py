"""Overrides ``socketio.async_pubsub_manager.AsyncPubSubManager``: the
Socket.IO client manager that spreads emits across processes through
Redis (``server/cluster/``), publishing only to the processes that hold a
recipient.

It implements the two hooks the base class asks pub/sub subclasses for,
``_publish`` (hand a message to the other processes) and ``_listen``
(yield what they sent), and changes what it must around them; everything
that is not an override (the send queue, the room sets, the holders, the
listener, liveness) is ``server.cluster``'s ``Fanout`` and ``Cluster``.

Upstream names touched:

- ``_publish``, ``_listen`` (overridden: the base class's hooks);
- ``_thread`` (run, as the cluster's listener task, instead of being
  started by ``initialize``: readiness must not wait for a first client;
  ``initialize`` is mirrored: ``AsyncManager.initialize`` only);
- ``_handle_emit`` (overridden: Postbox's internal events, and delivery
  with ``local_emit``, one encoding for every recipient; the stock one
  for callbacks and binary);
- ``emit`` (overridden: local delivery now, the message built as the base
  class builds it, queued only for the processes that need it; the stock
  path for callbacks and binary data);
- ``enter_room``, ``basic_leave_room``, ``is_sid_room``, ``rooms``
  (public: the first and last local member of a room register it).
"""
from socketio.async_manager import AsyncManager
from socketio.async_pubsub_manager import AsyncPubSubManager

from server.cluster.fanout import Fanout
from server.upstream.socketio_manager import local_emit

UPSTREAM = AsyncPubSubManager
PRIVATE_NAMES = {
    'socketio.async_pubsub_manager.AsyncPubSubManager._publish':
        'overridden: the message goes to every process through Fanout',
    'socketio.async_pubsub_manager.AsyncPubSubManager._listen':
        'overridden: what the cluster listener hears',
    'socketio.async_pubsub_manager.AsyncPubSubManager._thread':
        'run as the cluster listener task (it reads _listen)',
    'socketio.async_pubsub_manager.AsyncPubSubManager._handle_emit':
        'overridden: internal events, local_emit delivery',
}
COPIED = {
    # emit builds its message as the base emit does, for _handle_emit of
    # other processes (ours or stock) to read.
    'socketio.async_pubsub_manager.AsyncPubSubManager.emit':
        '6cc46e0ff9b6d7cf',
    # initialize is replaced: the listener is started with the app.
    'socketio.async_pubsub_manager.AsyncPubSubManager.initialize':
        'e8a2b026ecea320f',
    # _thread dispatches what _listen yields (dicts or JSON) by 'method'.
    'socketio.async_pubsub_manager.AsyncPubSubManager._thread':
        'fa8d075729aac64d',
}

# Not a client event: a published "disconnect these sockets" order.
DISCONNECT_EVENT = '__postbox_disconnect_room'

# Not a client event: a published notice for every process's ``on_notice``
# (a group's members changed: forget it, drop the leavers' sockets).
NOTICE_EVENT = '__postbox_notice'


class RedisManager(AsyncPubSubManager):
    """Client manager for ``socketio.AsyncServer(client_manager=...)`` on
    ``cluster`` (a ``server.cluster.Cluster``). Counters for metrics:
    ``published``, ``publish_failures`` (the fan-out's), ``listen_failures``,
    ``deaf``, ``listening`` (the cluster's)."""

    name = 'postbox-redis'

    def __init__(self, cluster, *, queue_max=10000, join_timeout=2.0):
        super().__init__(channel=cluster.channel)
        self.cluster = cluster
        self.host_id = cluster.host_id
        self.fanout = Fanout(cluster, self.holds, self.local_rooms,
                             queue_max=queue_max, join_timeout=join_timeout)
        self.on_notice = None  # callable(data) for notify_all notices

    published = property(lambda self: self.fanout.published)
    publish_failures = property(lambda self: self.fanout.publish_failures)
    listening = property(lambda self: self.cluster.listening)
    listen_failures = property(lambda self: self.cluster.listen_failures)
    deaf = property(lambda self: self.cluster.deaf)

    def initialize(self):
        """Called by the server before its first request. The background
        tasks are started by ``start()`` instead, with the app."""
        AsyncManager.initialize(self)

    async def start(self):
        self.fanout.start()
        await self.cluster.start(self._thread)

    async def close(self):
        """Stop listening and sending; withdraw this process."""
        await self.cluster.stop()
        await self.fanout.close()
        await self.cluster.close()

    async def ready(self) -> bool:
        return await self.cluster.ready()

    def holds(self, namespace, room) -> bool:
        return room in self.rooms.get(namespace, {})

    def local_rooms(self):
        """(namespace, room) of every room held here, sids left out."""
        for namespace, rooms in list(self.rooms.items()):
            for room in list(rooms):
                if room is not None and \
                        not self.is_sid_room(namespace, room):
                    yield namespace, room

    def message(self, event, data, namespace, room, skip_sid=None):
        """An emit as the base class publishes it (not binary, no ack)."""
        return {'method': 'emit', 'event': event,
                'data': list(data) if isinstance(data, tuple) else [data],
                'binary': False, 'namespace': namespace, 'room': room,
                'skip_sid': skip_sid, 'callback': None,
                'host_id': self.host_id}

    async def emit(self, event, data, namespace=None, room=None,
                   skip_sid=None, callback=None, to=None, **kwargs):
        """Deliver to this process's sockets now; queue the message for
        the processes that hold the other recipients."""
        room = to or room
        namespace = namespace or '/'
        if kwargs.get('ignore_queue') or callback is not None or \
                self.server.packet_class.data_is_binary([data]):
            # Rare paths (acks across processes, binary payloads): the
            # stock broadcast handling, published through our queue.
            return await super().emit(event, data, namespace=namespace,
                                      room=room, skip_sid=skip_sid,
                                      callback=callback, **kwargs)
        await local_emit(self, event, data, namespace, room, skip_sid)
        message = self.message(event, data, namespace, room, skip_sid)
        if room is None:
            self.fanout.to_all(message)  # everyone: every process
            return
        rooms = room if isinstance(room, list) else [room]
        # A sid of this process is a room no other process has.
        self.fanout.to_rooms(namespace, [
            r for r in rooms if not self.is_sid_room(namespace, r)], message)

    async def disconnect_room(self, room, namespace='/'):
        """Disconnect every socket in ``room`` on every process (a user's
        sockets after logout-everywhere). Travels as an emit of an internal
        event that ``_handle_emit`` turns into disconnects."""
        await self._disconnect_local(room, namespace)
        self.fanout.to_all(self.message(DISCONNECT_EVENT, None, namespace,
                                        room))

    async def notify_all(self, data):
        """Hand ``data`` (JSON-able) to ``on_notice`` on every other
        process, through the publish queue (in order with the emits queued
        before and after it)."""
        self.fanout.to_all(self.message(NOTICE_EVENT, data, '/', None))

    async def _disconnect_local(self, room, namespace):
        for sid, _ in list(self.get_participants(namespace, room)):
            await self.server.disconnect(sid, namespace=namespace,
                                         ignore_queue=True)

    async def _handle_emit(self, message):
        """An emit from another process: deliver it to our sockets with
        ``local_emit`` (no task per recipient), like our own emits."""
        if message.get('event') == DISCONNECT_EVENT:
            return await self._disconnect_local(
                message['room'], message.get('namespace') or '/')
        if message.get('event') == NOTICE_EVENT:
            if self.on_notice is not None:
                self.on_notice(message['data'][0])
            return
        if message.get('callback') is not None or message.get('binary'):
            return await super()._handle_emit(message)
        data = message['data']
        data = data[0] if len(data) == 1 else tuple(data)
        await local_emit(self, message['event'], data,
                         message.get('namespace') or '/',
                         message.get('room'), message.get('skip_sid'))

    async def _publish(self, data):
        """Used by the base class for disconnects, callbacks and binary
        emits: every process gets them."""
        self.fanout.to_all(data)

    async def _listen(self):
        """What the cluster's listener hears, holder notices and acks
        taken out."""
        async for item in self.cluster.listen():
            if not self.fanout.on_item(item):
                yield item

    async def enter_room(self, sid, namespace, room, eio_sid=None):
        """Enter locally; the first local member registers this process
        in the room (``Fanout.entered``) before the caller goes on."""
        namespace = namespace or '/'
        new = not self.holds(namespace, room)
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        if new and room != sid and self.holds(namespace, room):
            await self.fanout.entered(namespace, room)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        if room is not None and room != sid and \
                not self.holds(namespace, room):
            self.fanout.left(namespace, room)
