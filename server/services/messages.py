"""Messages and the room event log: send, edit, delete, react, history,
read markers and catch-up (``sync``).

Every change in a room takes the room's next seq in the same transaction
that stores it (``_next_seq`` for an edit, delete or reaction; a block of
seqs per room for a batch of sends, ``_take_seqs``), so seqs have no gaps
and no repeats, across processes too: SQLite's write lock or PostgreSQL's
row lock on the room serialises writers.
"""
import dataclasses
import json

import peewee

import models
from models import Attachment, Event, Membership, Message, Reaction, Room
from server.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge
from server.services import attachments as attachments_service
from server.services import outbox
from server.services import rooms as rooms_service
from server.services.context import now_ms
from server.services.serialize import (attachment_dict, fetch_messages,
                                       iso, load_users, message_dict,
                                       message_dicts, new_message_dict,
                                       placeholders)
from server.store import execute, is_sqlite

EMOJI_MAX = 32  # characters: the longest tag or ZWJ sequences are ~14


@dataclasses.dataclass
class Sent:
    """Outcome of send_message: the message, whether this call created it
    (False for an idempotent retry), the members to deliver it to, the
    dm room if this call opened it, and whether it ended the sender's
    typing in the room (their partners must see it stop)."""
    message: dict
    created: bool
    member_ids: tuple
    new_room: dict | None = None
    typing_stopped: bool = False


def check_body(ctx, body, allow_empty=False) -> str:
    if not isinstance(body, str):
        raise Invalid('body must be a string')
    if len(body) > ctx.config.body_max_chars:
        raise TooLarge(f'body: at most {ctx.config.body_max_chars} characters')
    if not body.strip() and not allow_empty:
        raise Invalid('body must not be empty')
    return body


def check_client_msg_id(value) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise Invalid('client_msg_id: a string of 1 to 64 characters')
    return value


MAX_INT = 2**63 - 1


def check_int(value, name, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f'{name} must be an integer')
    if value < minimum:
        raise Invalid(f'{name} must be >= {minimum}')
    if value > MAX_INT:  # the database's integers are 64-bit
        raise Invalid(f'{name} is too large')
    return value


def _next_seq(room_id):
    """Take the room's next seq (inside the writer's transaction)."""
    return execute('UPDATE "room" SET "last_seq" = "last_seq" + 1 '
                   'WHERE "id" = ? RETURNING "last_seq"',
                   (room_id,)).fetchone()[0]


def _insert_message(*args):
    """Store one message: the single form of ``_insert_messages``, which
    the writer uses for a send that is alone in its run, and for each send
    of a batch that hit a concurrent duplicate or an error."""
    (outcome,) = _insert_messages([args])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _insert_messages(calls):
    """Store many sends in a few statements: the writer thread calls this
    with every send that queued while its last commit ran (``calls`` are
    the argument tuples of ``_insert_message``). Returns, per call, either
    ``(message dict, created)`` or the PostboxError that refuses it.

    The hot path of Postbox. Every check comes before any write, so a
    refused send writes nothing and needs no savepoint; then each room
    takes its block of seqs in one UPDATE (rooms in id order, so two
    processes lock them in the same order), and the messages and their
    events are inserted a chunk of rows per statement. A retry of a
    message stored earlier, or of one earlier in the same batch, returns
    that message with ``created`` False; the same client_msg_id for
    another room or another body is a Conflict."""
    ctx = calls[0][0]
    outcomes = [None] * len(calls)
    stored = _stored_ids({(c[2], c[4]) for c in calls})
    blocked = _blocks({c[1].other_member(c[2]) for c in calls
                       if c[1].kind == 'dm'})
    # The cached member list that let a send this far may be stale (a
    # member removed meanwhile, on any process): group senders are checked
    # here, inside the transaction. A dm's members never change.
    members = _group_members({(c[1].id, c[2]) for c in calls
                              if c[1].kind != 'dm'})
    # What replies and attachments refer to, read once for the batch.
    replies = _rooms_of({c[6] for c in calls if c[6] is not None})
    unsent = _unsent_uploads({a for c in calls for a in c[5]})
    accepted, first = [], {}  # indexes to store; (sender, cmid) -> index
    claimed = set()  # attachments of the sends accepted so far
    for i, (_, info, sender_id, body, client_msg_id, attachment_ids,
            reply_to) in enumerate(calls):
        key = (sender_id, client_msg_id)
        if info.kind != 'dm' and (info.id, sender_id) not in members:
            outcomes[i] = Forbidden('you are not a member of this room')
        elif key in stored:
            outcomes[i] = _retry(ctx, stored[key], info.id, body)
        elif key in first:
            earlier = calls[first[key]]
            # A retry is resolved to its message below.
            outcomes[i] = (first[key] if (earlier[1].id, earlier[3]) ==
                           (info.id, body) else _reused())
        else:
            outcomes[i] = _refusal(info, sender_id, attachment_ids, reply_to,
                                   blocked, claimed, replies, unsent)
            if outcomes[i] is None:
                claimed.update(attachment_ids)
                first[key] = i
                accepted.append(i)
    if accepted:
        _store_new(ctx, calls, accepted, outcomes)
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, int):  # a retry within this batch
            outcomes[i] = (outcomes[outcome][0], False)
    return outcomes


