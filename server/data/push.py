"""The SQL of push: subscriptions and the mute of a room (the rules are
``server.services.push``; who a room's pushes go to is
``server.data.outbox``)."""
from models import PushSubscription


def remove_subscriptions_of(user_id):
    """Forget every push subscription of the user."""
    PushSubscription.delete().where(PushSubscription.user == user_id).execute()
