"""The search index: what it stores, how it is kept, how it is queried.

Every message that is not deleted has a row in ``message_text``: its room,
its id and its body *folded* (``fold``: accents dropped, case folded,
compatibility forms unified, punctuation turned into spaces, padded with
one space each side), written in the same transaction as the message:
triggers on ``message`` keep the rows in step with every edit, delete and
cascade, and with every insert on PostgreSQL; on SQLite the send path
writes a new message's row (``insert_texts`` of its dialect, in
``server/data/database.py``, says why). The primary key (room_id,
message_id) lets a search walk just the caller's rooms, newest first.

- SQLite also keeps a trigram index (FTS5), in a file of its own next to
  the database, written after the messages commit by an indexer thread
  (``models/trigrams.py``, which says why). Edits reach it through the
  ``search_changed`` log the update trigger writes. The fold runs in
  Python (``pb_fold``, registered on every connection by ``attach``):
  SQLite 3.40's trigram tokenizer cannot drop accents.
- PostgreSQL keeps a GIN ``pg_trgm`` index on ``message_text.text``; the
  fold is an IMMUTABLE SQL function over ``unaccent``, ``lower`` and
  ``normalize``, and queries are folded by the same function, so both
  sides agree whatever the locale.

What the fold does and what a query's words must match is
``models/fold.py``.

``attach(database)`` picks the dialect once, when the database opens;
``index(database)`` then answers ``find(...)`` the same way on both.
"""
import json
import logging
import sqlite3
import time

import peewee

from models.fold import fold, patterns  # noqa: F401 (patterns: the services)
from models.trigrams import TrigramFile, path_of

log = logging.getLogger(__name__)

# Which way a search goes (SQLite). Walking the caller's rooms reads about
# 0.5 us per message in them, and stops early when they are few rooms (the
# primary key gives them newest first): at 1,000,000 messages, a user in
# 5,000 rooms holding 28,000 messages searches in ~13 ms, a member of a
# 43,000-message room in under 1 ms. The trigram index costs ~7 us per
# candidate, most of them other people's, so it leads only for callers
# whose rooms hold more than SCAN_ROWS messages (a walk of 50 ms and
# more), and gives up after a sixteenth as many candidates (the words may
# be common elsewhere and rare here), walking the rest.
SCAN_ROWS = 100_000
# Trigram candidates checked per step when the index leads.
CANDIDATES_STEP = 500
# A trigram file that cannot be read is logged at most this often (the
# searches walk meanwhile).
LOG_EVERY_SECONDS = 60


def _trigrams(patterns_) -> list:
    grams = []
    for p in patterns_:
        for i in range(len(p) - 2):
            gram = p[i:i + 3]
            if gram not in grams:
                grams.append(gram)
    return grams


class _Index:
    """The queries, one subclass per dialect. Methods run on a database
    thread, inside the caller's connection."""

    def fold_query(self, database, query) -> str:
        return fold(query)

    def find(self, database, user_id, patterns_, room_id, before, limit):
        """Ids of at most ``limit`` messages newest first, of the rooms
        ``user_id`` is a member of (or of ``room_id`` only, which the
        caller checked), with id below ``before`` (None: any), whose
        folded text contains every pattern."""
        raise NotImplementedError


