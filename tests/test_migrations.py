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
from server.services import attachments as attachments_service
from server.store import open_database
from tests.helpers import ServerProcess, connect, http, pair, upload

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
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'after',
                                   'client_msg_id': 'old-0'})
    assert ack['message']['body'] == 'before 0'  # still idempotent
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'after',
                                   'client_msg_id': 'new'})
    assert ack['message']['seq'] == 4
    await a.close()
    assert await server.astop() == 0
    assert not set(OLD_INDEXES) & indexes(db_path)


def test_fresh_database_has_the_cleanup_index(fresh_db):
    statements, version = index_statements(fresh_db)
    assert version == CURRENT_VERSION == 3
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
        rows = attachments_service._orphans(
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
