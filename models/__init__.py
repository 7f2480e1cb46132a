"""Peewee models: the schema of Postbox and nothing else.

The database is bound late through ``db`` (a DatabaseProxy) so that tests and
production choose the backend: see ``server.store.open_database``. Times are
integer milliseconds since the epoch (UTC): compact, fast to compare, the
same on SQLite and PostgreSQL.
"""
from peewee import (BigIntegerField, BooleanField, CharField,
                    DatabaseProxy, ForeignKeyField, IntegerField, Model,
                    SQL, TextField)

db = DatabaseProxy()


class BaseModel(Model):
    class Meta:
        database = db


class User(BaseModel):
    username = CharField(max_length=32, unique=True)  # folded to lower case
    display_name = CharField(max_length=64)
    password_hash = CharField(max_length=256, null=True)  # null for bots
    is_bot = BooleanField(default=False)
    owner = ForeignKeyField('self', null=True, backref='bots',
                            on_delete='CASCADE')
    created_at = BigIntegerField()
    # Tokens issued before this time (ms) are revoked: bumped by logout-all
    # and password changes.
    tokens_valid_after = BigIntegerField(default=0)
    last_seen_at = BigIntegerField(null=True)


class Room(BaseModel):
    kind = CharField(max_length=8)  # 'dm' | 'group'
    name = CharField(max_length=100, null=True)
    # 'lowid:highid' for a dm, null for a group: the unique index makes the
    # database refuse a second dm room for the same pair.
    dm_key = CharField(max_length=48, null=True, unique=True)
    created_by = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    created_at = BigIntegerField()
    # Highest seq taken in this room; the writer increments it in the same
    # transaction that inserts what takes the seq (a new message, or an
    # event), so seqs have no gaps.
    last_seq = BigIntegerField(default=0)
    last_message_id = BigIntegerField(null=True)
    last_activity_at = BigIntegerField()
    # A group's owner (its creator until they leave, then the
    # longest-standing member; null for a dm and for an empty group). No
    # index: nothing looks rooms up by owner.
    owner = ForeignKeyField(User, null=True, backref='+',
                            on_delete='SET NULL', index=False)


class Membership(BaseModel):
    room = ForeignKeyField(Room, backref='memberships', on_delete='CASCADE')
    user = ForeignKeyField(User, backref='memberships', on_delete='CASCADE')
    last_read_seq = BigIntegerField(default=0)
    joined_at = BigIntegerField()
    # No push notifications for this room (``mute_room``). A default in
    # the schema too: raw SQL inserts leave it out.
    muted = BooleanField(default=False, constraints=[SQL('DEFAULT FALSE')])

    class Meta:
        indexes = ((('room', 'user'), True), (('user', 'room'), False))


class Message(BaseModel):
    # No single-column indexes on room and sender: the unique indexes below
    # start with them, and every index is one more B-tree page to write
    # per stored message.
    room = ForeignKeyField(Room, backref='messages', on_delete='CASCADE',
                           index=False)
    seq = BigIntegerField()  # the seq of the message's creation
    sender = ForeignKeyField(User, backref='+', on_delete='CASCADE',
                             index=False)
    body = TextField()
    client_msg_id = CharField(max_length=64)
    reply_to = BigIntegerField(null=True)
    created_at = BigIntegerField()
    edited_at = BigIntegerField(null=True)
    deleted = BooleanField(default=False)
    # The seq of the latest change (edit, delete, reaction); = seq if none.
    update_seq = BigIntegerField()

    class Meta:
        indexes = (
            (('room', 'seq'), True),
            # Idempotent sends: the database refuses a second message with the
            # same client_msg_id from the same sender.
            (('sender', 'client_msg_id'), True),
        )


class Event(BaseModel):
    """The room event log: one row per seq that is not a new message (a
    new message's seq is its own row's, in ``message``; sync merges the
    two). ``kind`` is 'message_updated' for an edit, delete or reaction
    change (with ``message``), 'room' for a change of a group's members,
    owner or name (``message`` null; ``data`` the room's state right after
    it, as JSON ``{"name", "owner_id", "members": [user ids]}``, so that
    ``sync`` replays it exactly as it was)."""
    room = ForeignKeyField(Room, backref='+', on_delete='CASCADE',
                           index=False)  # (room, seq) below serves it
    seq = BigIntegerField()
    kind = CharField(max_length=16)
    message = ForeignKeyField(Message, backref='+', on_delete='CASCADE',
                              null=True)
    data = TextField(null=True)

    class Meta:
        # Primary lookup of sync: everything after seq S in room R.
        indexes = ((('room', 'seq'), True),)


