"""Rooms: dms between two users, groups, membership checks and the inbox."""
import dataclasses
import functools
import operator

import peewee

from models import Block, Membership, Message, Room, User
from server.errors import Forbidden, Invalid, NotFound
from server.services.auth import check_username
from server.services.context import now_ms
from server.services.limits import check_room_quota
from server.services.serialize import iso, load_users, message_dicts


@dataclasses.dataclass(frozen=True)
class RoomInfo:
    """What never changes about a room once created (cached per process)."""
    id: int
    kind: str
    name: str | None
    created_at: int
    member_ids: tuple

    def other_member(self, user_id):
        return next(m for m in self.member_ids if m != user_id)


def dm_key(a: int, b: int) -> str:
    return f'{min(a, b)}:{max(a, b)}'


def _load_room(room_id):
    room = Room.get_or_none(Room.id == room_id)
    if room is None:
        return None
    members = [m for (m,) in Membership.select(Membership.user)
               .where(Membership.room == room_id)
               .order_by(Membership.id).tuples()]
    return RoomInfo(room.id, room.kind, room.name, room.created_at,
                    tuple(members))


async def room_info(ctx, room_id) -> RoomInfo:
    info = ctx.rooms.get(room_id)
    if info is None:
        info = await ctx.store.read(_load_room, room_id)
        if info is None:
            raise NotFound('no such room')
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
            'last_seq': last_seq, 'created_at': iso(info.created_at)}


def _last_seq(room_id):
    return Room.select(Room.last_seq).where(Room.id == room_id).scalar() or 0


async def room_payload(ctx, info: RoomInfo) -> dict:
    """The contract's room object, with its current last_seq."""
    last_seq = await ctx.store.read(_last_seq, info.id)
    return await ctx.store.read(room_dict, ctx, info, last_seq)


def _find_user(username):
    return (User.select(User.id).where(User.username == username)
            .scalar())


async def find_user_id(ctx, username) -> int:
    username = check_username(username)
    user_id = await ctx.store.read(_find_user, username)
    if user_id is None:
        raise NotFound(f'no user {username!r}')
    return user_id


def is_blocked(blocker_id, blocked_id) -> bool:
    return (Block.select().where(Block.blocker == blocker_id,
                                 Block.blocked == blocked_id).exists())


def _open_dm(ctx, user_id, other_id):
    if is_blocked(other_id, user_id):
        raise Forbidden('this user does not accept your messages')
    key = dm_key(user_id, other_id)
    room = Room.get_or_none(Room.dm_key == key)
    created = False
    if room is None:
        check_room_quota(ctx, user_id)
        now = now_ms()
        try:
            with Room._meta.database.atomic():
                room = Room.create(kind='dm', dm_key=key, created_by=user_id,
                                   created_at=now, last_activity_at=now)
                Membership.insert_many(
                    [{'room': room.id, 'user': u, 'joined_at': now}
                     for u in (user_id, other_id)]).execute()
            created = True
        except peewee.IntegrityError:  # another process opened it first
            room = Room.get(Room.dm_key == key)
    info = _load_room(room.id)
    ctx.rooms[room.id] = info
    return info, room_dict(ctx, info, room.last_seq), created


async def open_dm(ctx, user_id, username):
    """The dm room between ``user_id`` and ``username``, created on first
    use. Returns ``(room dict, created)``. Raises NotFound, Invalid (with
    yourself) or Forbidden (the other user blocks you)."""
    other_id = await find_user_id(ctx, username)
    if other_id == user_id:
        raise Invalid('you cannot open a dm with yourself')
    info, room, created = await ctx.store.write(_open_dm, ctx, user_id,
                                                other_id)
    return room, created


def _create_group(ctx, user_id, name, member_ids):
    check_room_quota(ctx, user_id)
    now = now_ms()
    room = Room.create(kind='group', name=name, created_by=user_id,
                       created_at=now, last_activity_at=now)
    Membership.insert_many([{'room': room.id, 'user': u, 'joined_at': now}
                            for u in member_ids]).execute()
    info = RoomInfo(room.id, 'group', name, now, tuple(member_ids))
    ctx.rooms[room.id] = info
    return room_dict(ctx, info, 0)


def _find_users(usernames):
    return dict(User.select(User.username, User.id)
                .where(User.username.in_(usernames)).tuples())


