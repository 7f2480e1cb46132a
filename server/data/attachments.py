"""The SQL of attachments: upload rows, what a user's uploads weigh,
who may read one, and the rows a deletion or the orphan sweep removes.
The rules (quotas, who may read, when a row may go) are
``server.services.attachments``."""
from peewee import fn

from models import Attachment, Membership, Message


def _totals(query) -> tuple:
    """(count, bytes) of the attachments ``query`` selects from."""
    return (query.select(fn.COUNT(Attachment.id),
                         fn.COALESCE(fn.SUM(Attachment.size), 0))
            .tuples().get())


def unsent_totals(user_id) -> tuple:
    """(count, bytes) of the user's uploads not sent yet."""
    return _totals(Attachment.select().where(
        Attachment.uploader == user_id, Attachment.message.is_null()))


def rooms_alone(user_id) -> list:
    """Ids of the rooms where the user is the only member."""
    others = Membership.alias()
    return [room for (room,) in Membership.select(Membership.room).where(
        Membership.user == user_id,
        ~fn.EXISTS(others.select(others.id).where(
            others.room == Membership.room,
            others.user != user_id))).tuples()]


def sent_totals(user_id, room_ids) -> tuple:
    """(count, bytes) of the user's uploads sent to these rooms."""
    return _totals(Attachment.select()
                   .join(Message, on=(Attachment.message == Message.id))
                   .where(Attachment.uploader == user_id,
                          Message.room.in_(room_ids)))


def create(user_id, filename, mime, size, key, width, height,
           thumbnail_key, now):
    """The new upload's row."""
    return Attachment.create(
        uploader=user_id, filename=filename, content_type=mime, size=size,
        storage_key=key, width=width, height=height,
        thumbnail_key=thumbnail_key, created_at=now)


def has_any(message_id) -> bool:
    """Whether the message carries attachments."""
    return Attachment.select().where(
        Attachment.message == message_id).exists()


def get(attachment_id):
    """The attachment's row, or None."""
    return Attachment.get_or_none(Attachment.id == attachment_id)


def in_room_of(user_id, message_id) -> bool:
    """Whether the user is a member of the message's room."""
    return Membership.select().join(
        Message, on=(Message.room == Membership.room)).where(
        Message.id == message_id, Membership.user == user_id).exists()


def delete_of_message(message_id) -> list:
    """Delete the message's attachment rows; their (storage_key,
    thumbnail_key) pairs."""
    rows = list(Attachment.select(Attachment.storage_key,
                                  Attachment.thumbnail_key)
                .where(Attachment.message == message_id).tuples())
    Attachment.delete().where(Attachment.message == message_id).execute()
    return rows


def unsent_before(cutoff_ms, limit) -> list:
    """(id, storage_key, thumbnail_key) of at most ``limit`` uploads never
    sent and created before ``cutoff_ms``, oldest first."""
    return list(Attachment.select(Attachment.id, Attachment.storage_key,
                                  Attachment.thumbnail_key)
                .where(Attachment.message.is_null(),
                       Attachment.created_at < cutoff_ms)
                # Oldest first: on SQLite the order of the (message,
                # created_at) index, so no sort and the search stops after
                # ``limit`` rows. PostgreSQL sorts the expired rows it
                # finds through that index.
                .order_by(Attachment.created_at, Attachment.id)
                .limit(limit).tuples())


def delete_unsent(attachment_id) -> bool:
    """Delete the upload if it is still unsent; whether it went."""
    return bool(Attachment.delete().where(
        Attachment.id == attachment_id,
        Attachment.message.is_null()).execute())
