"""Messages and the room event log: send, edit, delete, react, history,
read markers and catch-up (``sync``).

Each action checks its input first (``check_*``, raising a typed
PostboxError, before anything is queued), then does it in the writer's
transaction, with every statement in ``server.data.messages``.

Every change in a room takes the room's next seq in the same transaction
that stores it (``data.next_seq`` for an edit, delete or reaction; a block
of seqs per room for a batch of sends, ``data.take_seqs``), so seqs have no
gaps and no repeats, across processes too: SQLite's write lock or
PostgreSQL's row lock on the room serialises writers.
"""
import dataclasses
import json

from server.data import attachments as attachment_data
from server.data import messages as data
from server.data import rooms as rooms_data
from server.data.rows import messages_by_id
from server.errors import Forbidden, Invalid, NotFound, PostboxError, \
    TooLarge
from server.services import attachments as attachments_service
from server.services import outbox
from server.services import rooms as rooms_service
from server.services.checks import check_text
from server.services.context import now_ms
from server.services.emoji import check_emoji
from server.services.sending import SendRequest, store_sends
from server.services.serialize import (iso, load_users, message_dict,
                                       message_dicts)

MAX_INT = 2**63 - 1


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


# -- checks -----------------------------------------------------------------

def check_body(ctx, body, allow_empty=False) -> str:
    if not isinstance(body, str):
        raise Invalid('body must be a string')
    if len(body) > ctx.config.body_max_chars:
        raise TooLarge(f'body: at most {ctx.config.body_max_chars} characters')
    if not body.strip() and not allow_empty:
        raise Invalid('body must not be empty')
    return body


def check_client_msg_id(value) -> str:
    return check_text(value, 'client_msg_id', 1, 64)


def check_int(value, name, minimum=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f'{name} must be an integer')
    if value < minimum:
        raise Invalid(f'{name} must be >= {minimum}')
    if value > MAX_INT:  # the database's integers are 64-bit
        raise Invalid(f'{name} is too large')
    return value


def check_attachments(ctx, attachments) -> tuple:
    """The distinct attachment ids of a send, in the order given."""
    attachments = [] if attachments is None else attachments
    if not isinstance(attachments, list) or not all(
            isinstance(a, int) and not isinstance(a, bool)
            and 0 < a <= MAX_INT for a in attachments):
        raise Invalid('attachments must be a list of attachment ids')
    attachments = tuple(dict.fromkeys(attachments))
    if len(attachments) > ctx.config.attachments_per_message:
        raise Invalid(f'at most {ctx.config.attachments_per_message} '
                      f'attachments')
    return attachments


# -- sending ----------------------------------------------------------------

async def send_message(ctx, sender_id, body, client_msg_id, room_id=None,
                       to=None, attachments=None, reply_to=None) -> Sent:
    """Store a message (after the commit) and say who must get it.

    Exactly one of ``room_id`` or ``to`` (a username: the dm with that user,
    opened if needed). Idempotent on (sender, client_msg_id): a retry
    returns the first message with ``created`` False. Raises Invalid,
    TooLarge, NotFound, Forbidden (not a member, or blocked), RateLimited,
    Conflict (the client_msg_id was used for another room or body).
    A new message ends the sender's typing in its room. A send refused
    after ``to`` opened a new dm (a bad ``reply_to``, attachment or
    ``client_msg_id``) raises with that dm in the error's ``opened_room``:
    the dm stays, and its members must still hear of it.
    """
    attachments = check_attachments(ctx, attachments)
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
    try:
        info = await rooms_service.member_room(ctx, sender_id, room_id)
        message, created, members = await ctx.store.write(
            store_sends, SendRequest(ctx, info, sender_id, body,
                                     client_msg_id, attachments, reply_to))
    except PostboxError as exc:
        exc.opened_room = new_room
        raise
    # A message ends its sender's typing, whatever transport sent it.
    typing_stopped = created and ctx.typing.stop(info.id, sender_id)
    # The members as of the message's seq, not the cached ones: a member
    # removed meanwhile must not get it live, one added must.
    return Sent(message, created,
                info.member_ids if members is None else members, new_room,
                typing_stopped)


# -- edits, deletions, reactions --------------------------------------------

