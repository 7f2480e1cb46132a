"""Server -> client events. The only place that names Socket.IO rooms:
``user:<id>`` holds every socket of a user (so messages reach all their tabs
and devices without any join); ``room:<id>:<user_id>`` the sockets of one
member that joined a room (for typing and read events). Joined sockets are
kept per member so that a typing event can go to every member but the
typist, on every process, without knowing the typist's socket ids there."""
from server.errors import PostboxError
from server.services.serialize import iso


def user_room(user_id) -> str:
    return f'user:{user_id}'


def room_room(room_id, user_id) -> str:
    return f'room:{room_id}:{user_id}'


class Realtime:
    def __init__(self, sio):
        self.sio = sio
        # ``forget_room(room_id)``: drops a room from the service cache.
        self.forget_room = lambda room_id: None

    async def _emit(self, event, data, rooms: list):
        """Emit to the sockets in ``rooms``; nothing at all for an empty
        list: python-socketio reads ``to=[]`` as "no recipient given" and
        would broadcast to every socket."""
        if rooms:
            await self.sio.emit(event, data, to=rooms)

    async def message(self, message, member_ids):
        await self._emit('message', message,
                         [user_room(m) for m in member_ids])

    async def message_updated(self, message, member_ids):
        await self._emit('message_updated', message,
                         [user_room(m) for m in member_ids])

    async def room(self, room):
        await self._emit('room', room,
                         [user_room(m['id']) for m in room['members']])

    async def typing(self, room_id, user, typing, member_ids):
        """To the joined sockets of every member but the typist."""
        await self._emit('typing', {'room_id': room_id, 'user': user,
                                    'typing': typing},
                         [room_room(room_id, m) for m in member_ids
                          if m != user['id']])

    async def read(self, room_id, user_id, seq, counts, member_ids):
        """To every socket of the reader, with ``counts`` (their unread
        count and the room's last seq it covers, so their other tabs and
        devices clear it too), and to the joined sockets of the other
        members."""
        data = {'room_id': room_id, 'user_id': user_id, 'seq': seq}
        await self._emit('read', {**data, **counts}, [user_room(user_id)])
        await self._emit('read', data, [room_room(room_id, m)
                                        for m in member_ids if m != user_id])

    async def muted(self, user_id, room_id, muted):
        """To every socket of the user who muted or unmuted the room."""
        await self._emit('muted', {'room_id': room_id, 'muted': muted},
                         [user_room(user_id)])

    async def presence(self, user, online, last_seen_ms, contact_ids):
        await self.presence_seen(user, {'online': online,
                                        'last_seen': iso(last_seen_ms)},
                                 contact_ids)

    async def presence_seen(self, user, seen, user_ids):
        """``seen``: ``{online, last_seen}`` as ``presence`` queries it."""
        await self._emit('presence', {'user': user, **seen},
                         [user_room(u) for u in user_ids])

    async def room_left(self, room_id, user_ids, seq=None):
        """``seq``: the departure's seq (as ``sync`` gives it), which
        connection state recovery goes by."""
        data = {'room_id': room_id}
        if seq:
            data['seq'] = seq
        await self._emit('room_left', data, [user_room(u) for u in user_ids])

    def room_changed_here(self, room_id, left_ids):
        """A group changed (on this process or another): forget it from
        this process's cache (``forget_room``, set by the app) and take the
        sockets of those who left out of its joined room here, so they get
        no more typing or read events from it."""
        self.forget_room(room_id)
        manager = self.sio.manager
        for user_id in left_ids:
            name = room_room(room_id, user_id)
            for sid, _ in list(manager.get_participants('/', name)):
                manager.basic_leave_room(sid, '/', name)

    async def group_changed(self, change):
        """Emit what a group change calls for, after its commit: every
        process forgets the room and drops the leavers' joined sockets
        (with Redis through the manager's ``notify_all``); the members,
        the added ones included, get the room; whoever left gets
        ``room_left`` on every socket."""
        if not change.changed:
            return
        room_id = change.room['id']
        self.room_changed_here(room_id, change.left_ids)
        notify_all = getattr(self.sio.manager, 'notify_all', None)
        if notify_all is not None:
            await notify_all({'room_changed': room_id,
                              'left': list(change.left_ids)})
        await self.room(change.room)
        if change.left_ids:
            await self.room_left(room_id, change.left_ids,
                                 change.room['last_seq'])

    def on_notice(self, notice):
        """A ``notify_all`` notice from another process."""
        room_id = notice.get('room_changed')
        if room_id is not None:
            self.room_changed_here(room_id, notice.get('left') or ())

    async def send(self, sending):
        """Await ``sending`` (a ``messages.send_message`` call), deliver
        what it stored and return it. Refused after it opened a new dm,
        the dm is still announced (it exists now: a later send to it would
        not announce it again) before the refusal goes on to the
        sender."""
        try:
            sent = await sending
        except PostboxError as exc:
            if getattr(exc, 'opened_room', None) is not None:
                await self.room(exc.opened_room)
            raise
        await self.deliver_sent(sent)
        return sent

    async def deliver_sent(self, sent):
        """Emit what a send_message outcome calls for: the new dm room
        first (so clients know the room before its first message), then the
        message, unless this was an idempotent retry; then, if the message
        ended its sender's typing, ``typing: false``."""
        if sent.new_room is not None:
            await self.room(sent.new_room)
        if sent.created:
            await self.message(sent.message, sent.member_ids)
        if sent.typing_stopped:
            await self.typing(sent.message['room_id'], sent.message['sender'],
                              False, sent.member_ids)