async def create_group(ctx, user_id, name, usernames) -> dict:
    """A group room of the creator and ``usernames``. Returns the room."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100:
        raise Invalid('name: 1 to 100 characters')
    if not isinstance(usernames, list) or not all(
            isinstance(u, str) for u in usernames):
        raise Invalid('members must be a list of usernames')
    wanted = list(dict.fromkeys(check_username(u) for u in usernames))
    if len(wanted) + 1 > ctx.config.group_max_members:
        raise Invalid(f'a group has at most '
                      f'{ctx.config.group_max_members} members')
    found = await ctx.store.read(_find_users, wanted)
    missing = [u for u in wanted if u not in found]
    if missing:
        raise NotFound(f'no such user: {", ".join(missing)}')
    member_ids = [user_id] + [found[u] for u in wanted if found[u] != user_id]
    return await ctx.store.write(_create_group, ctx, user_id, name.strip(),
                                 member_ids)


def _read_markers(room_id):
    return {str(u): s for u, s in Membership.select(
        Membership.user, Membership.last_read_seq)
        .where(Membership.room == room_id).tuples()}


async def read_markers(ctx, room_id) -> dict:
    """{user_id (as a string key): last_read_seq} of every member."""
    return await ctx.store.read(_read_markers, room_id)


def _inbox(ctx, user_id):
    rows = list(Membership.select(Membership.room, Membership.last_read_seq,
                                  Room.last_seq, Room.last_activity_at)
                .join(Room).where(Membership.user == user_id)
                .order_by(Room.last_activity_at.desc(), Room.id.desc())
                .tuples())
    if not rows:
        return []
    room_ids = [r[0] for r in rows]
    latest = (Message.select(peewee.fn.MAX(Message.seq).alias('seq'),
                             Message.room)
              .where(Message.room.in_(room_ids)).group_by(Message.room))
    last_messages = {}
    pairs = [(room_id, seq) for seq, room_id in latest.tuples()]
    if pairs:
        cond = functools.reduce(operator.or_, [
            (Message.room == r) & (Message.seq == s) for r, s in pairs])
        for msg in message_dicts(ctx, Message.select().where(cond)):
            last_messages[msg['room_id']] = msg
    unread = dict(
        Message.select(Message.room, peewee.fn.COUNT(Message.id))
        .join(Membership, on=((Membership.room == Message.room) &
                              (Membership.user == user_id)))
        .where(Message.seq > Membership.last_read_seq,
               Message.sender != user_id,
               Message.deleted == False)  # noqa: E712
        .group_by(Message.room).tuples())
    result = []
    for room_id, last_read, last_seq, _ in rows:
        info = ctx.rooms.get(room_id) or _load_room(room_id)
        ctx.rooms[room_id] = info
        result.append({'room': room_dict(ctx, info, last_seq),
                       'last_message': last_messages.get(room_id),
                       'unread': unread.get(room_id, 0),
                       'last_read_seq': last_read})
    return result


async def inbox(ctx, user_id) -> list:
    """The user's rooms, latest activity first, each with its last message,
    unread count and the user's read marker."""
    return await ctx.store.read(_inbox, ctx, user_id)


def _rooms_sharing(user_id):
    mine = Membership.select(Membership.room).where(Membership.user == user_id)
    return {u for (u,) in Membership.select(Membership.user).distinct()
            .where(Membership.room.in_(mine)).tuples()}


async def contacts(ctx, user_id) -> set:
    """Ids of the users who share a room with ``user_id`` (itself included)."""
    return await ctx.store.read(_rooms_sharing, user_id)


def _block(blocker_id, blocked_id, on):
    if on:
        (Block.insert(blocker=blocker_id, blocked=blocked_id,
                      created_at=now_ms())
         .on_conflict_ignore().execute())
    else:
        Block.delete().where(Block.blocker == blocker_id,
                             Block.blocked == blocked_id).execute()


async def set_block(ctx, user_id, username, on: bool):
    """Block (or unblock) ``username`` for dms. Idempotent."""
    other_id = await find_user_id(ctx, username)
    if other_id == user_id:
        raise Invalid('you cannot block yourself')
    await ctx.store.write(_block, user_id, other_id, on)


def _blocks_of(ctx, user_id):
    rows = list(Block.select(Block.blocked, Block.created_at)
                .where(Block.blocker == user_id)
                .order_by(Block.created_at.desc(), Block.id.desc())
                .tuples())
    users = load_users(ctx, [blocked for blocked, _ in rows])
    return [{'user': users[blocked], 'created_at': iso(created_at)}
            for blocked, created_at in rows if blocked in users]


async def list_blocks(ctx, user_id) -> list:
    """The users ``user_id`` blocks, newest block first: a list of
    ``{user, created_at}``. Only the caller's own blocks, so it needs no
    other check."""
    return await ctx.store.read(_blocks_of, ctx, user_id)
