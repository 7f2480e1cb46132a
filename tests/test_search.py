"""Search (`search` event, `GET /api/search`): words in any script, case
and accents ignored, only the caller's rooms, current bodies only, newest
first with paging. Runs on SQLite, and on PostgreSQL with
POSTBOX_TEST_DB=postgres (tests/run.sh)."""
import asyncio
import sqlite3
from contextlib import closing
from urllib.parse import quote

import pytest

from tests.kit import ServerProcess, connect, http, pair, register, unique_name


async def send(client, room, body):
    ack = await client.call('send_dm', {'room_id': room['id'], 'body': body,
                                        'client_msg_id': unique_name('c')})
    assert ack['ok'], ack
    return ack['message']


async def found(client, query, **extra):
    """The bodies a search finds, newest first."""
    ack = await client.call('search', {'query': query, **extra})
    assert ack['ok'], ack
    return [m['body'] for m in ack['results']]


async def test_case_and_accents_are_ignored_both_ways(base):
    alice, bob, a, b, room = await pair(base)
    await send(a, room, 'Viele Grüße aus Köln!')
    await send(b, room, 'un café crème, merci')
    await send(a, room, 'CAFE NOIR please')
    for query in ('grüße', 'GRÜSSE', 'grüsse', 'Grusse', 'köln', 'KOLN'):
        assert await found(b, query) == ['Viele Grüße aus Köln!'], query
    both = ['CAFE NOIR please', 'un café crème, merci']
    for query in ('cafe', 'café', 'CAFÉ', 'Cafè'):
        assert await found(a, query) == both, query
    assert await found(a, 'creme merci') == ['un café crème, merci']
    await a.close()
    await b.close()


async def test_words_inside_words_and_short_words(base):
    alice, bob, a, b, room = await pair(base)
    await send(a, room, 'the redeployment finished')
    await send(a, room, 'ok, see the book')
    # 3+ characters match inside longer words, in any case.
    assert await found(b, 'deploy') == ['the redeployment finished']
    assert await found(b, 'DEPLOYM') == ['the redeployment finished']
    assert await found(b, 'ploy fini') == ['the redeployment finished']
    # Shorter words match at the start of a word only.
    assert await found(b, 'ok') == ['ok, see the book']
    assert await found(b, 'OK') == ['ok, see the book']
    assert await found(b, 're') == ['the redeployment finished']
    assert await found(b, 'oo') == []
    # Punctuation is not part of a word.
    assert await found(b, '"ok" (see)') == ['ok, see the book']
    await a.close()
    await b.close()


async def test_japanese_korean_and_other_scripts(base):
    alice, bob, a, b, room = await pair(base)
    tokyo = await send(a, room, '東京タワーに行きました')
    await send(a, room, '京都は明日です')
    korean = await send(b, room, '내일 회의는 취소되었습니다')
    await send(b, room, 'Привет, как дела?')
    assert await found(b, '東京') == [tokyo['body']]  # 2 characters
    assert await found(b, 'タワー') == [tokyo['body']]
    assert await found(b, '行き') == [tokyo['body']]
    ack = await b.call('search', {'query': '京'})
    assert ack['error']['code'] == 'invalid'
    assert await found(a, '회의') == [korean['body']]
    assert await found(a, '취소') == [korean['body']]
    assert await found(a, '회의는 내일') == [korean['body']]
    assert await found(a, 'ПРИВЕТ') == ['Привет, как дела?']
    assert await found(a, 'дела') == ['Привет, как дела?']
    await a.close()
    await b.close()


async def test_every_word_must_occur(base):
    alice, bob, a, b, room = await pair(base)
    await send(a, room, 'lunch tomorrow at noon')
    await send(a, room, 'lunch today')
    await send(a, room, 'tomorrow is friday')
    assert await found(b, 'lunch tomorrow') == ['lunch tomorrow at noon']
    assert await found(b, 'tomorrow lunch') == ['lunch tomorrow at noon']
    assert await found(b, 'lunch') == ['lunch today',
                                       'lunch tomorrow at noon']
    assert await found(b, 'lunch friday') == []
    await a.close()
    await b.close()


