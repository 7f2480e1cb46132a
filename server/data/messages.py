"""The SQL of messages and the room event log: the batched send's reads
and inserts, a message's change events, reactions, history, read markers
and catch-up. Every function runs inside the writer's transaction or on a
reader thread; none decides what is allowed (``server.services.messages``
does)."""
import peewee

from models import Attachment, Event, Membership, Message, Reaction, Room
from server.data.database import chunks, dialect, execute, placeholders
from server.data.rows import fetch_messages


# -- the batched send --------------------------------------------------------

def _join_pairs(sql, pairs) -> list:
    """The rows of ``sql``, which joins ``"k"("a", "b") AS (VALUES
    {values})``, over ``pairs``, one query per chunk. A join with a VALUES
    list, since SQLite does not use a unique index for a row-value IN."""
    rows = []
    for chunk in chunks(list(pairs)):
        values = ', '.join(['(?, ?)'] * len(chunk))
        rows.extend(execute(sql.format(values=values),
                            [v for pair in chunk for v in pair]).fetchall())
    return rows


def stored_ids(keys) -> dict:
    """{(sender_id, client_msg_id): message id} of the keys already
    stored."""
    return {(s, c): i for i, s, c in _join_pairs(
        'WITH "k"("a", "b") AS (VALUES {values}) '
        'SELECT "m"."id", "m"."sender_id", "m"."client_msg_id" '
        'FROM "k" JOIN "message" AS "m" ON "m"."sender_id" = "k"."a" '
        'AND "m"."client_msg_id" = "k"."b"', keys)}


def memberships(pairs) -> set:
    """The (room_id, user_id) pairs that are memberships, on the unique
    (room, user) index."""
    return set(_join_pairs(
        'WITH "k"("a", "b") AS (VALUES {values}) '
        'SELECT "mb"."room_id", "mb"."user_id" FROM "k" '
        'JOIN "membership" AS "mb" ON "mb"."room_id" = "k"."a" '
        'AND "mb"."user_id" = "k"."b"', pairs))


def _select_in(sql, ids) -> list:
    """The rows of ``sql`` (its IN list written ``{marks}``) over ``ids``,
    one query per chunk."""
    rows = []
    for chunk in chunks(sorted(ids)):
        rows.extend(execute(sql.format(marks=placeholders(chunk)),
                            chunk).fetchall())
    return rows


def blocks_by(blocker_ids) -> set:
    """The (blocker_id, blocked_id) pairs of blocks made by these users."""
    return set(_select_in('SELECT "blocker_id", "blocked_id" FROM "block" '
                          'WHERE "blocker_id" IN ({marks})', blocker_ids))


def rooms_of(message_ids) -> dict:
    """{message id: its room id} of the given messages that exist."""
    return dict(_select_in('SELECT "id", "room_id" FROM "message" '
                           'WHERE "id" IN ({marks})', message_ids))


def unsent_uploads(attachment_ids) -> dict:
    """{attachment id: uploader id} of the given uploads not sent yet."""
    return dict(_select_in('SELECT "id", "uploader_id" FROM "attachment" '
                           'WHERE "id" IN ({marks}) AND "message_id" IS NULL',
                           attachment_ids))


def lock_rooms(room_ids):
    """Lock the rooms' rows (in id order) until the commit, where rows
    have locks (PostgreSQL; SQLite's writer holds the whole database)."""
    dialect().lock_rows('room', room_ids)


def take_seqs(counts, now) -> dict:
    """Add ``counts[room_id]`` to each room's last_seq (rooms in id order,
    so two processes lock them in the same order); {room_id: new
    last_seq}."""
    return dialect().take_seqs(counts, now)


def insert_messages(rows) -> dict:
    """Insert new messages, each row (room_id, seq, sender_id, body,
    client_msg_id, reply_to, created_at) with its searchable text;
    {(room_id, seq): message id}. A new message has no row in the event
    log: its seq is its own (``events_after`` reads it from here)."""
    ids = {}
    for chunk in chunks(rows):
        sql = ('INSERT INTO "message" ("room_id", "seq", "sender_id", '
               '"body", "client_msg_id", "reply_to", "created_at", '
               '"deleted", "update_seq") VALUES '
               + ', '.join(['(?, ?, ?, ?, ?, ?, ?, ?, ?)'] * len(chunk)))
        params = []
        for row in chunk:  # and "deleted" false, "update_seq" the seq
            params.extend(row)
            params.append(False)
            params.append(row[1])
        ids.update(dialect().insert_returning_keys(
            sql, params, [(row[0], row[1]) for row in chunk]))
    dialect().insert_texts([(row[0], ids[row[0], row[1]], row[3])
                            for row in rows])
    return ids


def attach_uploads(wanted) -> dict:
    """Tie uploads to their messages (``{message id: [attachment id]}``);
    ``{message id: [attachment row]}``, in upload order. Raises
    IntegrityError if one was sent meanwhile by another process
    (PostgreSQL): the writer then runs the sends again one by one."""
    pairs = [(message_id, a) for message_id, attachment_ids in wanted.items()
             for a in attachment_ids]
    for chunk in chunks(pairs):
        taken = execute(
            'UPDATE "attachment" SET "message_id" = CASE "id" '
            + ' '.join(['WHEN ? THEN ?'] * len(chunk)) +
            f' END WHERE "id" IN ({placeholders(chunk)}) AND '
            '"message_id" IS NULL',
            [v for m, a in chunk for v in (a, m)] + [a for _, a in chunk]
        ).rowcount
        if taken != len(chunk):
            raise peewee.IntegrityError('attachment already sent')
    if not pairs:
        return {}
    rows = {a.id: a for a in Attachment.select().where(
        Attachment.id.in_([a for _, a in pairs]))}
    return {message_id: [rows[a] for a in sorted(attachment_ids)]
            for message_id, attachment_ids in wanted.items()}


