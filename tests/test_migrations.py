"""Schema upgrades: a database written by an older version keeps serving
its messages after the server is upgraded, with no wipe, and ends with the
same schema as a database created fresh."""
import logging
import sqlite3
from contextlib import closing

import pytest

import models
from models import Attachment, User
from models.migrations import CURRENT_VERSION, migrate
from server.config import Config
from server.data import attachments as attachment_data
from server.services import attachments as attachments_service
from server.store import open_database
from tests.kit import ServerProcess, all_events, connect, http, pair, upload

OLD_INDEXES = {  # version 1 created these; version 2 drops them
    'message_room_id': 'CREATE INDEX "message_room_id" ON "message" '
                       '("room_id")',
    'message_sender_id': 'CREATE INDEX "message_sender_id" ON "message" '
                         '("sender_id")',
    'event_room_id': 'CREATE INDEX "event_room_id" ON "event" ("room_id")',
}
# Version 2 indexed attachment.message_id alone; version 3 replaces that
# index with this one.
V2_INDEX = ('CREATE INDEX "attachment_message_id" ON "attachment" '
            '("message_id")')
V3_INDEX = 'attachment_message_id_created_at'


def indexes(db_path):
    with sqlite3.connect(db_path) as db:
        return {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}


def index_statements(db_path) -> dict:
    """{index name: its CREATE statement} (None for the indexes SQLite
    makes for UNIQUE columns) and the stored schema version."""
    with closing(sqlite3.connect(db_path)) as db:
        statements = dict(db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
        (version,), = db.execute('SELECT "version" FROM "schemaversion"')
    return statements, version


@pytest.fixture
def fresh_db(tmp_path):
    """A SQLite file created by migrate() as a new server would, bound to
    the models in this process; yields its path."""
    path = tmp_path / 'fresh.db'
    database = open_database(f'sqlite:///{path}', Config())
    models.db.initialize(database)
    database.connect()
    try:
        migrate(database)
        yield path
    finally:
        database.close()
        models.db.initialize(None)


async def test_version_1_database_upgrades_in_place(tmp_path):
    server = ServerProcess(tmp_path).start()
    alice, bob, a, b, room = await pair(server.url)
    for i in range(3):
        ack = await a.call('send_dm', {'room_id': room['id'],
                                       'body': f'before {i}',
                                       'client_msg_id': f'old-{i}'})
        assert ack['ok'], ack
    await a.close()
    await b.close()
    assert await server.astop() == 0
    # Turn the file into what version 1 left behind.
    db_path = tmp_path / 'postbox.db'
    with sqlite3.connect(db_path) as db:
        for sql in OLD_INDEXES.values():
            db.execute(sql)
        db.execute('UPDATE "schemaversion" SET "version" = 1')
    assert set(OLD_INDEXES) <= indexes(db_path)

    server = ServerProcess(tmp_path, port=server.port).start()
    a = await connect(server.url, a.token)
    history = await a.call('history', {'room_id': room['id']})
    assert [m['body'] for m in history['messages']] == [
        'before 0', 'before 1', 'before 2']
    ack = await a.call('send_dm', {'room_id': room['id'],
                                   'body': 'before 0',
                                   'client_msg_id': 'old-0'})
    assert ack['message']['seq'] == 1  # still idempotent
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'after',
                                   'client_msg_id': 'new'})
    assert ack['message']['seq'] == 4
    await a.close()
    assert await server.astop() == 0
    assert not set(OLD_INDEXES) & indexes(db_path)


def test_fresh_database_has_the_cleanup_index(fresh_db):
    statements, version = index_statements(fresh_db)
    assert version == CURRENT_VERSION == 9
    assert statements[V3_INDEX] == (
        f'CREATE INDEX "{V3_INDEX}" ON "attachment" '
        '("message_id", "created_at")')
    assert 'attachment_message_id' not in statements