async def test_only_rooms_the_caller_is_in_now(base):
    alice, bob, a, b, room = await pair(base)
    carol, tc = await register(base)
    c = await connect(base, tc)
    word = unique_name('zebra')
    await send(a, room, f'secret {word}')
    ack = await c.call('open_dm', {'username': alice['username']})
    other = ack['room']
    await send(c, other, f'carol {word}')
    assert await found(c, word) == [f'carol {word}']
    assert await found(b, word) == [f'secret {word}']
    assert await found(a, word) == [f'carol {word}', f'secret {word}']
    # Naming a room you are not in does not search it.
    ack = await c.call('search', {'query': word, 'room_id': room['id']})
    assert ack['error']['code'] == 'forbidden'
    ack = await c.call('search', {'query': word, 'room_id': 10 ** 12})
    assert ack['error']['code'] == 'not_found'
    status, body = await http(base, 'GET', '/api/search?q=' + word +
                              f'&room_id={room["id"]}', token=tc)
    assert status == 403 and body['error']['code'] == 'forbidden'
    # A group left is no longer searched.
    ack = await a.call('create_group', {'name': 'g', 'members': [
        bob['username'], carol['username']]})
    group = ack['room']
    await send(a, group, f'group {word}')
    assert await found(c, word) == [f'group {word}', f'carol {word}']
    ack = await c.call('leave_group', {'room_id': group['id']})
    assert ack['ok'], ack
    assert await found(c, word) == [f'carol {word}']
    for client in (a, b, c):
        await client.close()


async def test_edits_and_deletes(base):
    alice, bob, a, b, room = await pair(base)
    first = await send(a, room, 'the meeting is on monday')
    second = await send(a, room, 'bring the invoice')
    ack = await a.call('edit_message', {'message_id': first['id'],
                                        'body': 'the concert is on tuesday'})
    assert ack['ok'], ack
    assert await found(b, 'monday') == []
    assert await found(b, 'meeting') == []
    assert await found(b, 'tuesday') == ['the concert is on tuesday']
    ack = await b.call('search', {'query': 'concert'})
    assert ack['results'][0]['edited_at'] is not None
    # A reaction leaves the message findable (and unchanged).
    ack = await b.call('react', {'message_id': second['id'], 'emoji': '👍',
                                 'on': True})
    assert ack['ok'], ack
    ack = await b.call('search', {'query': 'invoice'})
    assert [m['id'] for m in ack['results']] == [second['id']]
    assert ack['results'][0]['reactions'] == {'👍': [bob['id']]}
    ack = await a.call('delete_message', {'message_id': second['id']})
    assert ack['ok'], ack
    assert await found(b, 'invoice') == []
    assert await found(b, 'the') == ['the concert is on tuesday']
    await a.close()
    await b.close()


