"""The search index: what it stores, how it is kept, how it is queried.

Every message that is not deleted has a row in ``message_text``: its room,
its id and its body *folded* (``fold``: accents dropped, case folded,
compatibility forms unified, punctuation turned into spaces, padded with
one space each side). Triggers on ``message`` keep the rows in step with
every insert, edit, delete and cascade, in the writer's own transaction,
so the send path does not know the index exists. The primary key (room_id,
message_id) lets a search walk just the caller's rooms, newest first.

- SQLite also keeps a contentless FTS5 trigram index of ``message_text``
  (``message_fts``, rowid = message id, ``detail=none``: which messages
  hold a trigram, no positions, so it is small and cheap to write). The
  fold runs in Python (``pb_fold``, registered on every connection by
  ``attach``): SQLite 3.40's trigram tokenizer cannot drop accents.
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

import peewee

from models.fold import fold, patterns  # noqa: F401 (patterns: the services)

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

    def find(self, database, user_id, patterns_, room_id, before, limit):
        below = before if before is not None else 2**63 - 1
        grams = _trigrams(patterns_)
        events = self._events(database, user_id, room_id) if grams else 0
        if events > SCAN_ROWS:
            # Very many messages in the caller's rooms: let the trigram
            # index lead, newest first, checking its candidates against
            # membership and the words. If the words are common elsewhere
            # and rare here it gives up (E / 16 candidates) and the rest
            # is walked.
            found, below = self._by_index(database, user_id, patterns_,
                                          grams, room_id, below, limit,
                                          max(events // 16, CANDIDATES_STEP))
            if len(found) >= limit or below is None:
                return found[:limit]
            return found + self._scan(database, user_id, patterns_, room_id,
                                      below, limit - len(found))
        return self._scan(database, user_id, patterns_, room_id, below,
                          limit)

    def _events(self, database, user_id, room_id):
        if room_id is not None:
            sql, params = ('SELECT "last_seq" FROM "room" WHERE "id" = ?',
                           (room_id,))
        else:
            sql, params = ('SELECT TOTAL(r."last_seq") FROM "membership" m '
                           'JOIN "room" r ON r."id" = m."room_id" '
                           'WHERE m."user_id" = ?', (user_id,))
        return database.execute_sql(sql, params).fetchone()[0] or 0

    def _scan(self, database, user_id, patterns_, room_id, below, limit):
        """Walk the folded texts of the caller's rooms (primary key
        ranges, newest first within each room), keep the matches."""
        words = ''.join(' AND instr(t."text", ?) > 0' for _ in patterns_)
        rooms = 'AND m."room_id" = ? ' if room_id is not None else ''
        sql = ('SELECT t."message_id" FROM "membership" m '
               'CROSS JOIN "message_text" t '
               f'WHERE m."user_id" = ? {rooms}AND t."room_id" = m."room_id" '
               f'AND t."message_id" < ?{words} '
               'ORDER BY t."message_id" DESC LIMIT ?')
        params = [user_id, *([room_id] if room_id is not None else []),
                  below, *patterns_, limit]
        return [r[0] for r in database.execute_sql(sql, params).fetchall()]

    def _by_index(self, database, user_id, patterns_, grams, room_id, below,
                  limit, budget):
        """At most ``budget`` candidates from the trigram index, in steps,
        newest first. Returns (matches, where to go on below, or None when
        the index had no more candidates)."""
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
            ids = [r[0] for r in database.execute_sql(
                'SELECT rowid FROM "message_fts" WHERE "message_fts" '
                'MATCH ? AND rowid < ? ORDER BY rowid DESC LIMIT ?',
                (match, below, step)).fetchall()]
            budget -= len(ids)
            if ids:
                params = [user_id, json.dumps(ids),
                          *([room_id] if room_id is not None else []),
                          *patterns_]
                found += [r[0] for r in
                          database.execute_sql(check, params).fetchall()]
            if len(ids) < step:
                return found, None
            below = ids[-1]
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
        database.search_index = SqliteIndex()
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
    'CREATE VIRTUAL TABLE IF NOT EXISTS "message_fts" USING fts5('
    '"text", content=\'\', detail=none, columnsize=0, '
    'tokenize=\'trigram case_sensitive 1\')',
    'CREATE TRIGGER IF NOT EXISTS "message_text_insert" AFTER INSERT ON '
    '"message" WHEN NOT NEW."deleted" BEGIN '
    'INSERT INTO "message_text" VALUES '
    '(NEW."room_id", NEW."id", pb_fold(NEW."body")); '
    'INSERT INTO "message_fts" ("rowid", "text") SELECT "message_id", '
    '"text" FROM "message_text" WHERE "room_id" = NEW."room_id" AND '
    '"message_id" = NEW."id"; END',
    # Peewee's save() writes every column (a reaction too): only a real
    # change of the body or the deleted flag touches the index.
    'CREATE TRIGGER IF NOT EXISTS "message_text_update" AFTER UPDATE OF '
    '"body", "deleted" ON "message" WHEN OLD."body" IS NOT NEW."body" OR '
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
    'CREATE TRIGGER IF NOT EXISTS "message_text_delete" AFTER DELETE ON '
    '"message" BEGIN '
    'INSERT INTO "message_fts" ("message_fts", "rowid", "text") '
    'SELECT \'delete\', "message_id", "text" FROM "message_text" '
    'WHERE "room_id" = OLD."room_id" AND "message_id" = OLD."id"; '
    'DELETE FROM "message_text" WHERE "room_id" = OLD."room_id" AND '
    '"message_id" = OLD."id"; END',
]

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
            texts = [(room, mid, fold(body)) for room, mid, body in rows]
            cursor = database.cursor()
            cursor.executemany('INSERT INTO "message_text" VALUES (?, ?, ?)',
                               texts)
            cursor.executemany('INSERT INTO "message_fts" ("rowid", "text") '
                               'VALUES (?, ?)',
                               [(mid, text) for _, mid, text in texts])
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


def backfill_pending(database) -> bool:
    try:
        return database.execute_sql(
            'SELECT 1 FROM "search_backfill"').fetchone() is not None
    except peewee.DatabaseError:  # not migrated yet
        return False
