"""Rooms: dms between two users, blocks, membership checks and the room
cache (groups' life cycle is ``groups``, the inbox ``inbox``)."""
import dataclasses

from server.data import messages as message_data
from server.data import rooms as data
from server.errors import Forbidden, Invalid, NotFound
from server.services import outbox
from server.services.auth import check_username
from server.services.context import now_ms
from server.services.limits import check_room_quota
from server.services.serialize import iso, load_users


@dataclasses.dataclass(frozen=True)
class RoomInfo:
    """A room as cached per process. A dm never changes; a group's
    members, owner and name change only through the group functions
    below, which drop it from the cache of every process (``forget_room``)
    and are checked again inside the writer's transaction."""
    id: int
    kind: str
    name: str | None
    created_at: int
    member_ids: tuple  # longest-standing member first
    owner_id: int | None = None

    def other_member(self, user_id):
        return next(m for m in self.member_ids if m != user_id)


def dm_key(a: int, b: int) -> str:
    return f'{min(a, b)}:{max(a, b)}'


def _infos(room_ids) -> list:
    """The RoomInfo of those of ``room_ids`` that exist, read from the
    database."""
    members = data.members_of(room_ids)
    return [RoomInfo(room_id, kind, name, created_at,
                     tuple(members.get(room_id, ())), owner_id)
            for room_id, kind, name, created_at, owner_id
            in data.room_rows(room_ids)]


def load_room(room_id):
    """The room's RoomInfo read from the database, or None."""
    infos = _infos([room_id])
    return infos[0] if infos else None


def forget_room(ctx, room_id):
    """A group's members, owner or name changed: drop it from this
    process's cache. The epoch makes a load that was already under way
    (and may have read the old members) not cache its answer."""
    ctx.rooms.forget(room_id)


async def memberships(ctx, pairs) -> set:
    """Those of the (room id, user id) ``pairs`` that are memberships."""
    return await ctx.store.read(message_data.memberships, pairs)


def forget_all(ctx):
    """Drop every room from this process's cache (changes on other
    processes may have been missed)."""
    ctx.rooms.forget_all()


async def room_info(ctx, room_id) -> RoomInfo:
    info = ctx.rooms.get(room_id)
    if info is None:
        epoch = ctx.rooms.epoch
        info = await ctx.store.read(load_room, room_id)
        if info is None:
            raise NotFound('no such room')
        if ctx.rooms.epoch == epoch:
            ctx.rooms[room_id] = info
    return info


async def member_room(ctx, user_id, room_id) -> RoomInfo:
    """The room, if ``user_id`` is a member. Raises NotFound if it does not
    exist, Forbidden if the user is not a member."""
    if isinstance(room_id, bool) or not isinstance(room_id, int):
        raise Invalid('room_id must be an integer')
    if not 0 < room_id < 2**63:  # ids are positive 64-bit integers
        raise NotFound('no such room')
    info = await room_info(ctx, room_id)
    if user_id not in info.member_ids:
        raise Forbidden('you are not a member of this room')
    return info


def room_dict(ctx, info: RoomInfo, last_seq: int) -> dict:
    users = load_users(ctx, info.member_ids)
    return {'id': info.id, 'kind': info.kind, 'name': info.name,
            'members': [users[m] for m in info.member_ids],
            'owner_id': info.owner_id,
            'last_seq': last_seq, 'created_at': iso(info.created_at)}


async def room_payload(ctx, info: RoomInfo) -> dict:
    """The contract's room object, with its current last_seq."""
    last_seq = await ctx.store.read(data.last_seq, info.id)
    return await ctx.store.read(room_dict, ctx, info, last_seq)


async def find_user_id(ctx, username) -> int:
    """The id of ``username``; NotFound if there is no such user. Cached
    per process: a username never changes and users are never deleted."""
    username = check_username(username)
    user_id = ctx.user_ids.get(username)
    if user_id is None:
        user_id = await ctx.store.read(data.user_id, username)
        if user_id is None:
            raise NotFound(f'no user {username!r}')
        ctx.user_ids.put(username, user_id)
    return user_id


def dm_blocked(ctx, room_id, user_id) -> bool:
    """Whether ``room_id`` is a dm whose other member blocks ``user_id``.
    Runs on a database thread."""
    info = ctx.rooms.get(room_id) or load_room(room_id)
    return (info is not None and info.kind == 'dm' and
            data.is_blocked(info.other_member(user_id), user_id))


async def live_audience(ctx, info: RoomInfo, user_id, refuse=False):
    """The members who get ``user_id``'s typing and read receipts in
    ``info``. In a dm with a block either way, the other member is left
    out: nothing of the blocked user's reaches the blocker there, and the
    blocker's activity is hidden from the one they blocked, as their
    presence is. With ``refuse``, a dm whose other member blocks
    ``user_id`` is Forbidden instead. Groups are unaffected."""
    if info.kind != 'dm':
        return info.member_ids
    other = info.other_member(user_id)
    blocks = await ctx.store.read(data.blocks_between, user_id, other)
    if refuse and (other, user_id) in blocks:
        raise Forbidden('this user does not accept anything from you')
    return (user_id,) if blocks else info.member_ids


def _find_dm(key):
    found = data.dm(key)
    return found and found[0]


async def _dm_id(ctx, user_id, other_id):
    """The id of the two users' dm room, None if never opened. Cached per
    process: a dm's members never change and it is never deleted."""
    key = dm_key(user_id, other_id)
    room_id = ctx.dm_rooms.get(key)
    if room_id is None:
        room_id = await ctx.store.read(_find_dm, key)
        if room_id is not None:
            ctx.dm_rooms.put(key, room_id)
    return room_id


