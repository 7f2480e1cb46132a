"""Search: find messages by their words in the rooms the caller is a member
of, newest first, a page at a time.

The rules live here (what a query is, who may search where, paging); the
index and its SQL in ``models/search.py``, behind one interface for SQLite
and PostgreSQL.
"""
import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import models
from models import search as search_index
from server.errors import Invalid, PostboxError
from server.services import rooms as rooms_service
from server.services.messages import check_int
from server.data.rows import messages_by_id
from server.services.serialize import message_dicts

log = logging.getLogger(__name__)

LIMIT_MAX = 50  # the contract's page size limit
# The log of edits the trigram file has taken is emptied at most this
# often (one write transaction).
PRUNE_SECONDS = 10
# A trigram file that cannot be written is logged at most this often.
LOG_EVERY_SECONDS = 60
QUERY_MIN_CHARS = 2  # the contract: shorter is invalid


def _find(ctx, user_id, query, room_id, before, limit):
    database = models.db.obj
    index = search_index.index(database)
    patterns = search_index.patterns(index.fold_query(database, query))
    if not patterns:  # only punctuation: nothing can contain it
        return {'results': [], 'has_more': False}
    ids = index.find(database, user_id, patterns, room_id, before,
                     limit + 1)
    has_more = len(ids) > limit
    ids = ids[:limit]
    if not ids:
        return {'results': [], 'has_more': False}
    rows = messages_by_id(ids, newest_first=True)
    return {'results': message_dicts(ctx, rows), 'has_more': has_more}


async def search(ctx, user_id, query, room_id=None, before=None,
                 limit=None) -> dict:
    """``{results: [message], has_more}``: messages of the caller's rooms
    (or of ``room_id``, which they must be a member of) whose current body
    contains every word of ``query`` (case and accents ignored), newest
    first, with id below ``before`` when given. Deleted messages are never
    found."""
    if not isinstance(query, str):
        raise Invalid('query must be a string')
    query = query.strip()
    if len(query) < QUERY_MIN_CHARS:
        raise Invalid(f'query: at least {QUERY_MIN_CHARS} characters')
    if len(query) > ctx.config.search_query_max_chars:
        raise Invalid(f'query: at most {ctx.config.search_query_max_chars} '
                      'characters')
    if '\x00' in query or any('\ud800' <= c <= '\udfff' for c in query):
        # No message can hold them (NUL, or half of a UTF-16 pair), and
        # neither database driver takes them.
        raise Invalid('query: NUL or a lone surrogate')
    limit = ctx.config.search_default_limit if limit is None else limit
    check_int(limit, 'limit', 1)
    if limit > LIMIT_MAX:
        raise Invalid(f'limit: 1 to {LIMIT_MAX}')
    if before is not None:
        check_int(before, 'before', 1)
    if room_id is not None:
        info = await rooms_service.member_room(ctx, user_id, room_id)
        room_id = info.id
    return await ctx.store.read(_find, ctx, user_id, query, room_id, before,
                                limit)


async def maintain(ctx):
    """The index's background work while the app serves: the backfill
    after the upgrade that added search, then (SQLite) the trigram file,
    filled by its own thread a step every ``search_index_seconds``, or
    at once while a step finds a full batch."""
    database = ctx.store.database
    trigrams = getattr(search_index.index(database), 'trigrams', None)
    if trigrams is None:
        await backfill(ctx)
        return
    batch = ctx.config.search_index_batch
    thread = ThreadPoolExecutor(1, thread_name_prefix='pb-index')
    loop = asyncio.get_running_loop()
    logged = pruned = 0.0
    edits = False  # indexed since the last prune: time to forget them
    try:
        try:
            await loop.run_in_executor(thread, trigrams.create)
        except Exception as exc:  # the steps try again
            log.warning('search index file: %s', exc)
        await backfill(ctx)
        while True:
            try:
                wrote, edited = await loop.run_in_executor(
                    thread, trigrams.step, batch)
            except Exception as exc:  # busy, disk full, ...: later
                wrote = edited = 0
                if time.monotonic() - logged > LOG_EVERY_SECONDS:
                    logged = time.monotonic()
                    log.warning('search indexing paused: %s', exc,
                                exc_info=not isinstance(exc, sqlite3.Error))
            edits = edits or edited > 0
            if edits and time.monotonic() - pruned > PRUNE_SECONDS:
                pruned = time.monotonic()
                try:
                    await ctx.store.write(search_index.prune_changes,
                                          database)
                    edits = False
                except Exception as exc:  # the next prune tries again
                    log.info('search edit log not pruned: %s', exc)
            if max(wrote, edited) < batch:
                await asyncio.sleep(ctx.config.search_index_seconds)
    finally:
        await loop.run_in_executor(thread, trigrams.close)
        thread.shutdown()


async def backfill(ctx):
    """Index the messages stored before search existed (after the upgrade
    that added it), one batch per write transaction until none remain.
    Sends queue behind a batch, never behind the whole backfill."""
    batch = ctx.config.search_backfill_batch
    database = ctx.store.database
    if not await ctx.store.read(search_index.backfill_pending, database):
        return
    log.info('indexing existing messages for search')
    done = 0
    while True:
        try:
            more = await ctx.store.write(search_index.backfill_step,
                                         database, batch)
        except PostboxError as exc:  # the database is away: later
            log.warning('search backfill paused: %s', exc.message)
            await asyncio.sleep(5)
            continue
        except Exception:  # a bug: searching still works, for new messages
            log.exception('search backfill failed')
            return
        done += 1
        if not more:
            break
        await asyncio.sleep(0)  # let the sends queued meanwhile go first
    log.info('search index complete (%s batches)', done)