def test_orphan_cleanup_query_uses_the_index(fresh_db, caplog):
    user = User.create(username='u', display_name='u', created_at=0)

    def unsent(created_at):
        return Attachment.create(
            uploader=user, filename='f', content_type='text/plain', size=1,
            storage_key=f'k{created_at}', created_at=created_at).id
    newer, older = unsent(2000), unsent(1000)
    unsent(9000)  # not old enough
    # The query exactly as the cleanup runs it, taken from Peewee's log.
    with caplog.at_level(logging.DEBUG, logger='peewee'):
        rows = attachment_data.unsent_before(
            5000, attachments_service.CLEANUP_BATCH)
    assert [row[0] for row in rows] == [older, newer]  # oldest first
    (sql, params), = [r.msg for r in caplog.records if r.name == 'peewee']
    plan = [row[3] for row in models.db.execute_sql(
        'EXPLAIN QUERY PLAN ' + sql, params)]
    assert plan == [f'SEARCH t1 USING INDEX {V3_INDEX} '
                    '(message_id=? AND created_at<?)'], plan  # no sort


async def test_version_2_database_upgrades_to_3(tmp_path, fresh_db):
    data_dir = tmp_path / 'server'
    server = ServerProcess(data_dir).start()
    alice, bob, a, b, room = await pair(server.url)
    ids = {}
    for name in ('sent.txt', 'unsent.txt'):
        status, body = await upload(server.url, a.token,
                                    name.encode() * 3, name)
        assert status == 201, body
        ids[name] = body['attachment']['id']
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'file',
                                   'client_msg_id': 'with-file',
                                   'attachments': [ids['sent.txt']]})
    assert ack['ok'], ack
    await a.close()
    await b.close()
    assert await server.astop() == 0
    # Turn the file into what version 2 left behind.
    db_path = data_dir / 'postbox.db'
    with closing(sqlite3.connect(db_path)) as db, db:
        db.execute(f'DROP INDEX "{V3_INDEX}"')
        db.execute(V2_INDEX)
        db.execute('UPDATE "schemaversion" SET "version" = 2')
        rows = db.execute('SELECT * FROM "attachment" ORDER BY "id"')
        before = rows.fetchall()
    statements, version = index_statements(db_path)
    assert version == 2
    assert 'attachment_message_id' in statements
    assert V3_INDEX not in statements

    server = ServerProcess(data_dir, port=server.port).start()
    try:
        b = await connect(server.url, b.token)
        history = await b.call('history', {'room_id': room['id']})
        (message,) = history['messages']
        assert [att['id'] for att in message['attachments']] == [
            ids['sent.txt']]
        for name, token in (('sent.txt', b.token), ('unsent.txt', a.token)):
            status, text = await http(server.url, 'GET',
                                      f'/api/attachments/{ids[name]}',
                                      token=token)
            assert (status, text) == (200, name * 3)
        await b.close()
    finally:
        assert await server.astop() == 0, server.read_log()
    with closing(sqlite3.connect(db_path)) as db:
        rows = db.execute('SELECT * FROM "attachment" ORDER BY "id"')
        assert rows.fetchall() == before
    # The same indexes, and version, as a database created fresh.
    assert index_statements(db_path) == index_statements(fresh_db)


