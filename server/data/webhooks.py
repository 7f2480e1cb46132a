"""The SQL of bot webhooks: a bot's webhook row, its pending deliveries,
and what a batch of deliveries reads. The rules (who may set one, which
addresses are allowed, signing) are ``server.services.webhooks``."""
from models import Event, Outbox, Webhook


def save(bot_id, url, secret, now):
    """Set the bot's webhook (or replace its url and secret)."""
    (Webhook.insert(bot=bot_id, url=url, secret=secret, created_at=now)
     .on_conflict(conflict_target=[Webhook.bot],
                  update={Webhook.url: url, Webhook.secret: secret})
     .execute())


def remove(bot_id):
    Webhook.delete().where(Webhook.bot == bot_id).execute()


def drop_deliveries(bot_id):
    """Delete the outbox rows still pending for the bot's webhook."""
    Outbox.delete().where(Outbox.kind == 'webhook',
                          Outbox.target == bot_id).execute()


def hooks(bot_ids) -> dict:
    """{bot id: (url, secret)} of those of ``bot_ids`` with a webhook."""
    return {w.bot_id: (w.url, w.secret) for w in Webhook.select().where(
        Webhook.bot.in_(set(bot_ids)))}


def room_state(room_id, seq):
    """The data of the room's log event at ``seq`` (a 'room' event: the
    room as it was after a change), or None."""
    return (Event.select(Event.data)
            .where(Event.room == room_id, Event.seq == seq).scalar())
