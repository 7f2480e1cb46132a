"""The SQL of the inbox: a user's rooms in activity order, their last
messages and unread counts, each one set-based query whatever the number
of rooms."""
from server.data.database import execute, placeholders
from server.services.serialize import MESSAGE_COLUMNS, MessageRow


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
