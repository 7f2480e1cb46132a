"""Rooms: dms between two users, groups (and their life cycle),
membership checks and the inbox."""
import dataclasses
import json

import peewee

from models import Block, Departure, Event, Membership, Room, User
from server.errors import Forbidden, Invalid, NotFound, TooLarge
from server.services import outbox
from server.services.auth import check_username
from server.services.context import now_ms
from server.services.limits import check_room_quota
from server.services.serialize import (MESSAGE_COLUMNS, MessageRow, iso,
                                       load_users, message_dicts,
                                       placeholders)
from server.store import execute, is_sqlite


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


def _load_room(room_id):
    room = Room.get_or_none(Room.id == room_id)
    if room is None:
        return None
    members = [m for (m,) in Membership.select(Membership.user)
               .where(Membership.room == room_id)
               .order_by(Membership.id).tuples()]
    return RoomInfo(room.id, room.kind, room.name, room.created_at,
                    tuple(members), room.owner_id)


def forget_room(ctx, room_id):
    """A group's members, owner or name changed: drop it from this
    process's cache. The epoch makes a load that was already under way
    (and may have read the old members) not cache its answer."""
    ctx.rooms.forget(room_id)


async def room_info(ctx, room_id) -> RoomInfo:
    info = ctx.rooms.get(room_id)
    if info is None:
        epoch = ctx.rooms.epoch
        info = await ctx.store.read(_load_room, room_id)
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
    """The id of ``username``; NotFound if there is no such user. Cached
    per process: a username never changes and users are never deleted."""
    username = check_username(username)
    user_id = ctx.user_ids.get(username)
    if user_id is None:
        user_id = await ctx.store.read(_find_user, username)
        if user_id is None:
            raise NotFound(f'no user {username!r}')
        ctx.user_ids.put(username, user_id)
    return user_id


def is_blocked(blocker_id, blocked_id) -> bool:
    return (Block.select().where(Block.blocker == blocker_id,
                                 Block.blocked == blocked_id).exists())


def dm_blocked(ctx, room_id, user_id) -> bool:
    """Whether ``room_id`` is a dm whose other member blocks ``user_id``.
    Runs on a database thread."""
    info = ctx.rooms.get(room_id) or _load_room(room_id)
    return (info is not None and info.kind == 'dm' and
            is_blocked(info.other_member(user_id), user_id))


async def check_not_blocked(ctx, info: RoomInfo, user_id):
    """Forbidden if ``info`` is a dm whose other member blocks
    ``user_id``: while blocked, nothing of theirs reaches the blocker
    there (messages, reactions, typing). Groups are unaffected."""
    if info.kind == 'dm' and await ctx.store.read(
            is_blocked, info.other_member(user_id), user_id):
        raise Forbidden('this user does not accept anything from you')