# What version 3 had of what version 4 changes: the event table as it
# was created (message_id NOT NULL, no data), no room.owner_id, no
# departure table.
V3_EVENT_SQLITE = [
    'CREATE TABLE "event__v3" ("id" INTEGER NOT NULL PRIMARY KEY, '
    '"room_id" INTEGER NOT NULL, "seq" INTEGER NOT NULL, '
    '"kind" VARCHAR(16) NOT NULL, "message_id" INTEGER NOT NULL, '
    'FOREIGN KEY ("room_id") REFERENCES "room" ("id") ON DELETE CASCADE, '
    'FOREIGN KEY ("message_id") REFERENCES "message" ("id") '
    'ON DELETE CASCADE)',
    'INSERT INTO "event__v3" SELECT "id", "room_id", "seq", "kind", '
    '"message_id" FROM "event"',
    'DROP TABLE "event"',
    'ALTER TABLE "event__v3" RENAME TO "event"',
    'CREATE INDEX "event_message_id" ON "event" ("message_id")',
    'CREATE UNIQUE INDEX "event_room_id_seq" ON "event" ("room_id", "seq")',
    'CREATE TABLE "room__v3" ("id" INTEGER NOT NULL PRIMARY KEY, '
    '"kind" VARCHAR(8) NOT NULL, "name" VARCHAR(100), "dm_key" VARCHAR(48), '
    '"created_by_id" INTEGER NOT NULL, "created_at" INTEGER NOT NULL, '
    '"last_seq" INTEGER NOT NULL, "last_message_id" INTEGER, '
    '"last_activity_at" INTEGER NOT NULL, FOREIGN KEY ("created_by_id") '
    'REFERENCES "user" ("id") ON DELETE CASCADE)',
    'INSERT INTO "room__v3" SELECT "id", "kind", "name", "dm_key", '
    '"created_by_id", "created_at", "last_seq", "last_message_id", '
    '"last_activity_at" FROM "room"',
    'DROP TABLE "room"',
    'ALTER TABLE "room__v3" RENAME TO "room"',
    'CREATE UNIQUE INDEX "room_dm_key" ON "room" ("dm_key")',
    'CREATE INDEX "room_created_by_id" ON "room" ("created_by_id")',
]
V3_EVENT_POSTGRES = [
    'ALTER TABLE "event" DROP COLUMN "data"',
    'ALTER TABLE "event" ALTER COLUMN "message_id" SET NOT NULL',
    'ALTER TABLE "room" DROP COLUMN "owner_id"',
]


def run_sql(url, statements):
    """Run ``statements`` in one transaction (on SQLite with foreign keys
    off, as tables are rebuilt)."""
    if url.startswith('sqlite:'):
        with closing(sqlite3.connect(url[len('sqlite:///'):])) as db, db:
            for sql in statements:
                db.execute(sql)
        return
    database = open_database(url, Config())
    database.connect()
    try:
        with database.atomic():
            for sql in statements:
                database.execute_sql(sql)
    finally:
        database.close()


async def test_version_3_database_upgrades_to_4(tmp_path, database_url):
    """Groups of a version 3 database get their creator as owner, their
    messages and sync stay, and the event log then takes room events
    (a null message_id) under the same unique (room, seq) index."""
    url = database_url
    downgrade = V3_EVENT_SQLITE if url.startswith('sqlite:') \
        else V3_EVENT_POSTGRES
    env = {'POSTBOX_DATABASE_URL': url}
    server = ServerProcess(tmp_path, env=env).start()
    alice, bob, a, b, dm = await pair(server.url)
    ack = await a.call('create_group', {'name': 'old',
                                        'members': [bob['username']]})
    group = ack['room']
    for room in (dm, group):
        ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'v3',
                                       'client_msg_id': f'v3-{room["id"]}'})
        assert ack['ok'], ack
    await a.close()
    await b.close()
    assert await server.astop() == 0
    run_sql(url, downgrade + [
        'DROP TABLE "departure"',
        'UPDATE "schemaversion" SET "version" = 3'])

    server = ServerProcess(tmp_path, env=env, port=server.port).start()
    try:
        a = await connect(server.url, a.token)
        b = await connect(server.url, b.token)
        inbox = {r['room']['id']: r['room']
                 for r in (await a.call('rooms', {}))['rooms']}
        assert inbox[group['id']]['owner_id'] == alice['id']
        assert inbox[dm['id']]['owner_id'] is None
        ack = await a.call('rename_group', {'room_id': group['id'],
                                            'name': 'new'})
        assert ack['ok'] and ack['room']['last_seq'] == 2, ack
        ack = await a.call('leave_group', {'room_id': group['id']})
        assert ack['ok'], ack
        synced = await b.call('sync', {'rooms': {}})
        events = [(e['type'], e['room_id'], e['seq'])
                  for e in synced['events']]
        assert events == [('message', dm['id'], 1),
                          ('message', group['id'], 1),
                          ('room', group['id'], 2),
                          ('room', group['id'], 3)]
        assert synced['events'][-1]['room']['owner_id'] == bob['id']
        synced = await a.call('sync', {'rooms': {str(group['id']): 1,
                                                 str(dm['id']): 1}})
        assert synced['events'] == [{'type': 'room_left',
                                     'room_id': group['id'], 'seq': 3}]
        await a.close()
        await b.close()
    finally:
        assert await server.astop() == 0, server.read_log()
    # The (room, seq) index still refuses a second event at one seq.
    with pytest.raises(Exception, match='(?i)unique'):
        run_sql(url, ['INSERT INTO "event" ("room_id", "seq", "kind") '
                      f'VALUES ({group["id"]}, 3, \'room\')'])