class SqliteIndex(_Index):
    """Walks the caller's rooms, or lets the trigram file lead for a caller
    whose rooms hold more than SCAN_ROWS messages (``trigrams``: None for
    a database in memory, which always walks)."""

    def __init__(self, trigrams=None):
        self.trigrams = trigrams
        self._logged = 0.0

    def find(self, database, user_id, patterns_, room_id, before, limit):
        below = before if before is not None else 2**63 - 1
        grams = _trigrams(patterns_)
        events = self._events(database, user_id, room_id) \
            if grams and self.trigrams is not None else 0
        if events > SCAN_ROWS:
            try:
                return self._led(database, user_id, patterns_, grams,
                                 room_id, below, limit, events)
            except sqlite3.Error as exc:  # the file: walk instead
                if time.monotonic() - self._logged > LOG_EVERY_SECONDS:
                    self._logged = time.monotonic()
                    log.warning('search index file unusable, walking: %s',
                                exc)
        return self._scan(database, user_id, patterns_, room_id, below,
                          limit)

    def _led(self, database, user_id, patterns_, grams, room_id, below,
             limit, events):
        """Very many messages in the caller's rooms: the messages not in
        the trigram file yet are walked, then the file leads, newest
        first, its candidates checked against membership and the words.
        If the words are common elsewhere and rare here it gives up (E /
        16 candidates) and the rest is walked."""
        through, changes = self.trigrams.indexed()
        found = []
        if below > through + 1:
            found = self._scan(database, user_id, patterns_, room_id, below,
                               limit, above=through)
            below = through + 1
        if len(found) >= limit or through == 0:
            return found[:limit]
        edited = [r[0] for r in database.execute_sql(
            'SELECT "message_id" FROM "search_changed" WHERE "seq" > ?',
            (changes,)).fetchall()]
        more, below = self._by_index(
            database, user_id, patterns_, grams, room_id, below,
            limit - len(found), max(events // 16, CANDIDATES_STEP), edited)
        found += more
        if len(found) >= limit or below is None:
            return found[:limit]
        return found + self._scan(database, user_id, patterns_, room_id,
                                  below, limit - len(found))

    def _events(self, database, user_id, room_id):
        if room_id is not None:
            sql, params = ('SELECT "last_seq" FROM "room" WHERE "id" = ?',
                           (room_id,))
        else:
            sql, params = ('SELECT TOTAL(r."last_seq") FROM "membership" m '
                           'JOIN "room" r ON r."id" = m."room_id" '
                           'WHERE m."user_id" = ?', (user_id,))
        return database.execute_sql(sql, params).fetchone()[0] or 0

    def _scan(self, database, user_id, patterns_, room_id, below, limit,
              above=0):
        """Walk the folded texts of the caller's rooms (primary key
        ranges, newest first within each room), keep the matches with an
        id between ``above`` and ``below``."""
        words = ''.join(' AND instr(t."text", ?) > 0' for _ in patterns_)
        rooms = 'AND m."room_id" = ? ' if room_id is not None else ''
        sql = ('SELECT t."message_id" FROM "membership" m '
               'CROSS JOIN "message_text" t '
               f'WHERE m."user_id" = ? {rooms}AND t."room_id" = m."room_id" '
               f'AND t."message_id" < ? AND t."message_id" > ?{words} '
               'ORDER BY t."message_id" DESC LIMIT ?')
        params = [user_id, *([room_id] if room_id is not None else []),
                  below, above, *patterns_, limit]
        return [r[0] for r in database.execute_sql(sql, params).fetchall()]

    def _by_index(self, database, user_id, patterns_, grams, room_id, below,
                  limit, budget, edited):
        """At most ``budget`` candidates from the trigram file, in steps,
        newest first, with the messages ``edited`` since it was written
        among them. Returns (matches, where to go on below, or None when
        the file had no more candidates)."""
        match = ' AND '.join('"' + g.replace('"', '""') + '"' for g in grams)
        words = ''.join(' AND instr(t."text", ?) > 0' for _ in patterns_)
        rooms = ' AND x."room_id" = ?' if room_id is not None else ''
        check = ('SELECT x."id" FROM "message" x '
                 'JOIN "membership" m ON m."room_id" = x."room_id" '
                 'AND m."user_id" = ? '
                 'JOIN "message_text" t ON t."room_id" = x."room_id" '
                 'AND t."message_id" = x."id" '
                 f'WHERE x."id" IN (SELECT value FROM json_each(?)){rooms}'
                 f'{words} ORDER BY x."id" DESC')
        found = []
        while budget > 0:
            step = min(CANDIDATES_STEP, budget)
            ids = self.trigrams.candidates(match, below, step)
            budget -= len(ids)
            low = ids[-1] if len(ids) == step else 0
            ids += [i for i in edited if low <= i < below]
            if ids:
                params = [user_id, json.dumps(ids),
                          *([room_id] if room_id is not None else []),
                          *patterns_]
                found += [r[0] for r in
                          database.execute_sql(check, params).fetchall()]
            if low == 0:
                return found, None
            below = low
            if len(found) >= limit:
                return found, below
        return found, below


class PostgresIndex(_Index):

    def fold_query(self, database, query) -> str:
        # The text side is folded by pb_fold in SQL: fold the query the
        # same way, so that both agree.
        return database.execute_sql('SELECT pb_fold(%s)',
                                    (query,)).fetchone()[0]

    def find(self, database, user_id, patterns_, room_id, before, limit):
        # One statement: the planner chooses between the trigram index
        # (filtering by membership) and the caller's rooms' primary key
        # ranges (filtering by the words), from its statistics.
        words = ''.join(" AND t.text LIKE %s ESCAPE '\\'" for _ in patterns_)
        rooms = ' AND t.room_id = %s' if room_id is not None else ''
        sql = ('SELECT t.message_id FROM message_text t '
               'WHERE t.room_id IN (SELECT room_id FROM membership '
               f'WHERE user_id = %s){rooms} AND t.message_id < %s{words} '
               'ORDER BY t.message_id DESC LIMIT %s')
        params = [user_id, *([room_id] if room_id is not None else []),
                  before if before is not None else 2**63 - 1,
                  *('%' + _like_escape(p) + '%' for p in patterns_), limit]
        return [r[0] for r in database.execute_sql(sql, params).fetchall()]


def _like_escape(text):
    return (text.replace('\\', '\\\\').replace('%', '\\%')
            .replace('_', '\\_'))


def attach(database):
    """Choose the dialect of ``database`` (once, where it opens) and, on
    SQLite, register the fold on every connection it will open."""
    if isinstance(database, peewee.SqliteDatabase):
        database.register_function(fold, 'pb_fold', 1, deterministic=True)
        path = path_of(database.database)
        database.search_index = SqliteIndex(
            TrigramFile(path, database.database) if path else None)
    else:
        database.search_index = PostgresIndex()
    return database


def index(database) -> _Index:
    found = getattr(database, 'search_index', None)
    if found is None:
        attach(database)
        found = database.search_index
    return found


# -- schema ----------------------------------------------------------------

_SQLITE_SCHEMA = [
    'CREATE TABLE IF NOT EXISTS "message_text" ('
    '"room_id" INTEGER NOT NULL, "message_id" INTEGER NOT NULL, '
    '"text" TEXT NOT NULL, PRIMARY KEY ("room_id", "message_id")) '
    'WITHOUT ROWID',
    # Edits, for the trigram file's indexer (models/trigrams.py), which
    # deletes what it has read (``prune_changes``). AUTOINCREMENT: a seq
    # is never used twice, even once every row is gone.
    'CREATE TABLE IF NOT EXISTS "search_changed" ('
    '"seq" INTEGER PRIMARY KEY AUTOINCREMENT, '
    '"message_id" INTEGER NOT NULL)',
    # The last seq pruned: a trigram file that has not taken it is older
    # than the database and starts again.
    'CREATE TABLE IF NOT EXISTS "search_pruned" ("one" INTEGER PRIMARY KEY '
    'CHECK ("one" = 1), "seq" INTEGER NOT NULL)',
    # New messages get their row from the send path (the dialect's
    # insert_texts, which says why), not from a trigger.
    # Peewee's save() writes every column (a reaction too): only a real
    # change of the body or the deleted flag touches the index.
    'CREATE TRIGGER IF NOT EXISTS "message_text_update" AFTER UPDATE OF '
    '"body", "deleted" ON "message" WHEN OLD."body" IS NOT NEW."body" OR '
    'OLD."deleted" IS NOT NEW."deleted" BEGIN '
    'DELETE FROM "message_text" WHERE "room_id" = OLD."room_id" AND '
    '"message_id" = OLD."id"; '
    'INSERT INTO "message_text" SELECT NEW."room_id", NEW."id", '
    'pb_fold(NEW."body") WHERE NOT NEW."deleted"; '
    'INSERT INTO "search_changed" ("message_id") SELECT NEW."id" '
    'WHERE NOT NEW."deleted"; END',
    'CREATE TRIGGER IF NOT EXISTS "message_text_delete" AFTER DELETE ON '
    '"message" BEGIN '
    'DELETE FROM "message_text" WHERE "room_id" = OLD."room_id" AND '
    '"message_id" = OLD."id"; END',
]
# Version 6 kept the trigram index in the database, written by these
# triggers in every send's transaction (``move_trigrams_out``).
_SQLITE_V6 = ['DROP TRIGGER IF EXISTS "message_text_insert"',
              'DROP TRIGGER IF EXISTS "message_text_update"',
              'DROP TRIGGER IF EXISTS "message_text_delete"',
              'DROP TABLE IF EXISTS "message_fts"']

_POSTGRES_SCHEMA = [
    'CREATE EXTENSION IF NOT EXISTS pg_trgm',
    'CREATE EXTENSION IF NOT EXISTS unaccent',
    # IMMUTABLE (what an index needs) although unaccent() is only STABLE:
    # the dictionary is named explicitly, the usual wrapper.
    "CREATE OR REPLACE FUNCTION pb_fold(text) RETURNS text LANGUAGE sql "
    "IMMUTABLE PARALLEL SAFE STRICT AS $$ SELECT ' ' || btrim("
    "regexp_replace(lower(public.unaccent('public.unaccent'::regdictionary,"
    " normalize($1, NFKC))), '[[:punct:][:space:][:cntrl:]]+', ' ', 'g'))"
    " || ' ' $$",
    'CREATE TABLE IF NOT EXISTS message_text (room_id BIGINT NOT NULL, '
    'message_id BIGINT NOT NULL, text TEXT NOT NULL, '
    'PRIMARY KEY (room_id, message_id))',
    'CREATE INDEX IF NOT EXISTS message_text_trgm ON message_text '
    'USING gin (text gin_trgm_ops)',
    'CREATE OR REPLACE FUNCTION pb_message_text() RETURNS trigger '
    'LANGUAGE plpgsql AS $$ BEGIN '
    "IF TG_OP <> 'INSERT' THEN DELETE FROM message_text WHERE "
    'room_id = OLD.room_id AND message_id = OLD.id; END IF; '
    "IF TG_OP <> 'DELETE' AND NOT NEW.deleted THEN INSERT INTO "
    'message_text VALUES (NEW.room_id, NEW.id, pb_fold(NEW.body)) '
    'ON CONFLICT DO NOTHING; END IF; RETURN NULL; END $$',
    'DROP TRIGGER IF EXISTS message_text_insert ON message',
    'CREATE TRIGGER message_text_insert AFTER INSERT ON message '
    'FOR EACH ROW EXECUTE FUNCTION pb_message_text()',
    'DROP TRIGGER IF EXISTS message_text_update ON message',
    'CREATE TRIGGER message_text_update AFTER UPDATE OF body, deleted ON '
    'message FOR EACH ROW WHEN (OLD.body IS DISTINCT FROM NEW.body OR '
    'OLD.deleted IS DISTINCT FROM NEW.deleted) '
    'EXECUTE FUNCTION pb_message_text()',
    'DROP TRIGGER IF EXISTS message_text_delete ON message',
    'CREATE TRIGGER message_text_delete AFTER DELETE ON message '
    'FOR EACH ROW EXECUTE FUNCTION pb_message_text()',
]

# Backfill progress: messages with an id below ``below`` still need their
# rows (the triggers handle everything newer and every change). The row is
# gone once the backfill is done.
_BACKFILL_TABLE = ('CREATE TABLE IF NOT EXISTS "search_backfill" '
                   '("below" BIGINT NOT NULL)')


def install(database, backfill=True):
    """Create the index, its triggers and (``backfill``) the note that
    existing messages still need indexing (``backfill_step``). Inside the
    caller's transaction; safe to run again."""
    attach(database)
    sqlite = isinstance(database, peewee.SqliteDatabase)
    for sql in _SQLITE_SCHEMA if sqlite else _POSTGRES_SCHEMA:
        database.execute_sql(sql)
    database.execute_sql(_BACKFILL_TABLE)
    if backfill:
        top = database.execute_sql(
            'SELECT COALESCE(MAX("id"), 0) + 1 FROM "message"').fetchone()[0]
        database.execute_sql('DELETE FROM "search_backfill"')
        if top > 1:
            database.execute_sql(
                'INSERT INTO "search_backfill" ("below") VALUES (%s)'
                % int(top))


def backfill_step(database, batch) -> bool:
    """Index the existing messages of the next ``batch`` ids, newest first
    (recent messages become searchable first). Returns True while more
    remain. Runs in a write transaction."""
    row = database.execute_sql(
        'SELECT "below" FROM "search_backfill"').fetchone()
    if row is None:
        return False
    below = row[0]
    low = max(below - batch, 0)
    rows = database.execute_sql(
        'SELECT m."room_id", m."id", m."body" FROM "message" m '
        'WHERE m."id" >= {p} AND m."id" < {p} AND NOT m."deleted" AND NOT '
        'EXISTS (SELECT 1 FROM "message_text" t WHERE t."room_id" = '
        'm."room_id" AND t."message_id" = m."id")'.format(p=database.param),
        (low, below)).fetchall()
    if rows:
        if isinstance(database, peewee.SqliteDatabase):
            # Folded and written as the send path writes new messages'
            # text (the dialect's insert_texts); the trigram file's
            # indexer takes them from there once the backfill is done.
            database.dialect.insert_texts(rows)
        else:
            database.execute_sql(
                'INSERT INTO message_text SELECT room_id, id, pb_fold(body) '
                'FROM message WHERE id = ANY(%s) ON CONFLICT DO NOTHING',
                ([mid for _, mid, _ in rows],))
    if low <= 1:
        database.execute_sql('DELETE FROM "search_backfill"')
        return False
    database.execute_sql('UPDATE "search_backfill" SET "below" = {p}'
                         .format(p=database.param), (low,))
    return True


def move_trigrams_out(database):
    """Version 7: SQLite's trigram index leaves the database for its own
    file (``models/trigrams.py``), which the indexer fills from
    ``message_text`` while the server serves. Inside the caller's
    transaction."""
    if isinstance(database, peewee.SqliteDatabase):
        for sql in _SQLITE_V6:
            database.execute_sql(sql)
        install(database, backfill=False)


def prune_changes(database):
    """Forget the edits the trigram file has indexed (a write), and
    remember how far."""
    trigrams = index(database).trigrams
    try:
        changes = trigrams.indexed()[1] if trigrams is not None else 0
    except sqlite3.Error:  # unreadable: the next prune
        return
    if changes:
        database.execute_sql('DELETE FROM "search_changed" WHERE "seq" <= ?',
                             (changes,))
        database.execute_sql('INSERT OR REPLACE INTO "search_pruned" '
                             'VALUES (1, ?)', (changes,))


def backfill_pending(database) -> bool:
    try:
        return database.execute_sql(
            'SELECT 1 FROM "search_backfill"').fetchone() is not None
    except peewee.DatabaseError:  # not migrated yet
        return False
