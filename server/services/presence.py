"""Typing and presence rules on top of the live state."""
from server.errors import Invalid
from server.services import rooms as rooms_service
from server.services.auth import check_username
from server.services.serialize import iso
from models import User


async def set_typing(ctx, user_id, room_id, typing, sid):
    """Record that ``user_id`` is (not) typing in ``room_id``. Returns the
    room's member ids if the change should be broadcast, else None."""
    if not isinstance(typing, bool):
        raise Invalid('typing must be true or false')
    info = await rooms_service.member_room(ctx, user_id, room_id)
    if ctx.typing.update(room_id, user_id, sid, typing):
        return info.member_ids
    return None


def _ids_by_username(usernames):
    return dict(User.select(User.username, User.id)
                .where(User.username.in_(usernames)).tuples())


async def query(ctx, usernames) -> dict:
    """{username: {online, last_seen}} for the given usernames; unknown
    usernames are left out."""
    if not isinstance(usernames, list) or len(usernames) > 500:
        raise Invalid('usernames: a list of at most 500 usernames')
    names = [check_username(u) for u in usernames]
    ids = await ctx.store.read(_ids_by_username, names)
    status = await ctx.presence.status(list(ids.values()))
    return {name: {'online': status[uid][0], 'last_seen': iso(status[uid][1])}
            for name, uid in ids.items()}
