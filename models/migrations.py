"""Schema creation and upgrades.

``migrate(database)`` creates missing tables and runs every migration newer
than the stored schema version, each in its own transaction, so an upgrade
never needs a wipe. Add a migration by appending a function to MIGRATIONS
that uses ``playhouse.migrate`` operations.
"""
import logging

from playhouse.migrate import SchemaMigrator, migrate as run_ops  # noqa: F401

from peewee import TextField

from . import search
from . import (ALL_MODELS, Departure, Membership, Outbox, PushSubscription,
               Room, SchemaVersion, User, Webhook)

log = logging.getLogger(__name__)

# Version 1 is the schema created by create_tables. Later versions append
# functions taking (database, migrator), e.g.:
#   def _v2_add_user_bio(database, migrator):
#       run_ops(migrator.add_column('user', 'bio', TextField(default='')))


def _v2_drop_redundant_indexes(database, migrator):
    """Version 1 also indexed message.room, message.sender and event.room
    on their own, which the unique (room, seq) and (sender,
    client_msg_id) indexes already cover: dropping them leaves less to
    write per message."""
    for name in ('message_room_id', 'message_sender_id', 'event_room_id'):
        database.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


def _v3_index_attachments_by_age(database, migrator):
    """The orphan cleanup looks for attachments with no message created
    before a cutoff. Indexed on message alone, it read the row of every
    unsent upload, expired or not, to check its age; (message_id,
    created_at) finds just the expired ones, oldest first, and serves every
    lookup by message the old index served, so that one goes: still one
    index to write per upload."""
    database.execute_sql(
        'CREATE INDEX IF NOT EXISTS "attachment_message_id_created_at" '
        'ON "attachment" ("message_id", "created_at")')
    database.execute_sql('DROP INDEX IF EXISTS "attachment_message_id"')


def _v4_group_life_cycle(database, migrator):
    """Groups get an owner (existing groups: their creator), the event log
    holds membership events (``event.message_id`` nullable, the room's
    state in ``event.data``), and departures are remembered for ``sync``.
    On SQLite dropping NOT NULL rebuilds the event table (playhouse copies
    the rows and re-creates its indexes, the unique (room_id, seq) one
    included). Each step is skipped when already done, so a database whose
    version was set back (as the upgrade tests do) upgrades too."""
    rooms = {c.name: c for c in database.get_columns('room')}
    events = {c.name: c for c in database.get_columns('event')}
    ops = []
    if 'owner_id' not in rooms:
        ops.append(migrator.add_column('room', 'owner_id', Room.owner))
    if not events['message_id'].null:
        ops.append(migrator.drop_not_null('event', 'message_id'))
    if 'data' not in events:
        ops.append(migrator.add_column('event', 'data', TextField(null=True)))
    run_ops(*ops)
    Room.update(owner=Room.created_by).where(Room.kind == 'group').execute()
    database.create_tables([Departure], safe=True)


def _v5_search_index(database, migrator):
    """The search index (``models/search.py``): its tables and the
    triggers that keep it with every write. Existing messages are indexed
    afterwards, while the server serves, a batch per write transaction
    (``search.backfill_step``, run by ``server.services.search``), newest
    first; until then a search finds only what it has reached."""
    search.install(database)


def _v6_outbox(database, migrator):
    """Push notifications and bot webhooks: ``membership.muted``, the
    webhook and push subscription tables and the outbox of deliveries."""
    if 'muted' not in {c.name for c in database.get_columns('membership')}:
        run_ops(migrator.add_column('membership', 'muted', Membership.muted))
    database.create_tables([Webhook, PushSubscription, Outbox], safe=True)


def _v7_trigram_file(database, migrator):
    """SQLite's trigram index moves out of the send's transaction, to a
    file of its own (``models/trigrams.py``), refilled from
    ``message_text`` in the background; PostgreSQL is unchanged."""
    search.move_trigrams_out(database)


def _v8_messages_out_of_the_event_log(database, migrator):
    """A new message no longer writes a row to the event log (three
    B-trees: the table and its two indexes): ``sync`` reads new messages
    from the message table's own (room, seq) index and merges them with
    the log. The log's 'message' rows would now be read twice, so they
    go (one DELETE, in this migration's transaction)."""
    deleted = database.execute_sql(
        'DELETE FROM "event" WHERE "kind" = \'message\'').rowcount
    log.info('removed %s new-message rows from the event log', deleted)


def _v9_push_endpoints_by_endpoint(database, migrator):
    """An index on ``push_subscription.endpoint``: a subscription takes
    its endpoint from any other user's (a browser signed in as someone
    else before), so one person's pushes never reach another's device."""
    database.execute_sql(
        'CREATE INDEX IF NOT EXISTS "pushsubscription_endpoint" '
        'ON "push_subscription" ("endpoint")')


MIGRATIONS = [_v2_drop_redundant_indexes, _v3_index_attachments_by_age,
              _v4_group_life_cycle, _v5_search_index, _v6_outbox,
              _v7_trigram_file, _v8_messages_out_of_the_event_log,
              _v9_push_endpoints_by_endpoint]
CURRENT_VERSION = 1 + len(MIGRATIONS)


def migrate(database):
    """Bring ``database`` to CURRENT_VERSION. Safe to run from several
    processes at once: table creation is IF NOT EXISTS and each migration
    re-checks the version inside its transaction."""
    with database.atomic():
        database.create_tables(ALL_MODELS, safe=True)
        if not SchemaVersion.select().exists():
            SchemaVersion.create(version=CURRENT_VERSION)
            # Not a model: raw SQL (triggers, FTS5), made here for a new
            # database as the migration makes it for an old one.
            search.install(database, backfill=False)
            return
    migrator = SchemaMigrator.from_database(database)
    for number, step in enumerate(MIGRATIONS, start=2):
        with database.atomic():
            row = SchemaVersion.select().first()
            if row.version >= number:
                continue
            log.info('migrating schema to version %s', number)
            step(database, migrator)
            SchemaVersion.update(version=number).execute()
