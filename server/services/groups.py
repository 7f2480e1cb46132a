"""Groups: creating one and its life cycle.

add_members, remove_member, leave_group and rename_group each change a
group in the writer's transaction and take the room's next seq there,
with an event of kind 'room' holding the room's state after the change
(what ``sync`` replays). Every check is made again inside the
transaction, after the room's row is locked, so two processes changing
one group at once cannot both pass a check that only one may. The SQL is
``server.data.groups``.
"""
import dataclasses

from server.data import groups as data
from server.errors import Forbidden, Invalid, NotFound, TooLarge
from server.services import outbox
from server.services.auth import check_username
from server.services.checks import check_shown_name
from server.services.context import now_ms
from server.services.limits import check_room_quota
from server.services.rooms import (RoomInfo, find_user_id, forget_room,
                                   load_room, room_dict)


@dataclasses.dataclass
class GroupChange:
    """Outcome of a group function: the room after it (``last_seq`` is the
    change's seq), whether anything changed (a no-op takes no seq and
    sends nothing), and the users who are no longer members."""
    room: dict
    changed: bool
    left_ids: tuple = ()


# -- checks ---------------------------------------------------------------

def _check_room_id(room_id):
    if isinstance(room_id, bool) or not isinstance(room_id, int):
        raise Invalid('room_id must be an integer')
    if not 0 < room_id < 2**63:
        raise NotFound('no such room')
    return room_id


def _check_name(name) -> str:
    return check_shown_name(name, 'name', 100)


def _check_usernames(usernames, non_empty) -> list:
    """The distinct folded usernames of a payload's list."""
    if not isinstance(usernames, list) or not all(
            isinstance(u, str) for u in usernames) or \
            (non_empty and not usernames):
        raise Invalid('members must be a non-empty list of usernames'
                      if non_empty else 'members must be a list of usernames')
    return list(dict.fromkeys(check_username(u) for u in usernames))


async def _user_ids(ctx, wanted) -> dict:
    """{username: id} of ``wanted``; NotFound naming those that do not
    exist."""
    found = await ctx.store.read(data.find_users, wanted)
    missing = [u for u in wanted if u not in found]
    if missing:
        raise NotFound(f'no such user: {", ".join(missing)}')
    return found


def _locked_group(user_id, room_id):
    """The group ``room_id``, locked for the rest of the transaction, if
    ``user_id`` is a member. Raises NotFound, Forbidden (not a member) or
    Invalid (a dm)."""
    room = data.lock(room_id)
    if room is None:
        raise NotFound('no such room')
    if not data.is_member(room_id, user_id):
        raise Forbidden('you are not a member of this room')
    if room.kind != 'group':
        raise Invalid('a dm cannot be changed')
    return room


def _check_can_add(ctx, user_id, new_ids, names):
    """Refuse adding ``new_ids`` (by ``user_id``) when one of them blocks
    ``user_id`` (Forbidden) or is already in ``rooms_per_user_max`` rooms
    (Forbidden, naming them: the room limit of each added user applies to
    them). One query each, on the (blocker, blocked) and (user, room)
    indexes."""
    if not new_ids:
        return
    blockers = data.blockers_of(user_id, new_ids)
    if blockers:
        raise Forbidden(f'{names.get(blockers[0], "a user")} does not '
                        f'accept your messages')
    limit = ctx.config.rooms_per_user_max
    full = [u for u, n in data.room_counts(new_ids).items() if n >= limit]
    if full:
        raise Forbidden(f'{names.get(full[0], "a user")} is in {limit} '
                        f'rooms, the most allowed')


# -- in the writer's transaction -------------------------------------------

