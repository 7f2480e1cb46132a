"""Turning rows into the contract's objects (plain dicts)."""
import datetime
import functools

from models import Message
from server.data import rows as row_data
from server.data import users as user_data


@functools.lru_cache(maxsize=4096)  # a batch of new messages shares one ms
def iso(ms):
    """Milliseconds since the epoch -> '2026-11-24T14:03:07.123Z'.
    Arithmetic on a cached day prefix: an inbox of thousands of rooms
    formats two distinct times per room, and datetime + strftime cost
    several times this."""
    if ms is None:
        return None
    seconds, milli = divmod(int(ms), 1000)
    day, rest = divmod(seconds, 86400)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    return (f'{_day_prefix(day)}{_DIGITS2[hour]}:{_DIGITS2[minute]}:'
            f'{_DIGITS2[second]}.{_DIGITS3[milli]}Z')


# Zero-padded numbers, looked up instead of formatted: half the cost.
_DIGITS2 = [f'{i:02d}' for i in range(100)]
_DIGITS3 = [f'{i:03d}' for i in range(1000)]


@functools.lru_cache(maxsize=1024)
def _day_prefix(day):
    """'2026-11-24T' of the day ``day`` days after 1970-01-01."""
    return (datetime.date(1970, 1, 1) +
            datetime.timedelta(days=day)).isoformat() + 'T'


def user_dict(user) -> dict:
    return {'id': user.id, 'username': user.username,
            'display_name': user.display_name, 'is_bot': bool(user.is_bot)}


def load_users(ctx, ids):
    """Return {id: user dict} for ``ids``, from the cache where possible.
    Runs on a database thread."""
    users = ctx.users
    found = {}
    for i in ids:  # the inbox calls this once per room: mostly all cached
        user = users.get(i)
        if user is not None:
            found[i] = user
    # Kept in ``found``, not read back from the cache: a bounded cache may
    # already have let go of an entry loaded a moment ago.
    missing = [i for i in set(ids) if i not in found]
    # Plain rows a chunk at a time: a cold inbox loads thousands of users,
    # and Peewee's model objects cost ten times the query.
    for start in range(0, len(missing), 500):
        chunk = missing[start:start + 500]
        for row in user_data.public_rows(chunk):
            users[row.id] = found[row.id] = user_dict(row)
    return found if len(found) == len(ids) else \
        {i: found[i] for i in ids if i in found}


def attachment_dict(att) -> dict:
    data = {'id': att.id, 'filename': att.filename,
            'content_type': att.content_type, 'size': att.size,
            'url': f'/api/attachments/{att.id}'}
    if att.width:
        data['width'] = att.width
        data['height'] = att.height
    if att.thumbnail_key:
        data['thumbnail_url'] = f'/api/attachments/{att.id}/thumbnail'
    return data


def message_dicts(ctx, messages):
    """Serialise messages (model objects or MessageRows) with their
    reactions and attachments, each fetched in one query. Runs on a
    database thread."""
    messages = list(messages)
    if not messages:
        return []
    ids = [m.id for m in messages]
    reactions = {}
    for message_id, user_id, emoji in row_data.reactions_of(ids):
        reactions.setdefault(message_id, {}).setdefault(emoji, []).append(
            user_id)
    attachments = {}
    for att in row_data.attachments_of(ids):
        attachments.setdefault(att.message_id, []).append(
            attachment_dict(att))
    users = load_users(ctx, [m.sender_id for m in messages])
    return [_message_dict(m, users[m.sender_id],
                          reactions.get(m.id, {}),
                          attachments.get(m.id, []))
            for m in messages]


def message_dict(ctx, message) -> dict:
    return message_dicts(ctx, [message])[0]


def _message_dict(m: Message, sender, reactions, attachments) -> dict:
    deleted = bool(m.deleted)
    return {
        'id': m.id, 'room_id': m.room_id, 'seq': m.seq, 'sender': sender,
        'body': '' if deleted else m.body,
        'attachments': [] if deleted else attachments,
        'reply_to': m.reply_to, 'client_msg_id': m.client_msg_id,
        'created_at': iso(m.created_at), 'edited_at': iso(m.edited_at),
        'deleted': deleted, 'reactions': reactions,
        'update_seq': m.update_seq,
    }


def new_message_dict(message_id, room_id, seq, sender, body, client_msg_id,
                     reply_to, created_at, attachments) -> dict:
    """The dict of a message just created: no reactions, no edits, and no
    need to read back what was just written."""
    return {
        'id': message_id, 'room_id': room_id, 'seq': seq, 'sender': sender,
        'body': body, 'attachments': attachments, 'reply_to': reply_to,
        'client_msg_id': client_msg_id, 'created_at': iso(created_at),
        'edited_at': None, 'deleted': False, 'reactions': {},
        'update_seq': seq,
    }