async def test_paging_newest_first_and_room_filter(base):
    alice, bob, a, b, room = await pair(base)
    carol, tc = await register(base)
    c = await connect(base, tc)
    ack = await a.call('open_dm', {'username': carol['username']})
    other = ack['room']
    sent = []
    for i in range(5):
        sent.append(await send(a, room, f'weekend plan {i}'))
        sent.append(await send(a, other, f'weekend trip {i}'))
    ids = [m['id'] for m in reversed(sent)]
    ack = await a.call('search', {'query': 'weekend', 'limit': 4})
    assert [m['id'] for m in ack['results']] == ids[:4]
    assert ack['has_more'] is True
    pages, before = [], None
    while True:
        query = {'query': 'weekend', 'limit': 3}
        if before:
            query['before'] = before
        ack = await a.call('search', query)
        pages += [m['id'] for m in ack['results']]
        before = ack['results'][-1]['id'] if ack['results'] else None
        if not ack['has_more']:
            break
    assert pages == ids
    # One room only.
    ack = await a.call('search', {'query': 'weekend', 'room_id': room['id']})
    assert [m['body'] for m in ack['results']] == [
        f'weekend plan {i}' for i in reversed(range(5))]
    assert ack['has_more'] is False
    ack = await a.call('search', {'query': 'weekend', 'room_id': room['id'],
                                  'before': sent[4]['id'], 'limit': 1})
    assert [m['body'] for m in ack['results']] == ['weekend plan 1']
    assert ack['has_more'] is True
    # The same over HTTP.
    status, body = await http(
        base, 'GET', f'/api/search?q=weekend&room_id={other["id"]}'
        f'&limit=2&before={sent[5]["id"]}', token=a.token)
    assert status == 200, body
    assert [m['body'] for m in body['results']] == ['weekend trip 1',
                                                    'weekend trip 0']
    assert body['has_more'] is False
    assert body['results'][0]['sender']['id'] == alice['id']
    status, body = await http(base, 'GET', '/api/search?q=' +
                              quote('wEEkénd PLAN 3'), token=c.token)
    assert status == 200 and body == {'results': [], 'has_more': False}
    for client in (a, b, c):
        await client.close()


async def test_invalid_queries(base):
    alice, bob, a, b, room = await pair(base)
    await send(a, room, '100% sure_thing "quoted" AND OR NOT * ^ -x')
    for query in ('', 'a', ' b ', 'x' * 201, None, 12, ['ab'], 'ab\x00cd'):
        ack = await a.call('search', {'query': query})
        assert ack['error']['code'] == 'invalid', (query, ack)
    for extra in ({'limit': 0}, {'limit': 51}, {'limit': 'x'},
                  {'before': 'x'}, {'before': 0}, {'room_id': 'x'},
                  {'limit': True}):
        ack = await a.call('search', {'query': 'sure', **extra})
        assert ack['error']['code'] == 'invalid', (extra, ack)
    ack = await a.call('search', 'sure')
    assert ack['error']['code'] == 'invalid'
    # Query syntax of the index is just text here.
    for query in ('100%', 'sure_thing', '"quoted"', 'AND OR', 'NOT *',
                  '^ -x'):
        assert len(await found(a, query)) == 1, query
    ack = await a.call('search', {'query': '!!'})
    assert ack == {'ok': True, 'results': [], 'has_more': False}
    for path in ('/api/search', '/api/search?q=a', '/api/search?q=ab%00cd',
                 '/api/search?q=ok&limit=x',
                 '/api/search?q=ok&limit=60', '/api/search?q=ok&before=y'):
        status, body = await http(base, 'GET', path, token=a.token)
        assert status == 400 and body['error']['code'] == 'invalid', (
            path, body)
    status, body = await http(base, 'GET', '/api/search?q=ok')
    assert status == 401
    await a.close()
    await b.close()


async def _search_until(client, query, expected, timeout=30):
    """Search until the answer is ``expected`` (the backfill runs in the
    background), within ``timeout`` seconds; returns the last answer."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await found(client, query, limit=50)
        if got == expected or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.1)


def run_sql(url, statements):
    """Run ``statements`` in one transaction; returns the last one's rows."""
    if url.startswith('sqlite:'):
        with closing(sqlite3.connect(url[len('sqlite:///'):])) as db, db:
            for sql in statements:
                rows = db.execute(sql).fetchall()
        return rows
    from server.config import Config
    from server.store import open_database
    database = open_database(url, Config())
    database.connect()
    try:
        with database.atomic():
            for sql in statements:
                cursor = database.execute_sql(sql)
                rows = cursor.fetchall() if cursor.description else None
        return rows
    finally:
        database.close()


# What version 4 had instead of the search index.
V4_SQLITE = ['DROP TRIGGER IF EXISTS "message_text_insert"',
             'DROP TRIGGER "message_text_update"',
             'DROP TRIGGER "message_text_delete"',
             'DROP TABLE "search_changed"']