def _create_group(ctx, user_id, name, member_ids, names):
    check_room_quota(ctx, user_id)
    _check_can_add(ctx, user_id, member_ids[1:], names)
    now = now_ms()
    room_id = data.create(user_id, name, member_ids, now)
    info = RoomInfo(room_id, 'group', name, now, tuple(member_ids), user_id)
    # Bots with a webhook among the members hear of the new group.
    outbox.queue_new_room(ctx, info, user_id)
    ctx.rooms[room_id] = info
    return room_dict(ctx, info, 0)


def _record_change(ctx, room_id, left_ids=()) -> GroupChange:
    """Log a change just made under the room's next seq; tell the bots."""
    seq, room, members = data.log_change(room_id, left_ids, now_ms())
    # Bot webhooks: the members get the room, those who left room_left.
    outbox.queue_event(ctx, room_id, seq, 'room')
    outbox.queue_event(ctx, room_id, seq, 'room_left', bot_ids=left_ids)
    info = RoomInfo(room_id, 'group', room.name, room.created_at,
                    tuple(members), room.owner_id)
    return GroupChange(room_dict(ctx, info, seq), True, tuple(left_ids))


def _unchanged(ctx, room) -> GroupChange:
    return GroupChange(room_dict(ctx, load_room(room.id), room.last_seq),
                       False)


def _add_members(ctx, user_id, room_id, new_ids, names):
    room = _locked_group(user_id, room_id)
    members = data.member_ids(room_id)
    new_ids = [u for u in new_ids if u not in members]
    if not new_ids:
        return _unchanged(ctx, room)  # all of them are in already
    limit = ctx.config.group_max_members
    if len(members) + len(new_ids) > limit:
        raise TooLarge(f'a group has at most {limit} members')
    _check_can_add(ctx, user_id, new_ids, names)
    # Added people start with everything before their arrival read.
    data.add_members(room_id, new_ids, now_ms(), room.last_seq + 1)
    return _record_change(ctx, room_id)


def _remove_member(ctx, user_id, room_id, target_id):
    room = _locked_group(user_id, room_id)
    if target_id == user_id:
        return _leave_group(ctx, user_id, room_id)
    if room.owner_id != user_id:
        raise Forbidden('only the owner can remove members')
    if not data.remove_member(room_id, target_id):
        raise NotFound('that user is not a member of this room')
    return _record_change(ctx, room_id, (target_id,))


def _leave_group(ctx, user_id, room_id):
    room = _locked_group(user_id, room_id)
    data.remove_member(room_id, user_id)
    if room.owner_id == user_id or room.owner_id is None:
        # Ownership passes to the longest-standing member (none left: the
        # group stays, empty and unowned, seen by no one).
        data.set_owner(room_id, next(iter(data.member_ids(room_id)), None))
    return _record_change(ctx, room_id, (user_id,))


def _rename_group(ctx, user_id, room_id, name):
    room = _locked_group(user_id, room_id)
    if room.owner_id != user_id:
        raise Forbidden('only the owner can rename the group')
    if room.name == name:
        return _unchanged(ctx, room)
    data.set_name(room_id, name)
    return _record_change(ctx, room_id)


# -- the services ---------------------------------------------------------

async def create_group(ctx, user_id, name, usernames) -> dict:
    """A group room of the creator and ``usernames``. Returns the room."""
    name = _check_name(name)
    wanted = _check_usernames(usernames, non_empty=False)
    if len(wanted) + 1 > ctx.config.group_max_members:  # and the creator
        raise Invalid(f'a group has at most '
                      f'{ctx.config.group_max_members} members')
    found = await _user_ids(ctx, wanted)
    member_ids = [user_id] + [found[u] for u in wanted if found[u] != user_id]
    names = {found[u]: u for u in wanted}
    return await ctx.store.write(_create_group, ctx, user_id, name,
                                 member_ids, names)


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
    wanted = _check_usernames(usernames, non_empty=True)
    if len(wanted) > ctx.config.group_max_members:
        raise TooLarge(f'a group has at most '
                       f'{ctx.config.group_max_members} members')
    found = await _user_ids(ctx, wanted)
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
