"""The inbox: a user's rooms, latest activity first, each with its last
message, unread count and read marker; paged by an opaque cursor.

Built from a few set-based queries (``server.data.rooms``) whatever the
number of rooms, and from per-process entries (``ctx.inbox_rooms``,
``ctx.inbox_unread``) that stay valid while the room's last_seq and the
reader's marker are what the database says. A room's entry keeps its last
message, and the room itself (a big group: each member) serialized
(``fastjson.fragment``): the answer is for the transports' JSON only, which
copy them as they are.
"""
from server.data import rooms as data
from server.errors import Invalid
from server.fastjson import fragment
from server.services import rooms
from server.services.rooms import INBOX_CHUNK
from server.services.serialize import load_users, message_dicts


def _last_messages(ctx, user_id, room_ids):
    """{room id: the dict of its latest message} for the user's rooms (all
    of them when ``room_ids`` is None)."""
    rows = data.last_messages(user_id, room_ids)
    found = {}
    for start in range(0, len(rows), INBOX_CHUNK):
        for message in message_dicts(ctx, rows[start:start + INBOX_CHUNK]):
            found[message['room_id']] = message
    return found


def _user_json(ctx, user):
    """The public ``user`` dict serialized, once per process."""
    found = ctx.user_json.get(user['id'])
    if found is None:
        found = fragment(user)
        ctx.user_json.put(user['id'], found)
    return found


# Largest page of the inbox a client may ask for.
INBOX_PAGE_MAX = 500
# Rooms of at most this many members (dms, small groups) are cached
# serialized whole.
SERIALIZED_MEMBERS_MAX = 8


def _inbox(ctx, user_id, limit=None, before=None):
    """The inbox as ``inbox`` returns it. A few set-based queries whatever
    the number of rooms: the page of rooms, then, for the rooms that
    changed since this process last built their entry (``ctx.inbox_rooms``,
    ``ctx.inbox_unread``: checked against the last_seq and read marker
    just read), their last messages, unread counts, and the rooms and
    users not cached yet."""
    rows = data.inbox_rows(user_id, None if limit is None else limit + 1,
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
        infos = rooms.room_infos(ctx, changed, groups_fresh=True)
        load_users(ctx, {m for info in infos.values()
                         for m in info.member_ids})
        for room_id, _, last_seq, *_ in rows:
            if room_id not in cached:
                room = rooms.room_dict(ctx, infos[room_id], last_seq)
                # Kept serialized, the answer copies them as they are; a
                # big group's members as each user's own JSON, shared by
                # every room (a whole 256-member room would be 22 KB).
                if len(room['members']) <= SERIALIZED_MEMBERS_MAX:
                    room = fragment(room)
                else:
                    room['members'] = [_user_json(ctx, u)
                                       for u in room['members']]
                cached[room_id] = entry = (
                    last_seq, room, fragment(last_messages.get(room_id)))
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
        counted = data.unread_counts(user_id, count)
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