class Departure(BaseModel):
    """A user's latest departure from a group (left or removed) at the
    room's ``seq``, while they are out of it: ``sync`` answers a client
    that still lists the room with ``room_left``. Removed when they are
    added back."""
    user = ForeignKeyField(User, backref='+', on_delete='CASCADE',
                           index=False)  # (user, room) below serves it
    room = ForeignKeyField(Room, backref='+', on_delete='CASCADE')
    seq = BigIntegerField()

    class Meta:
        indexes = ((('user', 'room'), True),)


class Reaction(BaseModel):
    message = ForeignKeyField(Message, backref='reactions',
                              on_delete='CASCADE')
    user = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    emoji = CharField(max_length=32)
    created_at = BigIntegerField()

    class Meta:
        indexes = ((('message', 'user', 'emoji'), True),)


class Block(BaseModel):
    blocker = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    blocked = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    created_at = BigIntegerField()

    class Meta:
        indexes = ((('blocker', 'blocked'), True),)


class Attachment(BaseModel):
    uploader = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    # Null until sent. No index of its own: (message, created_at) below
    # starts with it.
    message = ForeignKeyField(Message, backref='attachments', null=True,
                              on_delete='SET NULL', index=False)
    filename = CharField(max_length=255)  # display only, never a path
    content_type = CharField(max_length=128)
    size = BigIntegerField()
    storage_key = CharField(max_length=128, unique=True)
    width = IntegerField(null=True)
    height = IntegerField(null=True)
    thumbnail_key = CharField(max_length=128, null=True)
    created_at = BigIntegerField()

    class Meta:
        indexes = (
            # Counting a user's unsent uploads.
            (('uploader', 'message'), False),
            # A message's attachments, and the cleanup of old unsent
            # uploads (message null, created_at before a cutoff, oldest
            # first), which then reads only the rows it removes.
            (('message', 'created_at'), False),
        )


class Webhook(BaseModel):
    """A bot's webhook: its events are POSTed to ``url``, signed with
    ``secret`` (``server/services/webhooks.py``)."""
    bot = ForeignKeyField(User, backref='+', on_delete='CASCADE',
                          unique=True)
    url = TextField()
    secret = CharField(max_length=64)
    created_at = BigIntegerField()


class PushSubscription(BaseModel):
    """Where to push a user's notifications while they are offline:
    ``kind`` 'webpush' (``endpoint`` with the browser's ``p256dh`` and
    ``auth`` keys) or 'gateway' (``app_id`` and ``pushkey`` for a Matrix
    push gateway; ``endpoint`` holds 'app_id pushkey', so one unique index
    finds either kind again)."""
    user = ForeignKeyField(User, backref='+', on_delete='CASCADE')
    kind = CharField(max_length=8)
    endpoint = TextField()
    p256dh = TextField(null=True)
    auth = TextField(null=True)
    app_id = CharField(max_length=128, null=True)
    pushkey = TextField(null=True)
    created_at = BigIntegerField()

    class Meta:
        table_name = 'push_subscription'
        # By endpoint alone too: a browser (or device) subscribing for one
        # user takes its endpoint from any other user it served before.
        indexes = ((('user', 'endpoint'), True), (('endpoint',), False))


class Outbox(BaseModel):
    """A delivery owed to the outside: a webhook POST (``kind``
    'webhook', ``target`` the bot's id) or a push (``kind`` 'push',
    ``target`` the subscription's id) of the event at (``room``, ``seq``).
    Written in the transaction that stores the event; deleted once
    delivered or dead-lettered (``server/services/outbox.py``).
    ``claimed_until``: a dispatcher holds the row until then (ms)."""
    kind = CharField(max_length=8)
    target = BigIntegerField()
    user_id = BigIntegerField()  # who it is for (the bot, the subscriber)
    room_id = BigIntegerField()
    seq = BigIntegerField()
    event = CharField(max_length=16)
    message_id = BigIntegerField(null=True)
    created_at = BigIntegerField()
    due_at = BigIntegerField()
    attempts = IntegerField(default=0)
    claimed_until = BigIntegerField(default=0)
    last_error = TextField(null=True)

    class Meta:
        indexes = (
            (('due_at',), False),
            # The head of each (target, room) queue: webhooks go in order.
            (('kind', 'target', 'room_id', 'seq'), False),
        )


class SchemaVersion(BaseModel):
    version = IntegerField()


ALL_MODELS = [User, Room, Membership, Message, Event, Reaction, Block,
              Attachment, Departure, Webhook, PushSubscription, Outbox,
              SchemaVersion]
