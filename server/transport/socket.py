"""Socket.IO event handlers. Each unpacks its payload, calls one service,
returns the ack and emits; ``on_event`` is the single error path, and
``relay`` registers the handlers that do nothing but pass payload fields to
their service (docs/protocol.md is the contract of every event)."""
import asyncio
import functools
import logging
import math
import time

import socketio

from server.errors import Invalid, PostboxError, Unauthorized, Unavailable
from server.logs import new_request_id
from server.services import (auth, groups, inbox, limits, messages,
                             presence, push, rooms)
from server.services import search as search_service
from server.tasks import cancelled
from server.transport.addresses import client_address
from server.transport.realtime import room_room, user_room

log = logging.getLogger(__name__)


class Sockets:
    """Connected sockets of this process: sid -> user dict, when the
    token each connected with expires, and which are counted in presence."""

    def __init__(self):
        self.users = {}
        self.by_user = {}  # user id -> set of sids
        self.ips = {}  # sid -> client address, for the connection limits
        self.expires = {}  # sid -> unix time its token expires
        self.issued = {}  # sid -> when its token was issued (ms)
        # Sids counted in presence (``count_present``): only those are
        # uncounted at their disconnect. A connect undone before its
        # CONNECT reply never counted, and must not take a count that
        # another socket of the user holds.
        self.present = set()
        self.in_flight = 0
        self.draining = False

    def add(self, sid, user, expires=math.inf, issued=0):
        self.users[sid] = user
        self.by_user.setdefault(user['id'], set()).add(sid)
        self.expires[sid] = expires
        self.issued[sid] = issued

    def count_present(self, sid):
        """The user of ``sid``, counted in presence from now on; None if
        it is gone or counted already (nothing to count)."""
        user = self.users.get(sid)
        if user is None or sid in self.present:
            return None
        self.present.add(sid)
        return user

    def expired(self, now) -> list:
        """The sids whose token has expired by ``now``."""
        return [sid for sid, at in self.expires.items() if at <= now]

    def revoked(self, valid_after) -> list:
        """The sids whose token ``valid_after`` ({user id:
        tokens_valid_after} of every connected user; a user missing from
        it is gone) revokes."""
        return [sid for sid, user in self.users.items()
                if auth.revoked(self.issued.get(sid, 0),
                                valid_after.get(user['id']))]

    def remove(self, sid):
        self.expires.pop(sid, None)
        self.issued.pop(sid, None)
        self.present.discard(sid)
        user = self.users.pop(sid, None)
        if user is not None:
            sids = self.by_user.get(user['id'], set())
            sids.discard(sid)
            if not sids:
                self.by_user.pop(user['id'], None)
        return user


# What an event of a socket whose token expired is answered.
EXPIRED = 'token expired: connect again with a fresh token'
# How often sockets whose token expired are looked for and closed.
EXPIRY_SWEEP_SECONDS = 5.0


# How often every socket's token is checked against revocations (logout
# everywhere, a password change, a bot's new token). Those close the
# user's sockets at once, on every process through Redis; this catches a
# socket whose order was lost (Redis away at the time).
REVOCATION_SWEEP_SECONDS = 60.0


async def disconnect_expired(sio, ctx, sockets):
    """Close, every EXPIRY_SWEEP_SECONDS, the sockets whose token has
    expired: a token is checked on every use, and a socket that only
    listens would otherwise go on receiving for as long as it stays up.
    The client's reconnect with that token is refused ``unauthorized``.
    Every REVOCATION_SWEEP_SECONDS, those whose token was revoked too
    (``revalidate``)."""
    checked = time.monotonic()
    while not cancelled():  # not while True: see server/tasks.py
        await asyncio.sleep(EXPIRY_SWEEP_SECONDS)
        await _close(sio, sockets, sockets.expired(time.time()),
                     'token expired')
        if time.monotonic() - checked >= REVOCATION_SWEEP_SECONDS:
            checked = time.monotonic()
            try:
                await revalidate(sio, ctx, sockets)
            except PostboxError as exc:  # the database is away: next time
                log.info('revocation sweep skipped: %s', exc)


async def _close(sio, sockets, sids, why):
    for sid in sids:
        if not sio.manager.is_connected(sid, '/'):
            # Its connect failed after it was added: nothing to close.
            sockets.remove(sid)
            continue
        log.info('disconnect: %s', why, extra={'sid': sid})
        try:
            await sio.disconnect(sid)
        except Exception:  # closing already; the next sweep retries
            log.debug('closing %s failed', sid, exc_info=True)


