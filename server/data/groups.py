"""The SQL of groups: creating one, locking it for a change, its
memberships, and the 'room' event and departures a change leaves in the
room's log. Run inside the writer's transaction; the rules are in
``server.services.groups``."""
import json

from models import Departure, Event, Membership, Room, User
from server.data.database import dialect, execute, placeholders


def find_users(usernames) -> dict:
    """{username: user id} of those that exist."""
    return dict(User.select(User.username, User.id)
                .where(User.username.in_(usernames)).tuples())


def create(user_id, name, member_ids, now) -> int:
    """A new group owned by ``user_id`` with these members; its id."""
    room = Room.create(kind='group', name=name, created_by=user_id,
                       owner=user_id, created_at=now, last_activity_at=now)
    Membership.insert_many([{'room': room.id, 'user': u, 'joined_at': now}
                            for u in member_ids]).execute()
    return room.id


def lock(room_id):
    """The room, its row locked for the rest of the transaction (a no-op
    where the writer holds the database's write lock), or None."""
    dialect().lock_rows('room', [room_id])
    return Room.get_or_none(Room.id == room_id)


def is_member(room_id, user_id) -> bool:
    return Membership.select().where(Membership.room == room_id,
                                     Membership.user == user_id).exists()


def member_ids(room_id) -> list:
    """The members, longest-standing first."""
    return [m for (m,) in Membership.select(Membership.user)
            .where(Membership.room == room_id)
            .order_by(Membership.id).tuples()]


def blockers_of(user_id, among) -> list:
    """Those of ``among`` who block ``user_id``."""
    return [b for (b,) in execute(
        'SELECT "blocker_id" FROM "block" WHERE "blocker_id" IN '
        f'({placeholders(among)}) AND "blocked_id" = ?',
        [*among, user_id]).fetchall()]


def room_counts(user_ids) -> dict:
    """{user id: rooms they are in} of those in any."""
    return dict(execute(
        'SELECT "user_id", COUNT(*) FROM "membership" WHERE "user_id" IN '
        f'({placeholders(user_ids)}) GROUP BY "user_id"',
        list(user_ids)).fetchall())


def add_members(room_id, user_ids, now, last_read_seq):
    """New memberships, read up to ``last_read_seq``; any departures of
    theirs from the room are forgotten."""
    Membership.insert_many([
        {'room': room_id, 'user': u, 'joined_at': now,
         'last_read_seq': last_read_seq} for u in user_ids]).execute()
    Departure.delete().where(Departure.room == room_id,
                             Departure.user.in_(user_ids)).execute()


def remove_member(room_id, user_id) -> int:
    """Delete a membership; how many rows went (0 or 1)."""
    return (Membership.delete().where(Membership.room == room_id,
                                      Membership.user == user_id)
            .execute())


def set_owner(room_id, owner_id):
    Room.update(owner=owner_id).where(Room.id == room_id).execute()


def set_name(room_id, name):
    Room.update(name=name).where(Room.id == room_id).execute()


def log_change(room_id, left_ids, now):
    """Take the room's next seq for a change just made, log it as a 'room'
    event with the room's state, and record the departures of
    ``left_ids`` (what ``sync`` tells them). Returns (seq, room, member
    ids)."""
    seq = execute('UPDATE "room" SET "last_seq" = "last_seq" + 1, '
                  '"last_activity_at" = ? WHERE "id" = ? '
                  'RETURNING "last_seq"', (now, room_id)).fetchone()[0]
    room = Room.get_by_id(room_id)
    members = member_ids(room_id)
    Event.insert(room=room_id, seq=seq, kind='room', data=json.dumps({
        'name': room.name, 'owner_id': room.owner_id, 'members': members,
        'created_at': room.created_at})).execute()
    if left_ids:
        Departure.delete().where(Departure.room == room_id,
                                 Departure.user.in_(left_ids)).execute()
        Departure.insert_many([{'user': u, 'room': room_id, 'seq': seq}
                               for u in left_ids]).execute()
    return seq, room, members