V4_POSTGRES = ['DROP TRIGGER message_text_insert ON message',
               'DROP TRIGGER message_text_update ON message',
               'DROP TRIGGER message_text_delete ON message',
               'DROP FUNCTION pb_message_text()']


async def test_messages_from_before_the_upgrade_are_indexed(
        tmp_path, database_url):
    """A version 4 database (no search index) upgraded: the migration
    makes the index and the messages already stored are indexed in
    batches (here of 3) while the server serves."""
    url = database_url
    downgrade = V4_SQLITE if url.startswith('sqlite:') else V4_POSTGRES
    server = ServerProcess(tmp_path, env={'POSTBOX_DATABASE_URL': url})
    server.start()
    alice, bob, a, b, room = await pair(server.url)
    old = [await send(a, room, f'Überraschung number {i}')
           for i in range(10)]
    ack = await a.call('edit_message', {'message_id': old[2]['id'],
                                        'body': 'changed before'})
    assert ack['ok']
    ack = await a.call('delete_message', {'message_id': old[3]['id']})
    assert ack['ok']
    await a.close()
    await b.close()
    assert await server.astop() == 0
    run_sql(url, downgrade + [
        'DROP TABLE "message_text"', 'DROP TABLE "search_backfill"',
        'UPDATE "schemaversion" SET "version" = 4'])

    server = ServerProcess(tmp_path, port=server.port, env={
        'POSTBOX_DATABASE_URL': url,
        'POSTBOX_SEARCH_BACKFILL_BATCH': '3'}).start()
    try:
        a = await connect(server.url, a.token)
        expected = [f'Überraschung number {i}' for i in (9, 8, 7, 6, 5, 4,
                                                          1, 0)]
        assert await _search_until(a, 'uberraschung', expected) == expected
        assert await found(a, 'changed') == ['changed before']
        new = await send(a, room, 'überraschung after')
        assert (await found(a, 'UBERRASCHUNG'))[0] == new['body']
        await a.close()
    finally:
        assert await server.astop() == 0, server.read_log()
    from models.migrations import CURRENT_VERSION
    assert run_sql(url, ['SELECT "version" FROM "schemaversion"']) == [
        (CURRENT_VERSION,)]
    assert run_sql(url, ['SELECT COUNT(*) FROM "search_backfill"']) == [(0,)]
    # The index holds exactly the live messages: 9 old ones, 1 new.
    assert run_sql(url, ['SELECT COUNT(*) FROM "message_text"']) == [(10,)]


# What version 6 had on SQLite: the trigram index in the database,
# written by the insert trigger in the send's transaction.
V6_SQLITE = [
    'CREATE VIRTUAL TABLE "message_fts" USING fts5("text", content=\'\', '
    'detail=none, columnsize=0, tokenize=\'trigram case_sensitive 1\')',
    'INSERT INTO "message_fts" ("rowid", "text") '
    'SELECT "message_id", "text" FROM "message_text"',
    'CREATE TRIGGER "message_text_insert" AFTER INSERT ON "message" '
    'WHEN NOT NEW."deleted" BEGIN INSERT INTO "message_text" VALUES '
    '(NEW."room_id", NEW."id", pb_fold(NEW."body")); '
    'INSERT INTO "message_fts" ("rowid", "text") SELECT "message_id", '
    '"text" FROM "message_text" WHERE "room_id" = NEW."room_id" AND '
    '"message_id" = NEW."id"; END',
    'DROP TRIGGER "message_text_update"',
    'CREATE TRIGGER "message_text_update" AFTER UPDATE OF "body", '
    '"deleted" ON "message" WHEN OLD."body" IS NOT NEW."body" OR '
    'OLD."deleted" IS NOT NEW."deleted" BEGIN '
    'INSERT INTO "message_fts" ("message_fts", "rowid", "text") '
    'SELECT \'delete\', "message_id", "text" FROM "message_text" '
    'WHERE "room_id" = OLD."room_id" AND "message_id" = OLD."id"; '
    'DELETE FROM "message_text" WHERE "room_id" = OLD."room_id" AND '
    '"message_id" = OLD."id"; '
    'INSERT INTO "message_text" SELECT NEW."room_id", NEW."id", '
    'pb_fold(NEW."body") WHERE NOT NEW."deleted"; '
    'INSERT INTO "message_fts" ("rowid", "text") SELECT "message_id", '
    '"text" FROM "message_text" WHERE "room_id" = NEW."room_id" AND '
    '"message_id" = NEW."id"; END',
    'DROP TRIGGER "message_text_delete"',
    'CREATE TRIGGER "message_text_delete" AFTER DELETE ON "message" BEGIN '
    'INSERT INTO "message_fts" ("message_fts", "rowid", "text") '
    'SELECT \'delete\', "message_id", "text" FROM "message_text" '
    'WHERE "room_id" = OLD."room_id" AND "message_id" = OLD."id"; '
    'DELETE FROM "message_text" WHERE "room_id" = OLD."room_id" AND '
    '"message_id" = OLD."id"; END',
    'DROP TABLE "search_changed"', 'DROP TABLE "search_pruned"',
    'UPDATE "schemaversion" SET "version" = 6']