async def _other_user(ctx, user_id, username):
    other_id = await find_user_id(ctx, username)
    if other_id == user_id:
        raise Invalid('you cannot open a dm with yourself')
    return other_id


async def _create_dm(ctx, user_id, other_id):
    """Open the dm through the writer (it may not exist yet): ``(room
    dict, created)``."""
    info, room, created = await ctx.store.write(_open_dm, ctx, user_id,
                                                other_id)
    ctx.dm_rooms.put(dm_key(user_id, other_id), info.id)
    return room, created


async def dm_to(ctx, user_id, username):
    """The dm a send by username goes to: ``(room id, room dict if this
    call created the room, else None)``. A known dm costs no database
    work: the send itself checks blocks inside the writer. Raises NotFound,
    Invalid (yourself), Forbidden (blocked, when the dm is new)."""
    other_id = await _other_user(ctx, user_id, username)
    room_id = await _dm_id(ctx, user_id, other_id)
    if room_id is not None:
        return room_id, None
    room, created = await _create_dm(ctx, user_id, other_id)
    return room['id'], room if created else None


def _dm_payload(ctx, info, user_id):
    if data.is_blocked(info.other_member(user_id), user_id):
        raise Forbidden('this user does not accept your messages')
    return room_dict(ctx, info, data.last_seq(info.id))


def _open_dm(ctx, user_id, other_id):
    if data.is_blocked(other_id, user_id):
        raise Forbidden('this user does not accept your messages')
    key = dm_key(user_id, other_id)
    found = data.dm(key)
    created = False
    if found is None:
        check_room_quota(ctx, user_id)
        room_id = data.create_dm(key, (user_id, other_id), user_id, now_ms())
        if room_id is not None:
            created, found = True, (room_id, 0)
        else:  # another process opened it first
            found = data.dm(key)
    room_id, last_seq = found
    info = load_room(room_id)
    if created:
        # A bot with a webhook hears of the new room. Should this fail,
        # the writer rolls the operation back, room too.
        outbox.queue_new_room(ctx, info, user_id)
    ctx.rooms[room_id] = info
    return info, room_dict(ctx, info, last_seq), created


async def open_dm(ctx, user_id, username):
    """The dm room between ``user_id`` and ``username``, created on first
    use. Returns ``(room dict, created)``. Raises NotFound, Invalid (with
    yourself) or Forbidden (the other user blocks you). An existing dm
    is one read; only a new one goes through the writer."""
    other_id = await _other_user(ctx, user_id, username)
    room_id = await _dm_id(ctx, user_id, other_id)
    if room_id is None:
        return await _create_dm(ctx, user_id, other_id)
    info = await room_info(ctx, room_id)
    return await ctx.store.read(_dm_payload, ctx, info, user_id), False


def _read_markers(room_id):
    return {str(u): s for u, s in data.read_markers(room_id).items()}


async def read_markers(ctx, room_id) -> dict:
    """{user_id (as a string key): last_read_seq} of every member."""
    return await ctx.store.read(_read_markers, room_id)


def room_infos(ctx, room_ids, groups_fresh=False) -> dict:
    """{room id: RoomInfo}, from the cache, the missing ones read a chunk
    of rooms per query (a cold inbox of thousands of rooms must not cost
    two queries per room). ``groups_fresh``: groups are read again too
    (the caller knows they changed; a process sharing the database
    without Redis hears of no change made elsewhere)."""
    epoch = ctx.rooms.epoch
    infos = {r: ctx.rooms.get(r) for r in room_ids}
    missing = [r for r, info in infos.items() if info is None or
               (groups_fresh and info.kind != 'dm')]
    for start in range(0, len(missing), INBOX_CHUNK):
        for info in _infos(missing[start:start + INBOX_CHUNK]):
            infos[info.id] = info
            # Not cached if a group changed since this read began: it may
            # have read the old members (see forget_room).
            if ctx.rooms.epoch == epoch:
                ctx.rooms[info.id] = info
    return infos


# Rooms per query when a list of rooms is read by id (the inbox).
INBOX_CHUNK = 500


async def contacts(ctx, user_id) -> set:
    """Ids of the users who share a room with ``user_id`` (itself included)."""
    return await ctx.store.read(data.contacts, user_id)


def _block(blocker_id, blocked_id, on):
    if on:
        data.add_block(blocker_id, blocked_id, now_ms())
    else:
        data.remove_block(blocker_id, blocked_id)


async def set_block(ctx, user_id, username, on: bool):
    """Block (or unblock) ``username`` for dms. Idempotent."""
    other_id = await find_user_id(ctx, username)
    if other_id == user_id:
        raise Invalid('you cannot block yourself')
    await ctx.store.write(_block, user_id, other_id, on)


def _blocks_of(ctx, user_id):
    rows = data.blocks_of(user_id)
    users = load_users(ctx, [blocked for blocked, _ in rows])
    return [{'user': users[blocked], 'created_at': iso(created_at)}
            for blocked, created_at in rows if blocked in users]


async def list_blocks(ctx, user_id) -> list:
    """The users ``user_id`` blocks, newest block first: a list of
    ``{user, created_at}``. Only the caller's own blocks, so it needs no
    other check."""
    return await ctx.store.read(_blocks_of, ctx, user_id)
