"""Schema upgrades: a database written by an older version keeps serving
its messages after the server is upgraded, with no wipe."""
import sqlite3

from tests.helpers import ServerProcess, connect, pair

OLD_INDEXES = {  # version 1 created these; version 2 drops them
    'message_room_id': 'CREATE INDEX "message_room_id" ON "message" '
                       '("room_id")',
    'message_sender_id': 'CREATE INDEX "message_sender_id" ON "message" '
                         '("sender_id")',
    'event_room_id': 'CREATE INDEX "event_room_id" ON "event" ("room_id")',
}


def indexes(db_path):
    with sqlite3.connect(db_path) as db:
        return {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}


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