def _change(ctx, user_id, message_id, change):
    """Apply ``change(message, now)`` to a message the user can see; if it
    returns True the change takes the room's next seq. Returns the message
    dict, whether it changed, and the room's members as of then (read in
    the transaction after the seq: not the cache, which a membership
    change on another process may not have reached yet; but a dm's never
    change)."""
    message = data.member_message(user_id, message_id)
    if message is None:
        # Same answer for "no such message" and "not yours to see".
        raise NotFound('no such message')
    if not change(message, now_ms()):
        return message_dict(ctx, message), False, ()
    seq = data.save_change(message)
    outbox.queue_event(ctx, message.room_id, seq, 'message_updated',
                       message.id, user_id)
    cached = ctx.rooms.get(message.room_id)
    if cached is not None and cached.kind == 'dm':
        return message_dict(ctx, message), True, cached.member_ids
    members = rooms_data.members_of([message.room_id])
    return message_dict(ctx, message), True, \
        tuple(members.get(message.room_id, ()))


def _edit(user_id, body):
    def change(message, now):
        if message.sender_id != user_id:
            raise Forbidden('only the sender can edit a message')
        if message.deleted:
            raise Invalid('the message was deleted')
        # As when sending: a blank body only beside attachments.
        if not body.strip() and not attachment_data.has_any(message.id):
            raise Invalid('body must not be empty')
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
        data.remove_reactions(message.id)
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
            present = data.reactions_on(message.id)
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
            data.add_reaction(message.id, user_id, emoji, now)
            return True
        return bool(data.remove_reactions(message.id, user_id, emoji))
    return change


async def _apply(ctx, user_id, message_id, change):
    check_int(message_id, 'message_id', 1)
    return await ctx.store.write(_change, ctx, user_id, message_id, change)


async def edit_message(ctx, user_id, message_id, body):
    """Change a message's body (sender only). Returns (message, changed,
    member ids); a change takes the room's next seq."""
    body = check_body(ctx, body, allow_empty=True)
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


def _history(ctx, room_id, before, after, limit):
    rows, has_more = data.history(room_id, before, after, limit)
    return {'messages': message_dicts(ctx, rows), 'has_more': has_more}


async def mark_read(ctx, user_id, room_id, seq):
    """Move the user's read marker forward to ``seq`` (never back, never
    past the room's last seq). Returns (marker, unread, moved, the room's
    last seq the unread count covers)."""
    check_int(seq, 'seq')
    await rooms_service.member_room(ctx, user_id, room_id)
    return await ctx.store.write(data.mark_read, room_id, user_id, seq)


async def room_positions(ctx, user_id) -> list:
    """(room id, last_seq) of every room the user is in: where a new
    recovery session starts from."""
    return await ctx.store.read(data.room_seqs, user_id)


def _room_event(ctx, room_id, seq, stored) -> dict:
    """The room object of a 'room' event, from the state it stored."""
    state = json.loads(stored)
    users = load_users(ctx, state['members'])
    # A new room's state (seq 0, webhooks only) says its kind.
    return {'id': room_id, 'kind': state.get('kind', 'group'),
            'name': state['name'],
            'members': [users[m] for m in state['members'] if m in users],
            'owner_id': state['owner_id'], 'last_seq': seq,
            'created_at': iso(state['created_at'])}


def _sync(ctx, user_id, known, page):
    mine = data.room_seqs(user_id)
    # Rooms the client lists but the user has left: say so, whatever the
    # seq the client has (it drops the room on this).
    member_of = {room_id for room_id, _ in mine}
    gone = sorted(r for r in known if r not in member_of)
    left = [{'type': 'room_left', 'room_id': room_id, 'seq': seq}
            for room_id, seq in data.departures(user_id, gone)] if gone else []
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
        rows = data.events_after(room_id, after, remaining)
        events.extend((room_id, *row) for row in rows)
    has_more = len(events) > page
    events = events[:page]
    ids = list({e[3] for e in events if e[3] is not None})
    messages = {m['id']: m for m in message_dicts(
        ctx, messages_by_id(ids))}
    answer = []
    for room_id, seq, kind, mid, stored in events:
        if kind == 'room':
            answer.append({'type': 'room', 'room_id': room_id, 'seq': seq,
                           'room': _room_event(ctx, room_id, seq, stored)})
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