def _reused():
    return Conflict('client_msg_id: already used for another message')


def _retry(ctx, message_id, room_id, body):
    """The outcome of a send whose (sender, client_msg_id) is already
    stored: the first message, not created again, if this is its retry
    (same room and body; an edited or deleted message no longer shows the
    body it was sent with, so there the room decides); else a Conflict."""
    message = Message.get_by_id(message_id)
    if message.room_id != room_id or (
            message.body != body and message.edited_at is None and
            not message.deleted):
        return _reused()
    return message_dict(ctx, message), False


def _stored_ids(keys) -> dict:
    """{(sender_id, client_msg_id): message id} of the keys already stored.
    A join with a VALUES list, since SQLite does not use the unique index
    for a row-value IN."""
    keys = list(keys)
    found = {}
    for chunk in _chunks(keys):
        values = ', '.join(['(?, ?)'] * len(chunk))
        found.update(((s, c), i) for i, s, c in execute(
            f'WITH "k"("s", "c") AS (VALUES {values}) '
            'SELECT "m"."id", "m"."sender_id", "m"."client_msg_id" '
            'FROM "k" JOIN "message" AS "m" ON "m"."sender_id" = "k"."s" '
            'AND "m"."client_msg_id" = "k"."c"',
            [v for key in chunk for v in key]).fetchall())
    return found


def _group_members(pairs) -> set:
    """The (room_id, user_id) pairs that are memberships, one query per
    chunk on the unique (room, user) index."""
    pairs = list(pairs)
    found = set()
    for chunk in _chunks(pairs):
        values = ', '.join(['(?, ?)'] * len(chunk))
        found.update(execute(
            f'WITH "k"("r", "u") AS (VALUES {values}) '
            'SELECT "mb"."room_id", "mb"."user_id" FROM "k" '
            'JOIN "membership" AS "mb" ON "mb"."room_id" = "k"."r" '
            'AND "mb"."user_id" = "k"."u"',
            [v for pair in chunk for v in pair]).fetchall())
    return found


def _blocks(blocker_ids) -> set:
    """The (blocker_id, blocked_id) pairs of blocks made by these users."""
    blocker_ids = list(blocker_ids)
    pairs = set()
    for chunk in _chunks(blocker_ids):
        pairs.update(execute(
            'SELECT "blocker_id", "blocked_id" FROM "block" WHERE '
            f'"blocker_id" IN ({placeholders(chunk)})', chunk).fetchall())
    return pairs


def _rooms_of(message_ids) -> dict:
    """{message id: its room id} of the given messages that exist."""
    found = {}
    for chunk in _chunks(sorted(message_ids)):
        found.update(execute(
            'SELECT "id", "room_id" FROM "message" WHERE "id" IN '
            f'({placeholders(chunk)})', chunk).fetchall())
    return found


def _unsent_uploads(attachment_ids) -> dict:
    """{attachment id: uploader id} of the given uploads not sent yet."""
    found = {}
    for chunk in _chunks(sorted(attachment_ids)):
        found.update(execute(
            'SELECT "id", "uploader_id" FROM "attachment" WHERE "id" IN '
            f'({placeholders(chunk)}) AND "message_id" IS NULL',
            chunk).fetchall())
    return found


