"""Messages with their reactions and attachments as plain rows, read with
plain SQL: paging through history and sync reads hundreds of rows a
call, and building the query and model objects with Peewee cost more
than the query itself. ``server.services.serialize`` turns them into the
contract's objects."""
from typing import NamedTuple

from server.data.database import execute, placeholders


class MessageRow(NamedTuple):
    """A message row read with plain SQL (same attributes as the model)."""
    id: int
    room_id: int
    seq: int
    sender_id: int
    body: str
    client_msg_id: str
    reply_to: int | None
    created_at: int
    edited_at: int | None
    deleted: bool
    update_seq: int


class AttachmentRow(NamedTuple):
    id: int
    message_id: int
    filename: str
    content_type: str
    size: int
    width: int | None
    height: int | None
    thumbnail_key: str | None


MESSAGE_COLUMNS = ', '.join(f'"{f}"' for f in MessageRow._fields)
ATTACHMENT_COLUMNS = ', '.join(f'"{f}"' for f in AttachmentRow._fields)


def fetch_messages(where: str, params=(), tail: str = '') -> list:
    """Message rows ``WHERE <where> <tail>`` (plain SQL with ``?``)."""
    cursor = execute(f'SELECT {MESSAGE_COLUMNS} FROM "message" '
                     f'WHERE {where} {tail}', params)
    return [MessageRow(*row) for row in cursor.fetchall()]


def messages_by_id(ids, newest_first=False) -> list:
    """The MessageRows of those of ``ids`` that exist (newest first if
    asked, else in no particular order)."""
    ids = list(ids)
    if not ids:
        return []
    return fetch_messages(f'"id" IN ({placeholders(ids)})', ids,
                          'ORDER BY "id" DESC' if newest_first else '')


def reactions_of(message_ids) -> list:
    """(message id, user id, emoji) of the messages' reactions, oldest
    first."""
    return execute(
        'SELECT "message_id", "user_id", "emoji" FROM "reaction" '
        f'WHERE "message_id" IN ({placeholders(message_ids)}) '
        'ORDER BY "created_at", "id"', list(message_ids)).fetchall()


def attachments_of(message_ids) -> list:
    """The AttachmentRows of the messages, in upload order."""
    return [AttachmentRow(*row) for row in execute(
        f'SELECT {ATTACHMENT_COLUMNS} FROM "attachment" '
        f'WHERE "message_id" IN ({placeholders(message_ids)}) ORDER BY "id"',
        list(message_ids)).fetchall()]