# -- changes to a message ----------------------------------------------------

def get_message(message_id):
    return Message.get_by_id(message_id)


def member_message(user_id, message_id):
    """The message, if it exists in a room ``user_id`` is in; else None.
    For a change to it: its room is locked first (PostgreSQL), so a
    removal committing on another process meanwhile is seen."""
    message = Message.get_or_none(Message.id == message_id)
    if message is not None:
        lock_rooms([message.room_id])
    if message is None or not Membership.select().where(
            Membership.room == message.room_id,
            Membership.user == user_id).exists():
        return None
    return message


def next_seq(room_id) -> int:
    """Take the room's next seq."""
    return execute('UPDATE "room" SET "last_seq" = "last_seq" + 1 '
                   'WHERE "id" = ? RETURNING "last_seq"',
                   (room_id,)).fetchone()[0]


def save_change(message, kind='message_updated') -> int:
    """Store a changed message under the room's next seq, with its event;
    the seq."""
    seq = next_seq(message.room_id)
    message.update_seq = seq
    message.save()
    Event.insert(room=message.room_id, seq=seq, kind=kind,
                 message=message.id).execute()
    return seq


def reactions_on(message_id) -> list:
    """(user_id, emoji) of the message's reactions."""
    return list(Reaction.select(Reaction.user, Reaction.emoji)
                .where(Reaction.message == message_id).tuples())


def add_reaction(message_id, user_id, emoji, now):
    Reaction.create(message=message_id, user=user_id, emoji=emoji,
                    created_at=now)


def remove_reactions(message_id, user_id=None, emoji=None) -> int:
    """Delete the message's reactions (only ``user_id``'s ``emoji`` if
    given); how many went."""
    query = Reaction.delete().where(Reaction.message == message_id)
    if user_id is not None:
        query = query.where(Reaction.user == user_id, Reaction.emoji == emoji)
    return query.execute()


# -- reading ------------------------------------------------------------------

def history(room_id, before, after, limit) -> tuple:
    """Up to ``limit`` message rows of a room in ascending seq: the latest,
    those before seq ``before`` or after seq ``after``; and whether more
    remain in the direction of travel."""
    where, params = '"room_id" = ?', [room_id]
    if after is not None:
        where += ' AND "seq" > ?'
        params.append(after)
        order = 'ORDER BY "seq"'
    else:
        if before is not None:
            where += ' AND "seq" < ?'
            params.append(before)
        order = 'ORDER BY "seq" DESC'
    rows = fetch_messages(where, params + [limit + 1], order + ' LIMIT ?')
    has_more = len(rows) > limit
    rows = rows[:limit]
    if after is None:
        rows.reverse()
    return rows, has_more


def mark_read(room_id, user_id, seq) -> tuple:
    """Move the user's marker forward to ``seq`` (never back, never past
    the room's last seq); (marker, unread count, moved, the room's last
    seq, which the count covers: a message above it was not counted)."""
    last_seq = Room.select(Room.last_seq).where(Room.id == room_id).scalar()
    seq = min(seq, last_seq)
    moved = (Membership.update(last_read_seq=seq)
             .where(Membership.room == room_id, Membership.user == user_id,
                    Membership.last_read_seq < seq).execute())
    marker = (Membership.select(Membership.last_read_seq)
              .where(Membership.room == room_id, Membership.user == user_id)
              .scalar())
    unread = (Message.select().where(
        Message.room == room_id, Message.seq > marker,
        Message.seq <= last_seq,  # another process may have sent since
        Message.sender != user_id, Message.deleted == False)  # noqa: E712
        .count())
    return marker, unread, bool(moved), last_seq


def room_seqs(user_id) -> list:
    """(room id, last_seq) of every room the user is in, in one query on
    the (user, room) index joined to the rooms."""
    return execute('SELECT "mb"."room_id", "r"."last_seq" '
                   'FROM "membership" AS "mb" '
                   'JOIN "room" AS "r" ON "r"."id" = "mb"."room_id" '
                   'WHERE "mb"."user_id" = ? ORDER BY "mb"."room_id"',
                   (user_id,)).fetchall()


def departures(user_id, room_ids) -> list:
    """(room id, seq) of the user's departures from these rooms."""
    found = []
    for chunk in chunks(room_ids):
        found.extend(execute(
            'SELECT "room_id", "seq" FROM "departure" WHERE "user_id" = ? '
            f'AND "room_id" IN ({placeholders(chunk)}) ORDER BY "room_id"',
            [user_id, *chunk]).fetchall())
    return found


def events_after(room_id, after, limit) -> list:
    """(seq, kind, message_id, data) of a room's events after seq
    ``after``, ascending, at most ``limit``: its new messages ('message',
    at each message's own seq, on the message table's (room, seq) index)
    merged with its event log (changes to messages, room events), each
    side read no further than ``limit``. A 'message' row in the log is
    not read twice: a version-7 process left running through the upgrade
    (the README says to stop them all) still writes them."""
    return execute(
        'SELECT * FROM (SELECT "seq", \'message\' AS "kind", '
        '"id" AS "message_id", NULL AS "data" FROM "message" '
        'WHERE "room_id" = ? AND "seq" > ? ORDER BY "seq" LIMIT ?) AS "m" '
        'UNION ALL SELECT * FROM (SELECT "seq", "kind", "message_id", '
        '"data" FROM "event" WHERE "room_id" = ? AND "seq" > ? '
        'AND "kind" <> \'message\' ORDER BY "seq" LIMIT ?) AS "e" '
        'ORDER BY "seq" LIMIT ?',
        (room_id, after, limit) * 2 + (limit,)).fetchall()
