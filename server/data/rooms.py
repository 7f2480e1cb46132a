"""The SQL of rooms: the rows the room cache loads, dms and blocks,
read markers and contacts (the rules are ``server.services.rooms``), and
the inbox's queries: a user's rooms in activity order, their last
messages and unread counts, each one set-based query whatever the number
of rooms (``server.services.inbox``)."""
import peewee

from models import Block, Membership, Room, User
from server.data.database import execute, placeholders
from server.data.rows import MESSAGE_COLUMNS, MessageRow


# -- rooms, dms and blocks ---------------------------------------------------

def room_rows(room_ids) -> list:
    """(id, kind, name, created_at, owner_id) of those of ``room_ids`` that
    exist. Plain rows: Peewee's model objects cost ten times the query."""
    return execute('SELECT "id", "kind", "name", "created_at", "owner_id" '
                   f'FROM "room" WHERE "id" IN ({placeholders(room_ids)})',
                   list(room_ids)).fetchall()


def members_of(room_ids) -> dict:
    """{room id: [member ids, longest-standing first]} of those of
    ``room_ids`` with members."""
    members = {}
    if not room_ids:
        return members
    for room_id, user_id in execute(
            'SELECT "room_id", "user_id" FROM "membership" WHERE '
            f'"room_id" IN ({placeholders(room_ids)}) ORDER BY "id"',
            list(room_ids)).fetchall():
        members.setdefault(room_id, []).append(user_id)
    return members


def last_seq(room_id) -> int:
    """The room's last seq (0 if it has none or does not exist)."""
    return Room.select(Room.last_seq).where(Room.id == room_id).scalar() or 0


def user_id(username):
    """The id of ``username``, or None."""
    return User.select(User.id).where(User.username == username).scalar()


def is_blocked(blocker_id, blocked_id) -> bool:
    return (Block.select().where(Block.blocker == blocker_id,
                                 Block.blocked == blocked_id).exists())


def blocks_between(a, b) -> set:
    """The (blocker, blocked) pairs between users ``a`` and ``b``, either
    way."""
    return set(Block.select(Block.blocker, Block.blocked).where(
        ((Block.blocker == a) & (Block.blocked == b)) |
        ((Block.blocker == b) & (Block.blocked == a))).tuples())


def dm(key):
    """(id, last_seq) of the dm room with this ``dm_key``, or None."""
    return (Room.select(Room.id, Room.last_seq).where(Room.dm_key == key)
            .tuples().first())


def create_dm(key, user_ids, created_by, now):
    """A new dm room of ``user_ids`` in a savepoint of its own: its id, or
    None if the key is taken (another process opened it first)."""
    try:
        with Room._meta.database.atomic():
            room = Room.create(kind='dm', dm_key=key, created_by=created_by,
                               created_at=now, last_activity_at=now)
            Membership.insert_many([{'room': room.id, 'user': u,
                                     'joined_at': now}
                                    for u in user_ids]).execute()
    except peewee.IntegrityError:
        return None
    return room.id


def read_markers(room_id) -> dict:
    """{user id: last_read_seq} of every member."""
    return dict(Membership.select(Membership.user, Membership.last_read_seq)
                .where(Membership.room == room_id).tuples())


def contacts(user_id) -> set:
    """Ids of the users who share a room with ``user_id`` (itself
    included)."""
    mine = Membership.select(Membership.room).where(Membership.user == user_id)
    return {u for (u,) in Membership.select(Membership.user).distinct()
            .where(Membership.room.in_(mine)).tuples()}


def add_block(blocker_id, blocked_id, now):
    """Idempotent."""
    (Block.insert(blocker=blocker_id, blocked=blocked_id, created_at=now)
     .on_conflict_ignore().execute())


def remove_block(blocker_id, blocked_id):
    Block.delete().where(Block.blocker == blocker_id,
                         Block.blocked == blocked_id).execute()


def blocks_of(user_id) -> list:
    """(blocked id, created_at) of the user's blocks, newest first."""
    return list(Block.select(Block.blocked, Block.created_at)
                .where(Block.blocker == user_id)
                .order_by(Block.created_at.desc(), Block.id.desc())
                .tuples())


# -- the inbox ---------------------------------------------------------------


def inbox_rows(user_id, limit, before) -> list:
    """(room id, last_read_seq, last_seq, last_activity_at, muted) of the
    user's rooms, latest activity first: at most ``limit`` (None: all)
    after the cursor ``before`` (a (last_activity_at, room id) pair or
    None)."""
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


def _of_rooms(user_id, room_ids, params=None):
    """The WHERE clause and parameters for the user's memberships (only
    those of ``room_ids`` unless it is None)."""
    where, params = '"mb"."user_id" = ?', (params or [user_id])
    if room_ids is not None:
        where += f' AND "mb"."room_id" IN ({placeholders(room_ids)})'
        params = params + list(room_ids)
    return where, params


def last_messages(user_id, room_ids) -> list:
    """The MessageRow of the latest message of each of the user's rooms
    (all of them when ``room_ids`` is None): each one probe of the end of
    its room's (room, seq) index."""
    where, params = _of_rooms(user_id, room_ids)
    columns = ', '.join(f'"m".{c}' for c in MESSAGE_COLUMNS.split(', '))
    return [MessageRow(*row) for row in execute(
        f'SELECT {columns} FROM "membership" AS "mb" '
        'JOIN "message" AS "m" ON "m"."id" = (SELECT "id" FROM "message" '
        'WHERE "room_id" = "mb"."room_id" ORDER BY "seq" DESC LIMIT 1) '
        f'WHERE {where}', params).fetchall()]


def unread_counts(user_id, room_ids) -> dict:
    """{room id: unread count}, counted only in the rooms whose last seq is
    past the user's read marker (all of the user's rooms when ``room_ids``
    is None), in one grouped query."""
    where, params = _of_rooms(user_id, room_ids, [user_id, user_id])
    return dict(execute(
        'SELECT "m"."room_id", COUNT(*) FROM "membership" AS "mb" '
        'JOIN "room" AS "r" ON "r"."id" = "mb"."room_id" '
        'AND "r"."last_seq" > "mb"."last_read_seq" '
        'JOIN "message" AS "m" ON "m"."room_id" = "mb"."room_id" '
        'AND "m"."seq" > "mb"."last_read_seq" '
        'WHERE "m"."sender_id" != ? AND NOT "m"."deleted" '
        f'AND {where} GROUP BY "m"."room_id"', params).fetchall())