def _refusal(info, sender_id, attachment_ids, reply_to, blocked, claimed,
             replies, unsent):
    """The error refusing this send, or None. ``claimed``: attachments an
    earlier send of the same batch takes (the database does not show them
    taken yet); ``replies`` and ``unsent``: ``_rooms_of`` and
    ``_unsent_uploads`` of the batch."""
    if info.kind == 'dm' and (info.other_member(sender_id),
                              sender_id) in blocked:
        return Forbidden('this user does not accept your messages')
    if reply_to is not None and replies.get(reply_to) != info.id:
        return Invalid('reply_to: no such message in this room')
    if any(unsent.get(a) != sender_id for a in attachment_ids) or \
            claimed.intersection(attachment_ids):
        return Invalid('attachments: only your own uploads, not yet sent')
    return None


def _store_new(ctx, calls, accepted, outcomes):
    """Insert the accepted sends and put their (message, True) outcomes."""
    now = now_ms()
    per_room = {}
    for i in accepted:
        per_room.setdefault(calls[i][1].id, []).append(i)
    lasts = _take_seqs({r: len(ix) for r, ix in per_room.items()}, now)
    seqs = {}
    for room_id, indexes in per_room.items():
        first_seq = lasts[room_id] - len(indexes) + 1
        for offset, i in enumerate(indexes):
            seqs[i] = first_seq + offset
    rows = [(calls[i][1].id, seqs[i], calls[i][2], calls[i][3], calls[i][4],
             calls[i][6], now, False, seqs[i]) for i in accepted]
    ids = {}
    for chunk in _chunks(rows):
        ids.update(_insert_message_rows(chunk))
    events = [(row[0], row[1], 'message', ids[row[0], row[1]])
              for row in rows]
    for chunk in _chunks(events):
        execute('INSERT INTO "event" ("room_id", "seq", "kind", '
                '"message_id") VALUES '
                + ', '.join(['(?, ?, ?, ?)'] * len(chunk)),
                [v for row in chunk for v in row])
    # Pushes and webhook deliveries, in this same transaction: an acked
    # message never loses its notification.
    outbox.queue_messages(
        ctx, [(row[0], row[1], ids[row[0], row[1]], row[2]) for row in rows],
        now)
    senders = load_users(ctx, [calls[i][2] for i in accepted])
    files = _attach({ids[calls[i][1].id, seqs[i]]: calls[i][5]
                     for i in accepted if calls[i][5]})
    for i in accepted:
        _, info, sender_id, body, client_msg_id, attachment_ids, \
            reply_to = calls[i]
        message_id = ids[info.id, seqs[i]]
        outcomes[i] = (new_message_dict(
            message_id, info.id, seqs[i], senders[sender_id], body,
            client_msg_id, reply_to, now, files.get(message_id, [])), True)


# Python's sqlite3 releases the GIL around every step of a statement, once
# per result row. When the event loop is busy, getting the GIL back after
# each costs the writer a forced switch, so on SQLite the batched send reads
# nothing row by row: one UPDATE for every room's seqs, their new values in
# a single aggregated row, message ids from the last rowid (SQLite numbers
# the rows of one INSERT consecutively while the writer holds the write
# lock). PostgreSQL returns whole results at once: RETURNING it is.


def _take_seqs(counts, now) -> dict:
    """Add ``counts[room_id]`` to each room's last_seq; {room_id: new
    last_seq}."""
    room_ids = sorted(counts)
    values = ', '.join(['(?, ?)'] * len(room_ids))
    params = [v for r in room_ids for v in (r, counts[r])] + [now]
    update = (f'WITH "v"("id", "k") AS (VALUES {values}) UPDATE "room" SET '
              '"last_seq" = "last_seq" + "v"."k", "last_activity_at" = ? '
              'FROM "v" WHERE "room"."id" = "v"."id"')
    marks = placeholders(room_ids)
    if is_sqlite(models.db.obj):
        execute(update, params)
        text = execute('SELECT group_concat("id" || \':\' || "last_seq") '
                       f'FROM "room" WHERE "id" IN ({marks})',
                       room_ids).fetchone()[0]
        return dict(map(int, pair.split(':')) for pair in text.split(','))
    # Lock the rooms in id order first, so that two processes' runs of
    # sends to the same rooms cannot deadlock each other. (A batch that also
    # edits, locking a room between two runs, still can: PostgreSQL then
    # aborts one transaction, and the writer retries that batch whole.)
    execute(f'SELECT 1 FROM "room" WHERE "id" IN ({marks}) ORDER BY "id" '
            'FOR UPDATE', room_ids)
    return dict(execute(update + ' RETURNING "room"."id", "room"."last_seq"',
                        params).fetchall())


