"""Typing and presence rules on top of the live state."""
from server.data import presence as data
from server.errors import Invalid, TooLarge
from server.services import rooms as rooms_service
from server.services.auth import check_username
from server.services.serialize import iso


async def set_typing(ctx, user_id, room_id, typing, sid):
    """Record that ``user_id`` is (not) typing in ``room_id``. Returns the
    member ids to tell if the change should be broadcast, else None.
    Forbidden in a dm with a user who blocks ``user_id``; in a dm with a
    user ``user_id`` blocks, nobody is told."""
    if not isinstance(typing, bool):
        raise Invalid('typing must be true or false')
    info = await rooms_service.member_room(ctx, user_id, room_id)
    audience = await rooms_service.live_audience(ctx, info, user_id,
                                                 refuse=True)
    if all(m == user_id for m in audience):
        # Nobody to tell (a dm with someone this user blocks): not even
        # recorded, so that the user's next message ends no typing.
        return None
    if ctx.typing.update(room_id, user_id, sid, typing):
        return audience
    return None


async def query(ctx, user_id, usernames) -> dict:
    """{username: {online, last_seen}} of the given usernames that
    ``user_id`` may see: themselves, and users who share a room with them
    and do not block them. Anyone else is left out, exactly as an unknown
    username is, so the answer does not tell who has an account. Raises
    Invalid, or TooLarge past ``presence_query_max`` usernames."""
    if not isinstance(usernames, list):
        raise Invalid('usernames must be a list')
    limit = ctx.config.presence_query_max
    if len(usernames) > limit:
        raise TooLarge(f'usernames: at most {limit} per call')
    names = list({check_username(u) for u in usernames})
    if not names:
        return {}
    ids = await ctx.store.read(data.visible_ids, user_id, names)
    status = await ctx.presence.status(list(ids.values()))
    return {name: {'online': status[uid][0], 'last_seen': iso(status[uid][1])}
            for name, uid in ids.items()}


async def set_block(ctx, user, username, on: bool):
    """Block (or unblock) ``username`` as ``rooms.set_block`` does, and say
    what the other user is to hear of ``user``'s presence now: a block
    hides it (offline, last seen unknown) from a user who could see it;
    an unblock shows it again to a user who now may. Returns (the other
    user's id, ``{online, last_seen}`` or None for nothing to tell)."""
    other_id = await rooms_service.find_user_id(ctx, username)
    me = [user['username']]
    saw = await ctx.store.read(data.visible_ids, other_id, me)
    await rooms_service.set_block(ctx, user['id'], username, on)
    if on:
        return other_id, {'online': False, 'last_seen': None} if saw else None
    if saw:  # was not blocked: nothing changes for them
        return other_id, None
    sees = await query(ctx, other_id, me)
    return other_id, sees.get(user['username'])


async def watchers(ctx, user_id) -> set:
    """Ids of the users told when ``user_id`` comes online or goes
    offline (``user_id`` itself included, for their other devices): the
    same users who may ask for it with ``query``: those who share a room
    with ``user_id`` and are not blocked by them."""
    return await ctx.store.read(data.watchers, user_id)
