"""The SQL of the outbox: who listens to a room (bots with a webhook,
push subscriptions), its rows written in the transaction of the event they
deliver, and the dispatcher's claim, retry and removal of them. The rules
(who is owed what, backoff, dead letters) are ``server.services.outbox``.
"""
from models import Event
from server.data.database import chunks, dialect, execute, placeholders

COLUMNS = ('"kind", "target", "user_id", "room_id", "seq", "event", '
           '"message_id", "created_at", "due_at", "attempts", '
           '"claimed_until"')


def listening() -> tuple:
    """(any webhook exists, any push subscription exists): two index
    probes, so that a server where nobody uses them pays nothing more per
    batch."""
    return tuple(bool(v) for v in execute(
        'SELECT EXISTS (SELECT 1 FROM "webhook"), '
        'EXISTS (SELECT 1 FROM "push_subscription")').fetchone())


# The room's bots with a webhook. Led by the webhook table (CROSS JOIN
# fixes SQLite's join order; PostgreSQL plans by its statistics): a few
# bots have webhooks, while a group may have thousands of members, so each
# webhook is one probe of the unique (room, user) index per room.
_WEBHOOK_TARGETS = (
    'SELECT \'webhook\', "w"."bot_id", "mb"."room_id", "mb"."user_id" '
    'FROM "v" CROSS JOIN "webhook" AS "w" CROSS JOIN "membership" AS "mb" '
    'WHERE "mb"."room_id" = "v"."r" AND "mb"."user_id" = "w"."bot_id"')
# The push subscriptions of members who have not muted the room: one pass
# over the room's memberships (on the covering (room, user) index; muted
# is read only for members with a subscription).
_PUSH_TARGETS = (
    'SELECT \'push\', "ps"."id", "mb"."room_id", "mb"."user_id" FROM "v" '
    'JOIN "membership" AS "mb" ON "mb"."room_id" = "v"."r" '
    'JOIN "push_subscription" AS "ps" ON "ps"."user_id" = "mb"."user_id" '
    'WHERE NOT "mb"."muted"')


def listeners(room_ids, webhooks, pushes) -> dict:
    """{room id: {(kind, target, user id)}}: the bots with a webhook and
    the push subscriptions of members who have not muted the room, per
    room of the batch (whatever the number of its messages)."""
    parts = ([_WEBHOOK_TARGETS] if webhooks else []) + (
        [_PUSH_TARGETS] if pushes else [])
    found = {}
    for chunk in chunks(room_ids):
        values = ', '.join(['(?)'] * len(chunk))
        for kind, target, room_id, user_id in execute(
                f'WITH "v"("r") AS (VALUES {values}) '
                + ' UNION ALL '.join(parts), chunk).fetchall():
            found.setdefault(room_id, set()).add((kind, target, user_id))
    return found


def insert(rows):
    """Insert outbox rows, tuples in ``COLUMNS`` order."""
    for chunk in chunks(rows):
        execute(f'INSERT INTO "outbox" ({COLUMNS}) VALUES '
                + ', '.join(['(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)']
                            * len(chunk)),
                [v for row in chunk for v in row])


def insert_webhook_event(room_id, seq, event, message_id, now, but=None,
                         bot_ids=None) -> int:
    """Webhook rows of one room event: for the bots with a webhook among
    ``bot_ids``, or (None) for those in the room but ``but``; how many."""
    values = ('webhook', room_id, seq, event, message_id, now, now)
    select = ('SELECT ?, "w"."bot_id", "w"."bot_id", ?, ?, ?, ?, ?, ?, 0, 0 '
              'FROM "webhook" AS "w" ')
    if bot_ids is None:
        return execute(
            f'INSERT INTO "outbox" ({COLUMNS}) {select}'
            'JOIN "membership" AS "mb" ON "mb"."user_id" = "w"."bot_id" '
            'AND "mb"."room_id" = ? WHERE "w"."bot_id" <> ?',
            (*values, room_id, -1 if but is None else but)).rowcount
    ids = list(bot_ids)
    return execute(
        f'INSERT INTO "outbox" ({COLUMNS}) {select}'
        f'WHERE "w"."bot_id" IN ({placeholders(ids)})',
        (*values, *ids)).rowcount


def save_room_state(room_id, seq, state):
    """Keep a room's state (JSON) as the 'room' event ``seq`` of its log
    (seq 0: the room as created, which only webhooks read; ``sync`` starts
    after seq 0)."""
    Event.insert(room=room_id, seq=seq, kind='room', data=state).execute()


def departures(pairs) -> dict:
    """{(bot id, room id): seq} of the (bot id, room id) ``pairs`` with a
    ``room_left`` webhook row pending: the seq at which the bot left the
    room, its last if it left more than once."""
    found = {}
    for chunk in chunks(sorted(pairs)):
        rows = execute(
            'SELECT "target", "room_id", MAX("seq") FROM "outbox" WHERE '
            '"kind" = \'webhook\' AND "event" = \'room_left\' AND '
            f'"target" IN ({placeholders({b for b, _ in chunk})}) AND '
            f'"room_id" IN ({placeholders({r for _, r in chunk})}) '
            'GROUP BY "target", "room_id"',
            [*{b for b, _ in chunk}, *{r for _, r in chunk}]).fetchall()
        found.update({(int(b), r): seq for b, r, seq in rows
                      if (int(b), r) in pairs})
    return found


def claim(now, limit, claim_ms) -> list:
    """Claim up to ``limit`` due rows for ``claim_ms`` (a webhook row only
    when it is the lowest seq pending for its bot and room); their tuples
    (id, kind, target, user_id, room_id, seq, event, message_id,
    created_at, attempts)."""
    return execute(
        'UPDATE "outbox" SET "claimed_until" = ? WHERE "id" IN ('
        'SELECT "o"."id" FROM "outbox" AS "o" WHERE "o"."due_at" <= ? '
        'AND "o"."claimed_until" <= ? AND ("o"."kind" <> \'webhook\' OR '
        'NOT EXISTS (SELECT 1 FROM "outbox" AS "p" WHERE '
        '"p"."kind" = \'webhook\' AND "p"."target" = "o"."target" AND '
        '"p"."room_id" = "o"."room_id" AND "p"."seq" < "o"."seq")) '
        f'ORDER BY "o"."due_at" LIMIT ?{dialect().skip_locked}) '
        'RETURNING "id", "kind", "target", "user_id", "room_id", "seq", '
        '"event", "message_id", "created_at", "attempts"',
        (now + claim_ms, now, now, limit)).fetchall()


def done(row_ids):
    """Delete delivered (or dead) rows."""
    if row_ids:
        execute(f'DELETE FROM "outbox" WHERE "id" IN '
                f'({placeholders(row_ids)})', list(row_ids))


def retry_later(row_id, due_at, error):
    """A failed attempt: due again at ``due_at``, the error kept."""
    execute('UPDATE "outbox" SET "attempts" = "attempts" + 1, '
            '"due_at" = ?, "claimed_until" = 0, "last_error" = ? '
            'WHERE "id" = ?', (due_at, error[:500], row_id))


def postpone(row_id, due_at):
    """Due again at ``due_at``, no attempt counted."""
    execute('UPDATE "outbox" SET "due_at" = ?, "claimed_until" = 0 '
            'WHERE "id" = ?', (due_at, row_id))


def pending() -> int:
    return execute('SELECT COUNT(*) FROM "outbox"').fetchone()[0]