async def test_version_7_database_upgrades_to_8(tmp_path, database_url):
    """Version 7 logged every new message in the event log too; version 8
    reads new messages from the message table. After the upgrade, sync
    (paged two events at a time, so that both sides of the merge are cut
    short) still replays each message once, in seq order with the edits
    and the group's changes, and so do messages sent after it."""
    url = database_url
    env = {'POSTBOX_DATABASE_URL': url, 'POSTBOX_SYNC_PAGE_SIZE': '2'}
    server = ServerProcess(tmp_path, env=env).start()
    alice, bob, a, b, dm = await pair(server.url)
    for i in range(3):
        ack = await a.call('send_dm', {'room_id': dm['id'], 'body': f'm{i}',
                                       'client_msg_id': f'v7-{i}'})
        assert ack['ok'], ack
        if i == 1:
            second = ack['message']['id']
    ack = await a.call('edit_message', {'message_id': second,
                                        'body': 'edited'})
    assert ack['ok'], ack
    ack = await a.call('send_dm', {'room_id': dm['id'], 'body': 'm3',
                                   'client_msg_id': 'v7-3'})
    assert ack['ok'], ack
    group = (await a.call('create_group', {
        'name': 'old', 'members': [bob['username']]}))['room']
    ack = await a.call('send_dm', {'room_id': group['id'], 'body': 'g0',
                                   'client_msg_id': 'v7-g0'})
    assert ack['ok'], ack
    assert (await a.call('rename_group', {'room_id': group['id'],
                                          'name': 'new'}))['ok']
    await a.close()
    await b.close()
    assert await server.astop() == 0
    # What version 7 wrote: a 'message' row in the log for every message.
    run_sql(url, [
        'INSERT INTO "event" ("room_id", "seq", "kind", "message_id") '
        'SELECT "room_id", "seq", \'message\', "id" FROM "message"',
        'UPDATE "schemaversion" SET "version" = 7'])

    server = ServerProcess(tmp_path, env=env, port=server.port).start()
    try:
        b = await connect(server.url, b.token)
        events = await all_events(b)
        assert [(e['type'], e['room_id'], e['seq']) for e in events] == [
            ('message', dm['id'], 1), ('message', dm['id'], 2),
            ('message', dm['id'], 3), ('message_updated', dm['id'], 4),
            ('message', dm['id'], 5),
            ('message', group['id'], 1), ('room', group['id'], 2)]
        bodies = [e['message']['body'] for e in events
                  if e['type'] == 'message']
        assert bodies == ['m0', 'edited', 'm2', 'm3', 'g0']
        assert events[-1]['room']['name'] == 'new'
        a = await connect(server.url, a.token)
        ack = await a.call('send_dm', {'room_id': dm['id'], 'body': 'v8',
                                       'client_msg_id': 'v8'})
        assert ack['ok'] and ack['message']['seq'] == 6, ack
        known = {str(dm['id']): 5, str(group['id']): 2}
        later = await all_events(b, known)
        assert [(e['type'], e['message']['body']) for e in later] == [
            ('message', 'v8')]
        # A version-7 process still running beside the upgraded one logs
        # its message in the event log too: read once all the same.
        run_sql(url, [
            'INSERT INTO "event" ("room_id", "seq", "kind", "message_id") '
            f'VALUES ({dm["id"]}, 6, \'message\', {ack["message"]["id"]})'])
        again = await all_events(b, known)
        assert [(e['type'], e['seq']) for e in again] == [('message', 6)]
        await a.close()
        await b.close()
    finally:
        assert await server.astop() == 0, server.read_log()

