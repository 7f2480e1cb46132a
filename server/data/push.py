"""The SQL of push: subscriptions, the mute of a room, and what a batch
of pushes reads (subscriptions, messages, unread counts). The rules are
``server.services.push``; who a room's pushes go to is
``server.data.outbox``."""
from peewee import fn

from models import Membership, Message, PushSubscription


def remove_subscriptions_of(user_id):
    """Forget every push subscription of the user."""
    PushSubscription.delete().where(PushSubscription.user == user_id).execute()


def subscription_count(user_id) -> int:
    return (PushSubscription.select()
            .where(PushSubscription.user == user_id).count())


def has_subscription(user_id, endpoint) -> bool:
    return PushSubscription.select().where(
        PushSubscription.user == user_id,
        PushSubscription.endpoint == endpoint).exists()


def save_subscription(user_id, fields, now):
    """Add the subscription (or, for the user's same endpoint, update its
    keys); its row."""
    (PushSubscription.insert(user=user_id, created_at=now, **fields)
     .on_conflict(conflict_target=[PushSubscription.user,
                                   PushSubscription.endpoint],
                  update={PushSubscription.p256dh: fields['p256dh'],
                          PushSubscription.auth: fields['auth']})
     .execute())
    return PushSubscription.get(
        PushSubscription.user == user_id,
        PushSubscription.endpoint == fields['endpoint'])


def take_endpoint(user_id, endpoint) -> int:
    """Remove other users' subscriptions of ``endpoint`` (the same browser
    or device, now subscribing for ``user_id``); how many went."""
    return PushSubscription.delete().where(
        PushSubscription.endpoint == endpoint,
        PushSubscription.user != user_id).execute()


def subscriptions_of(user_id) -> list:
    """The user's subscription rows, oldest first."""
    return list(PushSubscription.select().where(
        PushSubscription.user == user_id).order_by(PushSubscription.id))


def remove_subscription(user_id, subscription_id) -> int:
    """Delete one of the user's subscriptions; how many rows went (0 or
    1)."""
    return PushSubscription.delete().where(
        PushSubscription.id == subscription_id,
        PushSubscription.user == user_id).execute()


def remove_subscriptions(subscription_ids):
    PushSubscription.delete().where(
        PushSubscription.id.in_(list(subscription_ids))).execute()


def set_muted(user_id, room_id, muted):
    Membership.update(muted=muted).where(
        Membership.room == room_id, Membership.user == user_id).execute()


# -- what a batch of pushes reads ---------------------------------------------

def subscriptions(subscription_ids) -> dict:
    """{id: subscription row} of those that exist."""
    return {s.id: s for s in PushSubscription.select().where(
        PushSubscription.id.in_(set(subscription_ids)))}


def messages(message_ids) -> dict:
    """{id: message row (id, room, seq, sender, body, deleted)} of those
    that exist."""
    return {m.id: m for m in Message.select(
        Message.id, Message.room, Message.seq, Message.sender, Message.body,
        Message.deleted).where(Message.id.in_(set(message_ids)))}


def unread_counts(pairs) -> dict:
    """{(user id, room id): messages of others past the user's read
    marker, not deleted} of the (user, room) ``pairs``, in one query
    (a batch is mostly one room): two queries per pair cost ~1 ms of CPU
    a push, most of it building the queries."""
    pairs = set(pairs)
    count = Message.select(fn.COUNT(Message.id)).where(
        Message.room == Membership.room,
        Message.seq > Membership.last_read_seq,
        Message.sender != Membership.user,
        Message.deleted == False)  # noqa: E712
    return {(user_id, room_id): n for user_id, room_id, n in
            Membership.select(Membership.user, Membership.room,
                              count.alias('unread')).where(
                Membership.room.in_({p[1] for p in pairs}),
                Membership.user.in_({p[0] for p in pairs})).tuples()
            if (user_id, room_id) in pairs}