def _find_dm(key):
    return Room.select(Room.id).where(Room.dm_key == key).scalar()


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
    if is_blocked(info.other_member(user_id), user_id):
        raise Forbidden('this user does not accept your messages')
    return room_dict(ctx, info, _last_seq(info.id))


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
    yourself) or Forbidden (the other user blocks you). An existing dm
    is one read; only a new one goes through the writer."""
    other_id = await _other_user(ctx, user_id, username)
    room_id = await _dm_id(ctx, user_id, other_id)
    if room_id is None:
        return await _create_dm(ctx, user_id, other_id)
    info = await room_info(ctx, room_id)
    return await ctx.store.read(_dm_payload, ctx, info, user_id), False


def _create_group(ctx, user_id, name, member_ids, names):
    check_room_quota(ctx, user_id)
    _check_can_add(ctx, user_id, member_ids[1:], names)
    now = now_ms()
    room = Room.create(kind='group', name=name, created_by=user_id,
                       owner=user_id, created_at=now, last_activity_at=now)
    Membership.insert_many([{'room': room.id, 'user': u, 'joined_at': now}
                            for u in member_ids]).execute()
    info = RoomInfo(room.id, 'group', name, now, tuple(member_ids), user_id)
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
    names = {found[u]: u for u in wanted}
    return await ctx.store.write(_create_group, ctx, user_id, name.strip(),
                                 member_ids, names)


def _read_markers(room_id):
    return {str(u): s for u, s in Membership.select(
        Membership.user, Membership.last_read_seq)
        .where(Membership.room == room_id).tuples()}


async def read_markers(ctx, room_id) -> dict:
    """{user_id (as a string key): last_read_seq} of every member."""
    return await ctx.store.read(_read_markers, room_id)


def _inbox_rows(user_id, limit, before):
    """(room id, last_read_seq, last_seq, last_activity_at, muted) of the
    user's rooms, latest activity first: at most ``limit`` (None: all)
    after the cursor ``before`` (a (last_activity_at, room id) pair or None)."""
    where, params = '"mb"."user_id" = ?', [user_id]
    if before is not None:
        where += (' AND ("r"."last_activity_at" < ? OR '
                  '("r"."last_activity_at" = ? AND "r"."id" < ?))')
        params += [before[0], before[0], before[1]]
    tail = ''
    if limit is not None:
        tail, params = ' LIMIT ?', params + [limit]
    return execute(
        'SELECT "r"."id", "mb"."last_read_seq", "r"."last_seq", '
        '"r"."last_activity_at", "mb"."muted" FROM "membership" AS "mb" '
        'JOIN "room" AS "r" ON "r"."id" = "mb"."room_id" '
        f'WHERE {where} ORDER BY "r"."last_activity_at" DESC, '
        f'"r"."id" DESC{tail}', params).fetchall()


def _last_messages(ctx, user_id, room_ids):
    """{room id: the dict of its latest message} for the user's rooms (all
    of them when ``room_ids`` is None). One query for the rows: each room's
    latest message is one probe of the end of its (room, seq) index."""
    where, params = '"mb"."user_id" = ?', [user_id]
    if room_ids is not None:
        where += f' AND "mb"."room_id" IN ({placeholders(room_ids)})'
        params += room_ids
    columns = ', '.join(f'"m".{c}' for c in MESSAGE_COLUMNS.split(', '))
    rows = [MessageRow(*row) for row in execute(
        f'SELECT {columns} FROM "membership" AS "mb" '
        'JOIN "message" AS "m" ON "m"."id" = (SELECT "id" FROM "message" '
        'WHERE "room_id" = "mb"."room_id" ORDER BY "seq" DESC LIMIT 1) '
        f'WHERE {where}', params).fetchall()]
    found = {}
    for start in range(0, len(rows), INBOX_CHUNK):
        for message in message_dicts(ctx, rows[start:start + INBOX_CHUNK]):
            found[message['room_id']] = message
    return found


def _unread_counts(user_id, room_ids):
    """{room id: unread count}, counted only in the rooms whose last seq is
    past the user's read marker (all of the user's rooms when ``room_ids``
    is None), in one grouped query."""
    where, params = '"mb"."user_id" = ?', [user_id, user_id]
    if room_ids is not None:
        where += f' AND "mb"."room_id" IN ({placeholders(room_ids)})'
        params += room_ids
    return dict(execute(
        'SELECT "m"."room_id", COUNT(*) FROM "membership" AS "mb" '
        'JOIN "room" AS "r" ON "r"."id" = "mb"."room_id" '
        'AND "r"."last_seq" > "mb"."last_read_seq" '
        'JOIN "message" AS "m" ON "m"."room_id" = "mb"."room_id" '
        'AND "m"."seq" > "mb"."last_read_seq" '
        'WHERE "m"."sender_id" != ? AND NOT "m"."deleted" '
        f'AND {where} GROUP BY "m"."room_id"', params).fetchall())


def _room_infos(ctx, room_ids, groups_fresh=False) -> dict:
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
        chunk = missing[start:start + INBOX_CHUNK]
        marks = placeholders(chunk)
        members = {}
        for room_id, user_id in execute(
                'SELECT "room_id", "user_id" FROM "membership" WHERE '
                f'"room_id" IN ({marks}) ORDER BY "id"', chunk).fetchall():
            members.setdefault(room_id, []).append(user_id)
        # Plain rows: Peewee's model objects cost ten times the query.
        for room_id, kind, name, created_at, owner_id in execute(
                'SELECT "id", "kind", "name", "created_at", "owner_id" '
                f'FROM "room" WHERE "id" IN ({marks})', chunk).fetchall():
            info = RoomInfo(room_id, kind, name, created_at,
                            tuple(members.get(room_id, ())), owner_id)
            infos[room_id] = info
            # Not cached if a group changed since this read began: it may
            # have read the old members (see forget_room).
            if ctx.rooms.epoch == epoch:
                ctx.rooms[room_id] = info
    return infos


# Rooms per query when the inbox reads a list of rooms by id.
INBOX_CHUNK = 500
# Largest page of the inbox a client may ask for.
INBOX_PAGE_MAX = 500


def _inbox(ctx, user_id, limit=None, before=None):
    """The inbox as ``inbox`` returns it. A few set-based queries whatever
    the number of rooms: the page of rooms, then, for the rooms that
    changed since this process last built their entry (``ctx.inbox_rooms``,
    ``ctx.inbox_unread``: checked against the last_seq and read marker
    just read), their last messages, unread counts, and the rooms and
    users not cached yet."""
    rows = _inbox_rows(user_id, None if limit is None else limit + 1,
                       before)
    has_more = limit is not None and len(rows) > limit
    rows = rows[:limit] if has_more else rows
    answer = {'rooms': [], 'has_more': has_more}
    if not rows:
        return answer
    cached, changed = {}, []
    for room_id, _, last_seq, *_ in rows:
        entry = ctx.inbox_rooms.get(room_id)
        if entry is not None and entry[0] == last_seq:
            cached[room_id] = entry
        else:
            changed.append(room_id)
    if changed:
        # All of them: join on the membership instead of binding
        # thousands of ids.
        ids = None if len(changed) == len(rows) and limit is None and \
            before is None else changed
        last_messages = _last_messages(ctx, user_id, ids)
        infos = _room_infos(ctx, changed, groups_fresh=True)
        load_users(ctx, {m for info in infos.values()
                         for m in info.member_ids})
        for room_id, _, last_seq, *_ in rows:
            if room_id not in cached:
                cached[room_id] = entry = (
                    last_seq, room_dict(ctx, infos[room_id], last_seq),
                    last_messages.get(room_id))
                ctx.inbox_rooms.put(room_id, entry)
    unread, count = {}, []
    for room_id, last_read, last_seq, *_ in rows:
        if last_seq > last_read:
            known = ctx.inbox_unread.get((room_id, user_id))
            if known is not None and known[:2] == (last_read, last_seq):
                unread[room_id] = known[2]
            else:
                count.append(room_id)
    if count:
        counted = _unread_counts(user_id, count)
        wanted = set(count)
        for room_id, last_read, last_seq, *_ in rows:
            if room_id in wanted:
                unread[room_id] = counted.get(room_id, 0)
                ctx.inbox_unread.put((room_id, user_id),
                                     (last_read, last_seq, unread[room_id]))
    for room_id, last_read, last_seq, _, muted in rows:
        _, room, last_message = cached[room_id]
        answer['rooms'].append({
            'room': room,
            'last_message': last_message,
            'unread': unread.get(room_id, 0),
            'last_read_seq': last_read,
            'muted': bool(muted)})
    if has_more:
        answer['next_before'] = f'{rows[-1][3]}.{rows[-1][0]}'
    return answer


def _inbox_cursor(before):
    """The (last_activity_at, room id) of a ``next_before`` cursor."""
    try:
        activity, room_id = (int(part) for part in before.split('.'))
    except (AttributeError, ValueError):
        raise Invalid('before: a next_before value of an earlier page') \
            from None
    if not (0 <= activity < 2**63 and 0 <= room_id < 2**63):
        raise Invalid('before: a next_before value of an earlier page')
    return activity, room_id


async def inbox(ctx, user_id, limit=None, before=None) -> dict:
    """``{rooms, has_more, next_before?}``: the user's rooms, latest
    activity first, each ``{room, last_message, unread, last_read_seq}``.
    Without ``limit`` every room (``has_more`` false); with it at most
    ``limit`` (1 to INBOX_PAGE_MAX) rooms after the cursor ``before``
    (the opaque ``next_before`` string of the previous page, present when
    ``has_more``). The cursor is a point in the activity order, not a
    room, so a room whose activity moves it to the top during paging is
    not listed twice (the client gets its ``message`` live anyway)."""
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or \
                not 1 <= limit <= INBOX_PAGE_MAX:
            raise Invalid(f'limit: 1 to {INBOX_PAGE_MAX}')
    if before is not None:
        before = _inbox_cursor(before)
    return await ctx.store.read(_inbox, ctx, user_id, limit, before)


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


# -- the group life cycle ----------------------------------------------
#
# add_members, remove_member, leave_group and rename_group each change a
# group in the writer's transaction and take the room's next seq there,
# with an event of kind 'room' holding the room's state after the change
# (what ``sync`` replays). Every check is made again inside the
# transaction, after the room's row is locked, so two processes changing
# one group at once cannot both pass a check that only one may.


@dataclasses.dataclass
class GroupChange:
    """Outcome of a group function: the room after it (``last_seq`` is the
    change's seq), whether anything changed (a no-op takes no seq and
    sends nothing), and the users who are no longer members."""
    room: dict
    changed: bool
    left_ids: tuple = ()


def _lock_group(user_id, room_id):
    """The group ``room_id``, its row locked for the rest of the
    transaction (PostgreSQL; SQLite's writer holds the write lock
    already), if ``user_id`` is a member. Raises NotFound, Forbidden (not
    a member) or Invalid (a dm)."""
    if not is_sqlite(Room._meta.database.obj):
        execute('SELECT 1 FROM "room" WHERE "id" = ? FOR UPDATE',
                (room_id,))
    room = Room.get_or_none(Room.id == room_id)
    if room is None:
        raise NotFound('no such room')
    if not Membership.select().where(Membership.room == room_id,
                                     Membership.user == user_id).exists():
        raise Forbidden('you are not a member of this room')
    if room.kind != 'group':
        raise Invalid('a dm cannot be changed')
    return room


def _member_ids(room_id) -> list:
    return [m for (m,) in Membership.select(Membership.user)
            .where(Membership.room == room_id)
            .order_by(Membership.id).tuples()]


def _check_can_add(ctx, user_id, new_ids, names):
    """Refuse adding ``new_ids`` (by ``user_id``) when one of them blocks
    ``user_id`` (Forbidden) or is already in ``rooms_per_user_max`` rooms
    (Forbidden, naming them: the room limit of each added user applies to
    them). One query each, on the (blocker, blocked) and (user, room)
    indexes."""
    if not new_ids:
        return
    marks = placeholders(new_ids)
    blockers = [b for (b,) in execute(
        f'SELECT "blocker_id" FROM "block" WHERE "blocker_id" IN ({marks}) '
        'AND "blocked_id" = ?', [*new_ids, user_id]).fetchall()]
    if blockers:
        raise Forbidden(f'{names.get(blockers[0], "a user")} does not '
                        f'accept your messages')
    limit = ctx.config.rooms_per_user_max
    full = [u for u, n in execute(
        'SELECT "user_id", COUNT(*) FROM "membership" WHERE "user_id" IN '
        f'({marks}) GROUP BY "user_id"', new_ids).fetchall() if n >= limit]
    if full:
        raise Forbidden(f'{names.get(full[0], "a user")} is in {limit} '
                        f'rooms, the most allowed')


def _record_change(ctx, room_id, left_ids=()) -> GroupChange:
    """Take the room's next seq for a change just made, log it as a 'room'
    event with the room's state, and remember departures for sync."""
    now = now_ms()
    seq = execute('UPDATE "room" SET "last_seq" = "last_seq" + 1, '
                  '"last_activity_at" = ? WHERE "id" = ? '
                  'RETURNING "last_seq"', (now, room_id)).fetchone()[0]
    room = Room.get_by_id(room_id)
    members = _member_ids(room_id)
    Event.insert(room=room_id, seq=seq, kind='room', data=json.dumps({
        'name': room.name, 'owner_id': room.owner_id, 'members': members,
        'created_at': room.created_at})).execute()
    if left_ids:
        Departure.delete().where(Departure.room == room_id,
                                 Departure.user.in_(left_ids)).execute()
        Departure.insert_many([{'user': u, 'room': room_id, 'seq': seq}
                               for u in left_ids]).execute()
    # Bot webhooks: the members get the room, those who left room_left.
    outbox.queue_event(ctx, room_id, seq, 'room')
    outbox.queue_event(ctx, room_id, seq, 'room_left', bot_ids=left_ids)
    info = RoomInfo(room_id, 'group', room.name, room.created_at,
                    tuple(members), room.owner_id)
    return GroupChange(room_dict(ctx, info, seq), True, tuple(left_ids))