async def test_version_6_database_moves_its_trigram_index_out(tmp_path):
    """SQLite, version 6 to 7: the in-database trigram index and the
    triggers that wrote it go (an edit or a delete would fail on the
    dropped table otherwise), sends, edits and deletes work and are
    found, the trigram file is filled from the messages already
    stored."""
    db_file = tmp_path / 'p.db'
    env = {'POSTBOX_DATABASE_URL': f'sqlite:///{db_file}'}
    server = ServerProcess(tmp_path, env=env).start()
    alice, bob, a, b, room = await pair(server.url)
    old = [await send(a, room, f'Ärger number {i}') for i in range(3)]
    await a.close()
    await b.close()
    assert await server.astop() == 0
    (tmp_path / 'p.db-search').unlink()
    run_sql(f'sqlite:///{db_file}', V6_SQLITE)

    server = ServerProcess(tmp_path, port=server.port, env=env).start()
    try:
        a = await connect(server.url, a.token)
        new = await send(a, room, 'ärger after the upgrade')
        ack = await a.call('edit_message', {'message_id': old[0]['id'],
                                            'body': 'calm now'})
        assert ack['ok'], ack
        assert await found(a, 'arger') == [
            'ärger after the upgrade', 'Ärger number 2', 'Ärger number 1']
        assert await found(a, 'calm') == ['calm now']
        ack = await a.call('delete_message', {'message_id': old[1]['id']})
        assert ack['ok'], ack
        assert await found(a, 'arger') == [
            'ärger after the upgrade', 'Ärger number 2']
        await _until_indexed(db_file, (new['id'], 1))
        await a.close()
    finally:
        assert await server.astop() == 0, server.read_log()
    assert run_sql(f'sqlite:///{db_file}', [
        'SELECT "name" FROM "sqlite_master" WHERE "name" LIKE '
        '\'message_fts%\' OR "name" = \'message_text_insert\'']) == []


async def test_bot_sdk_search(base):
    from client_demo.bot import Bot, BotError
    owner, owner_token = await register(base)
    status, data = await http(base, 'POST', '/api/bots', owner_token,
                              json={'username': unique_name('bot')})
    assert status == 201, data
    bot_user, token = data['user'], data['token']
    client = await connect(base, owner_token)
    ack = await client.call('open_dm', {'username': bot_user['username']})
    room = ack['room']
    first = await send(client, room, 'deploy finished on staging')
    second = await send(client, room, 'deploy started on production')
    bot = Bot(base, token)
    await bot.start(timeout=10)
    try:
        messages, more = await bot.search('DEPLOY', limit=1)
        assert [m['id'] for m in messages] == [second['id']] and more
        messages, more = await bot.search('deploy', room_id=room['id'],
                                          before=second['id'])
        assert [m['id'] for m in messages] == [first['id']] and not more
        try:
            await bot.search('x')
        except BotError as exc:
            assert exc.code == 'invalid'
        else:
            raise AssertionError('a 1-character query was accepted')
    finally:
        await client.close()
        await bot.stop()