def _insert_message_rows(rows) -> dict:
    """Insert message rows; {(room_id, seq): message id}."""
    sql = ('INSERT INTO "message" ("room_id", "seq", "sender_id", "body", '
           '"client_msg_id", "reply_to", "created_at", "deleted", '
           '"update_seq") VALUES '
           + ', '.join(['(?, ?, ?, ?, ?, ?, ?, ?, ?)'] * len(rows)))
    params = [v for row in rows for v in row]
    if is_sqlite(models.db.obj):
        last_id = execute(sql, params).lastrowid
        return {(row[0], row[1]): last_id - len(rows) + 1 + n
                for n, row in enumerate(rows)}
    return {(room_id, seq): message_id for message_id, room_id, seq in
            execute(sql + ' RETURNING "id", "room_id", "seq"',
                    params).fetchall()}


def _attach(wanted) -> dict:
    """Tie uploads to their messages (``{message id: [attachment id]}``);
    ``{message id: [attachment dict]}``, in upload order."""
    pairs = [(message_id, a) for message_id, attachment_ids in wanted.items()
             for a in attachment_ids]
    for chunk in _chunks(pairs):
        taken = execute(
            'UPDATE "attachment" SET "message_id" = CASE "id" '
            + ' '.join(['WHEN ? THEN ?'] * len(chunk)) +
            f' END WHERE "id" IN ({placeholders(chunk)}) AND '
            '"message_id" IS NULL',
            [v for m, a in chunk for v in (a, m)] + [a for _, a in chunk]
        ).rowcount
        if taken != len(chunk):
            # Another process sent one of them since the check
            # (PostgreSQL): the writer runs the sends again one by one,
            # and the check then refuses this one.
            raise peewee.IntegrityError('attachment already sent')
    if not pairs:
        return {}
    rows = {a.id: attachment_dict(a) for a in Attachment.select().where(
        Attachment.id.in_([a for _, a in pairs]))}
    return {message_id: [rows[a] for a in sorted(attachment_ids)]
            for message_id, attachment_ids in wanted.items()}


# Rows per multi-row statement: well under SQLite's limit of 32,766 bound
# parameters at nine per message row.
CHUNK_ROWS = 200


def _chunks(items):
    for start in range(0, len(items), CHUNK_ROWS):
        yield items[start:start + CHUNK_ROWS]


_insert_message.many = _insert_messages


async def send_message(ctx, sender_id, body, client_msg_id, room_id=None,
                       to=None, attachments=None, reply_to=None) -> Sent:
    """Store a message (after the commit) and say who must get it.

    Exactly one of ``room_id`` or ``to`` (a username: the dm with that user,
    opened if needed). Idempotent on (sender, client_msg_id): a retry
    returns the first message with ``created`` False. Raises Invalid,
    TooLarge, NotFound, Forbidden (not a member, or blocked), RateLimited,
    Conflict (the client_msg_id was used for another room or body).
    """
    attachments = [] if attachments is None else attachments
    if not isinstance(attachments, list) or not all(
            isinstance(a, int) and not isinstance(a, bool)
            for a in attachments):
        raise Invalid('attachments must be a list of attachment ids')
    attachments = list(dict.fromkeys(attachments))
    if len(attachments) > ctx.config.attachments_per_message:
        raise Invalid(f'at most {ctx.config.attachments_per_message} '
                      f'attachments')
    body = check_body(ctx, body, allow_empty=bool(attachments))
    client_msg_id = check_client_msg_id(client_msg_id)
    if reply_to is not None:
        check_int(reply_to, 'reply_to', 1)
    if (room_id is None) == (to is None):
        raise Invalid('give either room_id or to')
    ctx.send_limiter.take(sender_id)
    new_room = None
    if to is not None:
        room_id, new_room = await rooms_service.dm_to(ctx, sender_id, to)
    info = await rooms_service.member_room(ctx, sender_id, room_id)
    message, created = await ctx.store.write(
        _insert_message, ctx, info, sender_id, body, client_msg_id,
        attachments, reply_to)
    # A message ends its sender's typing, whatever transport sent it.
    typing_stopped = created and ctx.typing.stop(info.id, sender_id)
    return Sent(message, created, info.member_ids, new_room, typing_stopped)