def _unchanged(ctx, room) -> GroupChange:
    info = _load_room(room.id)
    return GroupChange(room_dict(ctx, info, room.last_seq), False)


def _add_members(ctx, user_id, room_id, new_ids, names):
    room = _lock_group(user_id, room_id)
    members = _member_ids(room_id)
    new_ids = [u for u in new_ids if u not in members]
    if not new_ids:
        return _unchanged(ctx, room)  # all of them are in already
    limit = ctx.config.group_max_members
    if len(members) + len(new_ids) > limit:
        raise TooLarge(f'a group has at most {limit} members')
    _check_can_add(ctx, user_id, new_ids, names)
    # Added people start with everything before their arrival read.
    now = now_ms()
    Membership.insert_many([
        {'room': room_id, 'user': u, 'joined_at': now,
         'last_read_seq': room.last_seq + 1} for u in new_ids]).execute()
    Departure.delete().where(Departure.room == room_id,
                             Departure.user.in_(new_ids)).execute()
    return _record_change(ctx, room_id)


def _remove_member(ctx, user_id, room_id, target_id):
    room = _lock_group(user_id, room_id)
    if target_id == user_id:
        return _leave_group(ctx, user_id, room_id)
    if room.owner_id != user_id:
        raise Forbidden('only the owner can remove members')
    removed = (Membership.delete().where(Membership.room == room_id,
                                         Membership.user == target_id)
               .execute())
    if not removed:
        raise NotFound('that user is not a member of this room')
    return _record_change(ctx, room_id, (target_id,))