# -- the index's two ways, directly on a temporary SQLite file ------------

def _small_world(tmp_path):
    """A database with 3 users: 1 in rooms 1-2, 2 in rooms 2-3, 3 in room 3
    only; 600 messages over the rooms (every 7th says "needle"). Returns
    the bound database."""
    import models
    from models import Membership, Message, Room, User
    from models.migrations import migrate
    from server.config import Config
    from server.store import open_database
    database = open_database(f'sqlite:///{tmp_path / "s.db"}', Config())
    models.db.initialize(database)
    database.connect()
    migrate(database)
    for uid in (1, 2, 3):
        User.create(id=uid, username=f'u{uid}', display_name='u',
                    created_at=0)
    for rid, members in ((1, (1,)), (2, (1, 2)), (3, (2, 3))):
        Room.create(id=rid, kind='group', name='g', created_by=members[0],
                    created_at=0, last_activity_at=0, last_seq=200)
        for uid in members:
            Membership.create(room=rid, user=uid, joined_at=0)
    with database.atomic():
        for n in range(600):
            rid = n % 3 + 1
            body = f'Needle № {n} in Köln' if n % 7 == 0 else f'hay {n}'
            _new_message(rid, n // 3 + 1, body)
    return database


def _new_message(room_id, seq, body):
    """A message row with its searchable text, as the send path writes
    them."""
    from models import Message
    from server.data.database import dialect
    message = Message.create(room=room_id, seq=seq, sender=room_id,
                             body=body, client_msg_id=f'm{room_id}-{seq}',
                             created_at=seq, update_seq=seq)
    dialect().insert_texts([(room_id, message.id, body)])
    return message


def test_index_led_and_room_walk_agree(tmp_path, monkeypatch):
    import models
    from models import Message
    from models import search
    database = _small_world(tmp_path)
    index = search.index(database)
    try:
        def both(user, query, room_id=None, before=None, limit=500):
            patterns = search.patterns(search.fold(query))
            monkeypatch.setattr(search, 'SCAN_ROWS', 10 ** 9)
            walked = index.find(database, user, patterns, room_id, before,
                                limit)
            monkeypatch.setattr(search, 'SCAN_ROWS', 0)
            monkeypatch.setattr(search, 'CANDIDATES_STEP', 7)
            led = index.find(database, user, patterns, room_id, before,
                             limit)
            assert index._logged == 0.0  # the file led: no walk instead
            assert led == walked, (user, query)
            return walked

        def rooms_of(ids):
            return {Message.get_by_id(i).room_id for i in ids}

        def index_all():
            while max(index.trigrams.step(100)) == 100:
                pass

        # Nothing in the trigram file yet: the led search walks it all;
        # then with part of it in the file, then all of it.
        needles = both(1, 'NEEDLE koln')
        assert len(needles) == 58 and rooms_of(needles) == {1, 2}
        assert needles == sorted(needles, reverse=True)
        assert index.trigrams.step(250) == (250, 0)
        assert both(1, 'NEEDLE koln') == needles
        index_all()
        assert index.trigrams.indexed() == (600, 0)
        assert both(1, 'NEEDLE koln') == needles
        assert rooms_of(both(3, 'needle')) == {3}
        assert rooms_of(both(2, 'needle', room_id=3)) == {3}
        assert both(1, 'needle', limit=5) == needles[:5]
        assert both(1, 'needle', before=needles[4], limit=3) == needles[5:8]
        assert both(1, 'haystack') == []
        # Edits and deletes through any path are found at once (the
        # edit log), and the same once the file has them.
        first = needles[0]
        Message.update(body='plain now').where(Message.id == first).execute()
        Message.update(deleted=True, body='').where(
            Message.id == needles[1]).execute()
        Message.update(body='Needle again').where(
            Message.id == needles[-1]).execute()
        for indexed in (False, True):
            assert both(1, 'needle') == needles[2:], indexed
            assert both(1, 'plain') == [first]
            index_all()
        assert index.trigrams.indexed() == (600, 2)
        database.execute_sql('SELECT 1')
        with database.atomic():
            search.prune_changes(database)
        assert database.execute_sql(
            'SELECT COUNT(*) FROM "search_changed"').fetchone() == (0,)
        Message.delete().where(Message.id == first).execute()
        assert both(1, 'plain') == []
        # A new message is found before the file has it.
        new = _new_message(1, 201, 'plain again')
        assert both(1, 'plain') == [new.id]
        index.trigrams.step(100)
        assert both(1, 'plain') == [new.id]
        # The walk reads only the caller's rooms: the membership index,
        # then primary key ranges of message_text, never a scan.
        plan = ' / '.join(r[3] for r in database.execute_sql(
            'EXPLAIN QUERY PLAN SELECT t."message_id" FROM "membership" m '
            'CROSS JOIN "message_text" t WHERE m."user_id" = ? AND '
            't."room_id" = m."room_id" AND t."message_id" < ? AND '
            't."message_id" > ? AND instr(t."text", ?) > 0 '
            'ORDER BY t."message_id" DESC LIMIT ?',
            (1, 10, 0, 'x', 5)).fetchall())
        assert 'membership_user_id_room_id (user_id=?)' in plan, plan
        assert ('PRIMARY KEY (room_id=? AND message_id>? AND message_id<?)'
                in plan), plan
        assert 'SCAN' not in plan, plan
    finally:
        index.trigrams.close()
        database.close()
        models.db.initialize(None)


def test_a_trigram_file_older_than_its_database_starts_again(
        tmp_path, monkeypatch, caplog):
    """A trigram file put back from before edits that were since pruned
    from the log (a backup restored, a crash that lost its last steps)
    would never find those edits: the indexer notices and fills it again
    from the start."""
    import shutil
    import models
    from models import Message
    from models import search
    database = _small_world(tmp_path)
    index = search.index(database)
    monkeypatch.setattr(search, 'SCAN_ROWS', 0)

    def led(query):
        ids = index.find(database, 3, search.patterns(search.fold(query)),
                         None, None, 50)
        assert index._logged == 0.0  # the file led
        return ids

    def index_all():
        while max(index.trigrams.step(100)) == 100:
            pass
    try:
        index_all()
        index.trigrams.close()  # its WAL checkpointed: one file to copy
        shutil.copyfile(index.trigrams.path, tmp_path / 'old')
        target = Message.select().where(Message.room == 3).first().id
        Message.update(body='zebra crossing').where(
            Message.id == target).execute()
        assert led('zebra') == [target]  # from the edit log
        index_all()
        with database.atomic():
            search.prune_changes(database)
        assert led('zebra') == [target]  # from the file
        index.trigrams.close()
        shutil.copyfile(tmp_path / 'old', index.trigrams.path)
        assert led('zebra') == []  # what the old file would say for good
        index_all()
        assert 'indexing again from the start' in caplog.text
        assert led('zebra') == [target]
    finally:
        index.trigrams.close()
        database.close()
        models.db.initialize(None)


def test_fold_is_the_same_typed_any_way():
    from models.search import fold
    import unicodedata
    assert fold('Grüße, GRÜSSE!') == ' grusse grusse '
    assert fold('Café') == fold('cafe') == fold('CAFÉ') == ' cafe '
    assert fold('ｶﾞﾝﾊﾞﾚ') == fold('ガンバレ') == ' ガンバレ '
    assert fold('が') != fold('か')  # voicing is not an accent
    assert fold('ﬁle №5') == ' file no5 '
    for text in ('Überraschung in Köln', '東京タワーに行きました',
                 '내일 회의는 취소되었습니다', 'Ελληνικά ΆΈΉ', 'déjà-vu façade',
                 'İstanbul Straße'):
        # Decomposed input (as some keyboards and macOS file names
        # produce) folds like the composed text.
        assert fold(unicodedata.normalize('NFD', text)) == fold(text), text


def _indexed(db_file):
    """The trigram file's (through, changes), or None while it has none."""
    try:
        with closing(sqlite3.connect(f'{db_file}-search')) as db:
            return db.execute(
                'SELECT "through", "changes" FROM "indexed"').fetchone()
    except sqlite3.Error:
        return None


async def _until_indexed(db_file, expected, timeout=30):
    deadline = asyncio.get_running_loop().time() + timeout
    while _indexed(db_file) != expected:
        assert asyncio.get_running_loop().time() < deadline, (
            _indexed(db_file), expected)
        await asyncio.sleep(0.05)


async def test_trigram_file_is_filled_after_commits_and_made_again(tmp_path):
    """SQLite: the server's indexer thread brings the trigram file up to
    every message sent and edit made; a file that became unreadable is
    made again and refilled (searches walk meanwhile)."""
    db_file = tmp_path / 'p.db'
    env = {'POSTBOX_DATABASE_URL': f'sqlite:///{db_file}'}
    server = ServerProcess(tmp_path, env=env).start()
    alice, bob, a, b, room = await pair(server.url)
    sent = [await send(a, room, f'Grüße number {i}') for i in range(5)]
    await _until_indexed(db_file, (sent[-1]['id'], 0))
    ack = await a.call('edit_message', {'message_id': sent[0]['id'],
                                        'body': 'rewritten'})
    assert ack['ok'], ack
    await _until_indexed(db_file, (sent[-1]['id'], 1))
    await a.close()
    await b.close()
    assert await server.astop() == 0

    (tmp_path / 'p.db-search').write_bytes(b'not a database at all' * 100)
    server = ServerProcess(tmp_path, port=server.port, env=env).start()
    try:
        a = await connect(server.url, a.token)
        assert await found(a, 'grusse') == [
            f'Grüße number {i}' for i in (4, 3, 2, 1)]
        await _until_indexed(db_file, (sent[-1]['id'], 1))
        assert 'making it again' in server.read_log()
        await a.close()
    finally:
        assert await server.astop() == 0, server.read_log()


async def test_processes_sharing_a_database_share_its_trigram_file(
        tmp_path):
    """Two processes on one SQLite file (no Redis: each client stays on
    its process) each run an indexer on the one trigram file: it ends up
    with every message either sent; deleted while they run, it is made
    again, refilled and used by both."""
    from tests.kit import running_servers
    db_file = tmp_path / 'p.db'
    env = {'POSTBOX_DATABASE_URL': f'sqlite:///{db_file}'}
    with running_servers(tmp_path, 2, env) as servers:
        alice, bob, a, b, room = await pair(servers[0].url)
        b2 = await connect(servers[1].url, b.token)
        sent = []
        for i in range(20):
            sender = a if i % 2 else b2
            sent.append(await send(sender, room, f'both ways {i}'))
        top = max(m['id'] for m in sent)
        await _until_indexed(db_file, (top, 0))
        inode = (tmp_path / 'p.db-search').stat().st_ino
        for suffix in ('', '-wal', '-shm'):
            (tmp_path / f'p.db-search{suffix}').unlink(missing_ok=True)
        sent.append(await send(a, room, 'both ways after'))
        await _until_indexed(db_file, (sent[-1]['id'], 0))
        assert (tmp_path / 'p.db-search').stat().st_ino != inode
        for client in (a, b2):
            assert len(await found(client, 'both ways', limit=50)) == 21
        for client in (a, b, b2):
            await client.close()