def _member_message(user_id, message_id):
    message = Message.get_or_none(Message.id == message_id)
    if message is None or not Membership.select().where(
            Membership.room == message.room_id,
            Membership.user == user_id).exists():
        # Same answer for "no such message" and "not yours to see".
        raise NotFound('no such message')
    return message


def _change(ctx, user_id, message_id, change):
    """Apply ``change(message, now)`` to a message the user can see; if it
    returns True the change takes the room's next seq. Returns the message
    dict and whether it changed."""
    message = _member_message(user_id, message_id)
    now = now_ms()
    if not change(message, now):
        return message_dict(ctx, message), False
    seq = _next_seq(message.room_id)
    message.update_seq = seq
    message.save()
    Event.insert(room=message.room_id, seq=seq, kind='message_updated',
                 message=message.id).execute()
    outbox.queue_event(ctx, message.room_id, seq, 'message_updated',
                       message.id, user_id)
    return message_dict(ctx, message), True


def _edit(user_id, body):
    def change(message, now):
        if message.sender_id != user_id:
            raise Forbidden('only the sender can edit a message')
        if message.deleted:
            raise Invalid('the message was deleted')
        if message.body == body:
            return False
        message.body, message.edited_at = body, now
        return True
    return change


def _delete(user_id, removed_keys):
    def change(message, now):
        if message.sender_id != user_id:
            raise Forbidden('only the sender can delete a message')
        if message.deleted:
            return False
        message.deleted, message.body = True, ''
        Reaction.delete().where(Reaction.message == message.id).execute()
        # Assigned, not appended: a batch retried after a rollback runs
        # this again.
        removed_keys[:] = attachments_service.detach_message(message.id)
        return True
    return change


def _react(ctx, user_id, emoji, on):
    def change(message, now):
        if message.deleted:
            raise Invalid('the message was deleted')
        if rooms_service.dm_blocked(ctx, message.room_id, user_id):
            raise Forbidden('this user does not accept your reactions')
        if on:
            present = list(Reaction.select(Reaction.user, Reaction.emoji)
                           .where(Reaction.message == message.id).tuples())
            if (user_id, emoji) in present:
                return False
            config = ctx.config
            if sum(u == user_id for u, _ in present) >= \
                    config.reactions_per_user_max:
                raise TooLarge(f'at most {config.reactions_per_user_max} '
                               f'reactions of yours on one message')
            kinds = {e for _, e in present}
            if emoji not in kinds and \
                    len(kinds) >= config.reactions_per_message_max:
                raise TooLarge(f'at most {config.reactions_per_message_max} '
                               f'different reactions on one message')
            Reaction.create(message=message.id, user=user_id, emoji=emoji,
                            created_at=now)
            return True
        return bool(Reaction.delete().where(
            Reaction.message == message.id, Reaction.user == user_id,
            Reaction.emoji == emoji).execute())
    return change


async def _apply(ctx, user_id, message_id, change):
    check_int(message_id, 'message_id', 1)
    message, changed = await ctx.store.write(_change, ctx, user_id,
                                             message_id, change)
    info = await rooms_service.room_info(ctx, message['room_id'])
    return message, changed, info.member_ids


async def edit_message(ctx, user_id, message_id, body):
    """Change a message's body (sender only). Returns (message, changed,
    member ids); a change takes the room's next seq."""
    body = check_body(ctx, body)
    return await _apply(ctx, user_id, message_id, _edit(user_id, body))


async def delete_message(ctx, user_id, message_id):
    """Tombstone a message (sender only): body "" and no attachments, id
    and seq kept. Returns (message, changed, member ids)."""
    removed_keys = []
    result = await _apply(ctx, user_id, message_id,
                          _delete(user_id, removed_keys))
    # The rows are gone (committed): now the files.
    await attachments_service.remove_files(ctx, removed_keys)
    return result