def _leave_group(ctx, user_id, room_id):
    room = _lock_group(user_id, room_id)
    Membership.delete().where(Membership.room == room_id,
                              Membership.user == user_id).execute()
    if room.owner_id == user_id or room.owner_id is None:
        # Ownership passes to the longest-standing member (none left: the
        # group stays, empty and unowned, seen by no one).
        heir = next(iter(_member_ids(room_id)), None)
        Room.update(owner=heir).where(Room.id == room_id).execute()
    return _record_change(ctx, room_id, (user_id,))


def _rename_group(ctx, user_id, room_id, name):
    room = _lock_group(user_id, room_id)
    if room.owner_id != user_id:
        raise Forbidden('only the owner can rename the group')
    if room.name == name:
        return _unchanged(ctx, room)
    Room.update(name=name).where(Room.id == room_id).execute()
    return _record_change(ctx, room_id)


def _check_room_id(room_id):
    if isinstance(room_id, bool) or not isinstance(room_id, int):
        raise Invalid('room_id must be an integer')
    if not 0 < room_id < 2**63:
        raise NotFound('no such room')
    return room_id


def _check_name(name) -> str:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100:
        raise Invalid('name: 1 to 100 characters')
    return name.strip()


async def _changed(ctx, room_id, change: GroupChange) -> GroupChange:
    if change.changed:
        forget_room(ctx, room_id)
    return change