async def after_redis_returned(sio, ctx, sockets):
    """``revalidate`` with rooms, for the cluster's ``on_register`` (run
    as a task of its own: the hook must not hold up the registration)."""
    try:
        await revalidate(sio, ctx, sockets, rooms_too=True)
    except PostboxError as exc:
        log.warning('after redis returned, sockets not checked: %s', exc)


async def revalidate(sio, ctx, sockets, rooms_too=False):
    """Close the sockets whose token was revoked after they connected.
    With ``rooms_too`` (after Redis was away: the orders and notices of
    other processes may be lost), also forget every cached room, and take
    each socket out of the joined rooms of groups its user is no longer
    in, telling it ``room_left``."""
    if sockets.by_user:
        valid_after = await auth.valid_after(ctx, list(sockets.by_user))
        await _close(sio, sockets, sockets.revoked(valid_after),
                     'token revoked')
    if not rooms_too:
        return
    rooms.forget_all(ctx)
    joined = {}  # (room id, user id) -> Socket.IO room name
    for name in list(sio.manager.rooms.get('/', {})):
        parts = name.split(':') if isinstance(name, str) else ()
        if len(parts) == 3 and parts[0] == 'room' and \
                parts[1].isdigit() and parts[2].isdigit():
            joined[int(parts[1]), int(parts[2])] = name
    if not joined:
        return
    members = await rooms.memberships(ctx, set(joined))
    for (room_id, user_id), name in joined.items():
        if (room_id, user_id) in members:
            continue
        for sid, _ in list(sio.manager.get_participants('/', name)):
            sio.manager.basic_leave_room(sid, '/', name)
            await sio.emit('room_left', {'room_id': room_id}, to=sid)


def error_ack(error: PostboxError) -> dict:
    return {'ok': False, 'error': error.to_dict()}