async def react(ctx, user_id, message_id, emoji, on):
    """Add or remove the user's ``emoji`` reaction on a message of a room
    they are in. Returns (message, changed, member ids). Raises Invalid
    (not one emoji), TooLarge (past the per-message or per-user number of
    reactions), Forbidden (a dm with a user who blocks you)."""
    check_emoji(emoji)
    if not isinstance(on, bool):
        raise Invalid('on must be true or false')
    return await _apply(ctx, user_id, message_id,
                        _react(ctx, user_id, emoji, on))


# Code points that are emoji on their own (Unicode's Extended_Pictographic,
# by blocks): the misc symbols, dingbats, arrows and the emoji planes.
_PICTOGRAPHIC = ((0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C),
                 (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
                 (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B),
                 (0x2328, 0x2328), (0x23CF, 0x23CF), (0x23E9, 0x23F3),
                 (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
                 (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE),
                 (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07),
                 (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
                 (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297),
                 (0x3299, 0x3299), (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA),
                 (0x1F400, 0x1FAFF))
_VS16, _ZWJ, _KEYCAP = 0xFE0F, 0x200D, 0x20E3


def _pictographic(cp) -> bool:
    return any(lo <= cp <= hi for lo, hi in _PICTOGRAPHIC)


def _is_emoji_element(cps) -> bool:
    """One element of a ZWJ sequence: a pictographic code point, then
    optionally VS16, a skin tone, or (a black flag) a tag sequence."""
    if not cps or not _pictographic(cps[0]):
        return False
    rest = cps[1:]
    if rest[:1] == [_VS16]:
        rest = rest[1:]
    if rest and 0x1F3FB <= rest[0] <= 0x1F3FF:
        rest = rest[1:]
    if rest and cps[0] == 0x1F3F4:  # subdivision flags: tags, then cancel
        return (rest[-1] == 0xE007F and len(rest) > 1 and
                all(0xE0020 <= c <= 0xE007E for c in rest[:-1]))
    return not rest


def is_emoji(text) -> bool:
    """Whether ``text`` is exactly one emoji (one grapheme cluster of
    emoji code points): a pictographic code point with its modifiers, a
    ZWJ sequence of those, a flag (two regional indicators) or a keycap.
    No library: the rules are few and stable, the code points a table."""
    cps = [ord(c) for c in text]
    if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
        return True
    if cps and chr(cps[0]) in '0123456789#*' and cps[1:] in (
            [_VS16, _KEYCAP], [_KEYCAP]):
        return True
    elements, current = [], []
    for cp in cps:
        if cp == _ZWJ:
            elements.append(current)
            current = []
        else:
            current.append(cp)
    elements.append(current)
    return all(_is_emoji_element(e) for e in elements)


def check_emoji(value) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= EMOJI_MAX or \
            not is_emoji(value):
        raise Invalid('emoji: exactly one emoji')
    return value


def _history(ctx, room_id, before, after, limit):
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
    return {'messages': message_dicts(ctx, rows), 'has_more': has_more}


async def history(ctx, user_id, room_id, before=None, after=None,
                  limit=None) -> dict:
    """Messages of a room in ascending seq: the latest ones, those before
    seq ``before`` or those after seq ``after``. ``has_more`` says whether
    more remain in the direction of travel."""
    limit = ctx.config.history_default_limit if limit is None else limit
    check_int(limit, 'limit', 1)
    if limit > 100:
        raise Invalid('limit: 1 to 100')
    if before is not None:
        check_int(before, 'before')
    if after is not None:
        check_int(after, 'after')
    if before is not None and after is not None:
        raise Invalid('give before or after, not both')
    await rooms_service.member_room(ctx, user_id, room_id)
    return await ctx.store.read(_history, ctx, room_id, before, after, limit)


def _mark_read(room_id, user_id, seq):
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
        Message.sender != user_id, Message.deleted == False)  # noqa: E712
        .count())
    return marker, unread, bool(moved)


async def mark_read(ctx, user_id, room_id, seq):
    """Move the user's read marker forward to ``seq`` (never back, never
    past the room's last seq). Returns (marker, unread, moved)."""
    check_int(seq, 'seq')
    await rooms_service.member_room(ctx, user_id, room_id)
    return await ctx.store.write(_mark_read, room_id, user_id, seq)


def _room_seqs(user_id):
    """(room id, last_seq) of every room the user is in, in one query on
    the (user, room) index joined to the rooms."""
    return execute('SELECT "mb"."room_id", "r"."last_seq" '
                   'FROM "membership" AS "mb" '
                   'JOIN "room" AS "r" ON "r"."id" = "mb"."room_id" '
                   'WHERE "mb"."user_id" = ? ORDER BY "mb"."room_id"',
                   (user_id,)).fetchall()


def _departures(user_id, room_ids) -> list:
    """(room id, seq) of the user's departures from these rooms."""
    found = []
    for chunk in _chunks(room_ids):
        found.extend(execute(
            'SELECT "room_id", "seq" FROM "departure" WHERE "user_id" = ? '
            f'AND "room_id" IN ({placeholders(chunk)}) ORDER BY "room_id"',
            [user_id, *chunk]).fetchall())
    return found


def _room_event(ctx, room_id, seq, data) -> dict:
    """The room object of a 'room' event, from the state it stored."""
    state = json.loads(data)
    users = load_users(ctx, state['members'])
    return {'id': room_id, 'kind': 'group', 'name': state['name'],
            'members': [users[m] for m in state['members'] if m in users],
            'owner_id': state['owner_id'], 'last_seq': seq,
            'created_at': iso(state['created_at'])}


def _sync(ctx, user_id, known, page):
    mine = _room_seqs(user_id)
    # Rooms the client lists but the user has left: say so, whatever the
    # seq the client has (it drops the room on this).
    member_of = {room_id for room_id, _ in mine}
    gone = sorted(r for r in known if r not in member_of)
    left = [{'type': 'room_left', 'room_id': room_id, 'seq': seq}
            for room_id, seq in _departures(user_id, gone)] if gone else []
    events = []
    # Only the rooms with something new are queried: a user in 10,000
    # rooms who missed little costs one query and a scan of the list.
    for room_id, last_seq in mine:
        after = known.get(room_id, 0)
        if last_seq <= after:
            continue
        # One more than a page tells whether there is more.
        remaining = page + 1 - len(events)
        if remaining <= 0:
            break
        rows = execute('SELECT "seq", "kind", "message_id", "data" '
                       'FROM "event" WHERE "room_id" = ? AND "seq" > ? '
                       'ORDER BY "seq" LIMIT ?',
                       (room_id, after, remaining)).fetchall()
        events.extend((room_id, *row) for row in rows)
    has_more = len(events) > page
    events = events[:page]
    ids = list({e[3] for e in events if e[3] is not None})
    messages = {m['id']: m for m in message_dicts(ctx, fetch_messages(
        f'"id" IN ({placeholders(ids)})', ids))} if ids else {}
    answer = []
    for room_id, seq, kind, mid, data in events:
        if kind == 'room':
            answer.append({'type': 'room', 'room_id': room_id, 'seq': seq,
                           'room': _room_event(ctx, room_id, seq, data)})
        else:
            answer.append({'type': kind, 'room_id': room_id, 'seq': seq,
                           'message': messages[mid]})
    return {'events': left + answer, 'has_more': has_more}


async def sync(ctx, user_id, known) -> dict:
    """Every event after the given seq in each of the user's rooms (rooms
    missing from ``known`` from seq 0), ascending per room, at most
    ``sync_page_size``; ``has_more`` when the client should call again with
    the seqs it now has. Each message event carries the message's current
    state; a 'room' event (a group's members, owner or name changed) the
    room as it was right after that change. Rooms in ``known`` that the
    user has left or was removed from come first, as ``{type:
    "room_left", room_id, seq}`` (the seq of the departure), outside the
    page count; rooms listed that the user never was in are ignored."""
    if not isinstance(known, dict):
        raise Invalid('rooms must be an object of room_id: last_seq')
    parsed = {}
    for key, value in known.items():
        try:
            room_id = int(key)
        except (TypeError, ValueError):
            raise Invalid('rooms: keys must be room ids') from None
        if not 0 < room_id <= MAX_INT:  # no such room can exist
            continue
        parsed[room_id] = check_int(value, 'rooms[...]')
    return await ctx.store.read(_sync, ctx, user_id, parsed,
                                ctx.config.sync_page_size)