async def add_members(ctx, user_id, room_id, usernames) -> GroupChange:
    """Add ``usernames`` to a group ``user_id`` is in (any member may).
    People already in are skipped; if that is everyone nothing changes.
    Raises NotFound (room or user), Forbidden (not a member; an added
    user blocks you or is in ``rooms_per_user_max`` rooms already),
    Invalid (a dm, bad payload) or TooLarge (past ``group_max_members``)."""
    room_id = _check_room_id(room_id)
    if not isinstance(usernames, list) or not usernames or not all(
            isinstance(u, str) for u in usernames):
        raise Invalid('members must be a non-empty list of usernames')
    wanted = list(dict.fromkeys(check_username(u) for u in usernames))
    if len(wanted) > ctx.config.group_max_members:
        raise TooLarge(f'a group has at most '
                       f'{ctx.config.group_max_members} members')
    found = await ctx.store.read(_find_users, wanted)
    missing = [u for u in wanted if u not in found]
    if missing:
        raise NotFound(f'no such user: {", ".join(missing)}')
    names = {found[u]: u for u in wanted}
    return await _changed(ctx, room_id, await ctx.store.write(
        _add_members, ctx, user_id, room_id, [found[u] for u in wanted],
        names))


async def remove_member(ctx, user_id, room_id, username) -> GroupChange:
    """Remove ``username`` from a group (owner only; removing yourself is
    leaving). Raises NotFound, Forbidden or Invalid (a dm)."""
    room_id = _check_room_id(room_id)
    target_id = await find_user_id(ctx, username)
    return await _changed(ctx, room_id, await ctx.store.write(
        _remove_member, ctx, user_id, room_id, target_id))


async def leave_group(ctx, user_id, room_id) -> GroupChange:
    """Leave a group. The owner leaving passes ownership to the
    longest-standing member. Raises NotFound, Forbidden or Invalid."""
    room_id = _check_room_id(room_id)
    return await _changed(ctx, room_id, await ctx.store.write(
        _leave_group, ctx, user_id, room_id))


async def rename_group(ctx, user_id, room_id, name) -> GroupChange:
    """Rename a group (owner only). The same name again changes nothing."""
    room_id = _check_room_id(room_id)
    name = _check_name(name)
    return await _changed(ctx, room_id, await ctx.store.write(
        _rename_group, ctx, user_id, room_id, name))