def register(sio: socketio.AsyncServer, ctx, realtime):
    """Attach every handler to ``sio``. Returns the Sockets registry."""
    sockets = Sockets()

    def on_event(name):
        """Register ``fn(sid, user, data) -> dict`` as the handler of
        ``name``: the payload must be an object, the answer is
        ``{ok: true, ...}``, any PostboxError becomes ``{ok: false, error}``
        and anything else is logged and answered ``internal``."""
        def decorator(fn):
            # Labelled metric children looked up once, not per event.
            seconds = ctx.metrics.event_seconds.labels(name)
            outcomes = {}

            @functools.wraps(fn)
            async def handler(sid, *args):
                sockets.in_flight += 1
                new_request_id()
                started = time.perf_counter()
                outcome = 'ok'
                user = sockets.users.get(sid)
                try:
                    if sockets.draining:
                        raise Unavailable('server is shutting down, retry')
                    if user is None:
                        raise Unauthorized('not connected')
                    if sockets.expires[sid] <= time.time():
                        # Checked on every use, as over HTTP; the sweep
                        # (disconnect_expired) closes the socket soon.
                        raise Unauthorized(EXPIRED)
                    # Every event costs a token, reads included: a client
                    # looping on `rooms` or `sync` is as costly as spam.
                    ctx.limits.events.take(user['id'])
                    data = args[0] if args else None
                    if not isinstance(data, dict):
                        raise Invalid('payload must be an object')
                    result = await fn(sid, user, data)
                    return {'ok': True, **(result or {})}
                except PostboxError as exc:
                    outcome = exc.code
                    if exc.code == 'rate_limited':
                        ctx.metrics.rate_limited.labels(name).inc()
                    log.info('event %s refused: %s', name, exc.code, extra={
                        'user_id': user and user['id'], 'sid': sid})
                    return error_ack(exc)
                except Exception:
                    outcome = 'internal'
                    log.exception('event %s failed', name, extra={
                        'user_id': user and user['id'], 'sid': sid})
                    return {'ok': False, 'error': {
                        'code': 'internal', 'message': 'internal error'}}
                finally:
                    sockets.in_flight -= 1
                    count = outcomes.get(outcome)
                    if count is None:
                        count = outcomes[outcome] = ctx.metrics.events.labels(
                            name, outcome)
                    count.inc()
                    seconds.observe(time.perf_counter() - started)
            sio.on(name, handler)
            return fn
        return decorator

    def refuse(code, message=None):
        ctx.metrics.connections.labels(code).inc()
        data = {'code': code}
        if message:
            data['message'] = message
        return socketio.exceptions.ConnectionRefusedError(code, data)

    @sio.on('connect')
    async def connect(sid, environ, auth_data=None):
        new_request_id()
        request = environ.get('aiohttp.request')
        ip = (client_address(request, ctx.config.trusted_proxies)
              if request is not None else None)
        token = auth_data.get('token') if isinstance(auth_data, dict) else None
        try:
            user = await auth.authenticate(ctx, token)
            issued, expires = auth.token_times(ctx, token)
        except Unauthorized:
            log.info('connection refused: unauthorized',
                     extra={'sid': sid, 'ip': ip})
            raise refuse('unauthorized')
        except Unavailable as exc:  # the database is away: refuse, say so
            log.info('connection refused: unavailable (%s)', exc.message,
                     extra={'sid': sid, 'ip': ip})
            raise refuse('unavailable', exc.message)
        if sockets.draining:
            raise refuse('unavailable')
        if sio.closed(sid):
            # Closed while the token was checked: take nothing. (Closed
            # any later, the server undoes the connect through
            # ``disconnect``: socketio_server.Server._connect.)
            log.info('connection closed while connecting',
                     extra={'user_id': user['id'], 'sid': sid, 'ip': ip})
            return False
        try:
            await ctx.limits.connections.acquire(user['id'], ip)
        except limits.TooManyConnections as exc:
            ctx.metrics.rate_limited.labels('connections').inc()
            log.info('connection refused: %s', exc,
                     extra={'user_id': user['id'], 'sid': sid, 'ip': ip})
            raise refuse('rate_limited', str(exc))
        sockets.ips[sid] = ip
        sockets.add(sid, user, expires, issued)
        recovery = sio.recovery if sio.recovery is not None and \
            sio.recovery.opted_in(auth_data) else None
        if recovery is not None:  # holds live events until resume
            recovery.start(sid, user['id'])
        ctx.metrics.connections.labels('ok').inc()
        ctx.metrics.sockets.inc()
        log.info('connect', extra={'user_id': user['id'], 'sid': sid,
                                   'ip': ip})
        await sio.enter_room(sid, user_room(user['id']))
        if recovery is not None:
            # Missed events, restored rooms, a pid for the CONNECT reply.
            await recovery.resume(sid, sio.manager.eio_sid_from_sid(sid, '/'),
                                  user['id'], auth_data)
        # Presence waits for ``connected``: this socket is in its user's
        # room already, and the user's coming online is sent there too.

    async def connected(sid):
        """After the CONNECT reply of ``sid`` (``Server._connect``): the
        user is counted online, and their watchers, this socket among
        them, told if they came online. Before the reply, the ``presence``
        event would reach this socket ahead of it."""
        user = sockets.count_present(sid)
        if user is None:
            return
        try:
            await ctx.presence.connected(user['id'])
        except Unavailable:
            # Connected all the same; only the contacts' presence event
            # is missed while the database is away.
            log.warning('presence of a new connection not sent: database '
                        'unavailable', extra={'user_id': user['id'],
                                              'sid': sid})

    sio.after_connect = connected

    @sio.on('disconnect')
    async def disconnect(sid, reason=None):
        present = sid in sockets.present
        user = sockets.remove(sid)
        if user is None:
            return
        if sio.recovery is not None:
            await sio.recovery.stop(sid, sio.rooms(sid))
        ip = sockets.ips.pop(sid, None)
        await ctx.limits.connections.release(user['id'], ip)
        ctx.metrics.sockets.dec()
        log.info('disconnect', extra={'user_id': user['id'], 'sid': sid,
                                      'ip': ip, 'reason': str(reason)})
        for room_id, user_id in ctx.typing.drop_socket(sid):
            info = await rooms.room_info(ctx, room_id)
            await realtime.typing(room_id, user, False,
                                  await rooms.live_audience(ctx, info,
                                                            user['id']))
        if present:
            await ctx.presence.disconnected(user['id'])

    @sio.on('*')
    async def unknown(event, sid, *args):
        # Junk costs a token too: otherwise it is a free way to load us.
        user = sockets.users.get(sid)
        try:
            if user is not None:
                ctx.limits.events.take(user['id'])
        except PostboxError as exc:
            ctx.metrics.rate_limited.labels('unknown').inc()
            return error_ack(exc)
        return error_ack(Invalid(f'unknown event {event!r}'))

    @on_event('ping')
    async def ping(sid, user, data):
        return {}

    @on_event('open_dm')
    async def open_dm(sid, user, data):
        room, created = await rooms.open_dm(ctx, user['id'],
                                            data.get('username'))
        if created:
            await realtime.room(room)
        return {'room': room}

    @on_event('join_room')
    async def join_room(sid, user, data):
        info = await rooms.member_room(ctx, user['id'], data.get('room_id'))
        # Enter first so nothing sent after the history query is missed.
        await sio.enter_room(sid, room_room(info.id, user['id']))
        recent = await messages.history(ctx, user['id'], info.id)
        room = await rooms.room_payload(ctx, info)
        # Only the markers of those who may see each other's activity (a
        # block in a dm hides them both ways).
        audience = await rooms.live_audience(ctx, info, user['id'])
        read = {u: seq for u, seq in
                (await rooms.read_markers(ctx, info.id)).items()
                if int(u) in audience}
        return {'room': room, 'messages': recent['messages'],
                'has_more': recent['has_more'], 'read': read}

    @on_event('leave_room')
    async def leave_room(sid, user, data):
        info = await rooms.member_room(ctx, user['id'], data.get('room_id'))
        await sio.leave_room(sid, room_room(info.id, user['id']))
        return {}

    @on_event('send_dm')
    async def send_dm(sid, user, data):
        sent = await realtime.send(messages.send_message(
            ctx, user['id'], data.get('body'), data.get('client_msg_id'),
            room_id=data.get('room_id'), to=data.get('to'),
            attachments=data.get('attachments'),
            reply_to=data.get('reply_to')))
        return {'message': sent.message}

    @on_event('typing')
    async def typing(sid, user, data):
        room_id = data.get('room_id')
        typing = data.get('typing')
        member_ids = await presence.set_typing(ctx, user['id'], room_id,
                                               typing, sid)
        if member_ids:
            await realtime.typing(room_id, user, typing, member_ids)
        return {}

    @on_event('mark_read')
    async def mark_read(sid, user, data):
        room_id = data.get('room_id')
        marker, unread, moved, last_seq = await messages.mark_read(
            ctx, user['id'], room_id, data.get('seq'))
        if moved:
            info = await rooms.room_info(ctx, room_id)
            await realtime.read(room_id, user['id'], marker,
                                {'unread': unread, 'last_seq': last_seq},
                                await rooms.live_audience(ctx, info,
                                                          user['id']))
        return {'unread': unread, 'seq': marker, 'last_seq': last_seq}

    @on_event('mute_room')
    async def mute_room(sid, user, data):
        room_id, muted = data.get('room_id'), data.get('muted')
        await push.mute_room(ctx, user['id'], room_id, muted)
        await realtime.muted(user['id'], room_id, muted)
        return {}

    def block_handler(on):
        async def handler(sid, user, data):
            other_id, seen = await presence.set_block(
                ctx, user, data.get('username'), on)
            if seen is not None:
                await realtime.presence_seen(user, seen, [other_id])
            return {}
        return handler

    on_event('block')(block_handler(True))
    on_event('unblock')(block_handler(False))

    def relay(event, service, *fields, key=None, then=None, **fixed):
        """Register ``event`` as a handler that only passes the payload's
        ``fields`` (in the service's order, a missing one as None) and the
        ``fixed`` keyword arguments to ``service(ctx, user_id, ...)``. The
        ack holds what it returns, under ``key`` if given, or what
        ``then(result)`` makes of it (which emits what the change needs).
        Validation is the service's, as in every handler."""
        @on_event(event)
        async def handler(sid, user, data):
            result = await service(ctx, user['id'],
                                   *[data.get(name) for name in fields],
                                   **fixed)
            if then is not None:
                return await then(result)
            return result if key is None else {key: result}

    async def updated(result):
        message, changed, member_ids = result
        if changed:
            await realtime.message_updated(message, member_ids)
        return {'message': message}

    async def new_room(room):
        await realtime.room(room)
        return {'room': room}

    async def group_changed(change):
        await realtime.group_changed(change)
        return {'room': change.room}

    async def left(change):
        await realtime.group_changed(change)
        return {}

    relay('create_group', groups.create_group, 'name', 'members',
          then=new_room)
    relay('add_members', groups.add_members, 'room_id', 'members',
          then=group_changed)
    relay('remove_member', groups.remove_member, 'room_id', 'username',
          then=group_changed)
    relay('leave_group', groups.leave_group, 'room_id', then=left)
    relay('rename_group', groups.rename_group, 'room_id', 'name',
          then=group_changed)
    relay('history', messages.history, 'room_id', 'before', 'after', 'limit')
    relay('rooms', inbox.inbox, 'limit', 'before')
    relay('edit_message', messages.edit_message, 'message_id', 'body',
          then=updated)
    relay('delete_message', messages.delete_message, 'message_id',
          then=updated)
    relay('react', messages.react, 'message_id', 'emoji', 'on', then=updated)
    relay('search', search_service.search, 'query', 'room_id', 'before',
          'limit')
    relay('presence', presence.query, 'usernames', key='presence')

    @on_event('sync')
    async def sync(sid, user, data):
        known = data.get('rooms', {})
        return await messages.sync(ctx, user['id'], known)

    return sockets
