"""Attachments: upload, who may read them, thumbnails, and removal (with
their message, or when never sent).

The bytes go to ``ctx.storage`` (see server/storage.py) under random keys;
the row keeps the user's file name for display only (never with a
runnable ending). The type is sniffed from the bytes (``Sniffer``): what a
browser or a desktop would run is refused, a type in
``config.attachment_types`` keeps its name, anything else is
application/octet-stream; the client's name and Content-Type are never
trusted. Only images with a thumbnail are shown inline. The type rules
are ``filetypes``, the thumbnails ``images``.
"""
import asyncio
import errno
import logging

from server.data import attachments as data
from server.data import users as user_data
from server.errors import (Invalid, NotFound, PostboxError, RateLimited,
                           TooLarge)
from server.services import images
from server.services.context import now_ms
from server.services.filetypes import INLINE_TYPES, Sniffer, stored_filename
from server.services.serialize import attachment_dict

log = logging.getLogger(__name__)

THUMBNAIL_TYPE = 'image/webp'
# Rows removed per cleanup transaction, so one run never holds the writer
# for long.
CLEANUP_BATCH = 500


class DiskFull(PostboxError):
    """The attachment store is out of space: nothing was kept, and the
    client may try again later (HTTP 507 Insufficient Storage)."""
    code, status = 'unavailable', 507


class Streaming:
    """Uploads streaming in this process, per user: [count, bytes]. They
    count towards the unsent-upload limits before their row exists, so
    eighty uploads started together cannot all pass the check each makes
    before streaming (the check in the insert is the one that holds
    across processes)."""

    def __init__(self):
        self.by_user = {}

    def add(self, user_id, count, size):
        held = self.by_user.setdefault(user_id, [0, 0])
        held[0] += count
        held[1] += size
        if held == [0, 0]:
            del self.by_user[user_id]

    def get(self, user_id):
        return tuple(self.by_user.get(user_id, (0, 0)))


def check_quota(config, count, size, extra=0):
    """Raise if a user holding ``count`` unsent uploads of ``size`` bytes
    may not add one of ``extra`` bytes: RateLimited (429) at
    ``attachment_unsent_max`` files, TooLarge (413) past
    ``attachment_unsent_max_bytes``."""
    if count >= config.attachment_unsent_max:
        raise RateLimited(60, f'at most {config.attachment_unsent_max} '
                          f'unsent uploads: send them, or wait')
    quota = config.attachment_unsent_max_bytes
    if size + extra > quota:
        raise TooLarge(f'unsent uploads: at most {quota} bytes in all, '
                       f'{size} held now: send them, or wait')


async def upload(ctx, user_id, filename, chunks, declared=0) -> dict:
    """Store an upload read from the async iterator ``chunks`` (bytes) and
    return its attachment object. Streams to storage: at most a chunk and
    the sniffing windows are in memory. ``declared``: the size the client
    announced, if any, to refuse early.

    Raises TooLarge as soon as the size limit or the user's byte quota is
    passed, UnsupportedType for a type that would run, Invalid for an
    empty file, RateLimited while the user holds ``attachment_unsent_max``
    unsent uploads, DiskFull when the store is out of space; nothing is
    left in storage then."""
    config = ctx.config
    limit = config.attachment_max_bytes
    quota = config.attachment_unsent_max_bytes
    streaming = ctx.uploads_streaming
    # This upload counts as one more held file, and its bytes as they
    # come, until its row is in or it failed: counted before the first
    # await, so uploads started together see each other.
    streaming.add(user_id, 1, 0)
    received = 0
    try:
        others, others_bytes = streaming.get(user_id)
        count, held = await ctx.store.read(held_uploads, user_id)
        check_quota(config, count + others - 1, held + others_bytes,
                    declared)
        writer = await _storing(ctx.storage.writer())
        committed = False
        thumbnail_key = None
        try:
            sniffer = Sniffer(config.attachment_types)
            async for chunk in chunks:
                received += len(chunk)
                streaming.add(user_id, 0, len(chunk))
                if received > limit:
                    raise TooLarge(f'attachments: at most {limit} bytes')
                streaming_bytes = streaming.get(user_id)[1]
                if held + streaming_bytes > quota:
                    check_quota(config, 0, held, streaming_bytes)
                sniffer.feed(chunk)
                await _storing(writer.write(chunk))
            if not received:
                raise Invalid('the file is empty')
            mime = sniffer.result()
            width = height = None
            if mime in INLINE_TYPES:
                await _storing(writer.flush())
                async with images.turns.of(user_id):
                    width, height, thumbnail = await images.run_image(
                        images.thumbnail, writer.local_path,
                        config.attachment_thumbnail_px,
                        config.attachment_thumbnail_max_pixels)
                if thumbnail is not None:
                    thumbnail_key = await _storing(
                        ctx.storage.put_bytes(thumbnail))
            size = writer.size
            key = await _storing(writer.commit())
            committed = True
        finally:
            if not committed:
                writer.abort()
                if thumbnail_key:
                    await remove_files(ctx, [thumbnail_key])
        try:
            return await ctx.store.write(
                _insert, user_id, stored_filename(filename, mime), mime,
                size, key, width, height, thumbnail_key, config)
        except BaseException:
            await ctx.storage.delete([key, thumbnail_key])
            raise
    finally:
        streaming.add(user_id, -1, -received)


async def _storing(operation):
    """Await a storage operation; a full disk becomes DiskFull."""
    try:
        return await operation
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning('attachment store is full: %s', exc)
            raise DiskFull("the server's disk is full: the file was not "
                           'stored, try again later') from None
        raise


def held_uploads(user_id):
    """(count, bytes) of the user's uploads that nobody else can read:
    the unsent ones, and those sent only to rooms where the user is the
    only member (sending to such a room does not free the quota)."""
    unsent = data.unsent_totals(user_id)
    # Rooms first (at most rooms_per_user_max, usually none of them
    # alone), so the common case reads no sent attachment at all.
    alone = data.rooms_alone(user_id)
    if not alone:
        return unsent[0], int(unsent[1])
    kept = data.sent_totals(user_id, alone)
    return unsent[0] + kept[0], int(unsent[1]) + int(kept[1])


def _insert(user_id, filename, mime, size, key, width, height,
            thumbnail_key, config):
    # The quota is checked again here, in the writer's transaction, where
    # no other insert can come between the count and this row: with the
    # user's row locked on PostgreSQL, and under SQLite's write lock.
    user_data.lock(user_id)
    count, held = held_uploads(user_id)
    check_quota(config, count, held, size)
    return attachment_dict(data.create(user_id, filename, mime, size, key,
                                       width, height, thumbnail_key,
                                       now_ms()))


def _readable(user_id, attachment_id):
    att = data.get(attachment_id)
    if att is not None and att.uploader_id != user_id and (
            att.message_id is None or
            not data.in_room_of(user_id, att.message_id)):
        att = None
    if att is None:
        # Same answer for "no such file" and "not yours to see".
        raise NotFound('no such attachment')
    return {'filename': att.filename, 'content_type': att.content_type,
            'storage_key': att.storage_key,
            'thumbnail_key': att.thumbnail_key}


async def readable(ctx, user_id, attachment_id) -> dict:
    """What serving an attachment needs (filename, content_type,
    storage_key, thumbnail_key), if ``user_id`` may read it: its uploader,
    or a member of the room where it was sent. Raises NotFound otherwise."""
    if isinstance(attachment_id, bool) or not isinstance(attachment_id, int):
        raise NotFound('no such attachment')
    return await ctx.store.read(_readable, user_id, attachment_id)


def is_inline(content_type, thumbnail_key) -> bool:
    """Whether a browser may show this file in the page: an image small
    enough to have a thumbnail (a huge one would be a decompression bomb
    in the viewer's browser). The rest is served as a download."""
    return content_type in INLINE_TYPES and bool(thumbnail_key)


def detach_message(message_id) -> list:
    """Delete the attachment rows of a message and return their storage
    keys, for ``remove_files`` after the commit. Runs on the writer, inside
    the transaction that deletes the message."""
    return [key for row in data.delete_of_message(message_id)
            for key in row if key]


async def remove_files(ctx, keys):
    """Remove stored files whose rows are gone (committed). Never raises:
    a file left behind is found again by the sweep."""
    try:
        await ctx.storage.delete([k for k in keys if k])
    except Exception:
        log.exception('removing %s stored files failed', len(keys))


def _delete_unsent(rows):
    keys = []
    for att_id, key, thumb in rows:
        # Re-checked in the DELETE: a send may have taken it since it was
        # found (the search runs on a reader, outside this transaction).
        if data.delete_unsent(att_id):
            keys.extend(k for k in (key, thumb) if k)
    return keys


async def cleanup(ctx) -> int:
    """Delete uploads never sent within ``attachment_orphan_seconds``
    (rows and files), and partial uploads left by a crash. Returns how many
    files went."""
    seconds = ctx.config.attachment_orphan_seconds
    removed = 0
    while True:
        # The search runs on a reader, so the writer (and every send
        # behind it) never waits on it.
        rows = await ctx.store.read(data.unsent_before,
                                    now_ms() - seconds * 1000, CLEANUP_BATCH)
        if rows:
            keys = await ctx.store.write(_delete_unsent, rows)
            await remove_files(ctx, keys)
            removed += len(keys)
        if len(rows) < CLEANUP_BATCH:
            break
    # Partial files that old belong to an upload whose process died.
    removed += await ctx.storage.remove_stale_parts(max(seconds, 3600))
    if removed:
        log.info('attachment cleanup removed %s files', removed)
    return removed


async def cleanup_forever(ctx):
    """Run ``cleanup`` every ``attachment_cleanup_interval_seconds`` until
    cancelled; a failed run is logged and retried next time."""
    while True:
        await asyncio.sleep(ctx.config.attachment_cleanup_interval_seconds)
        try:
            await cleanup(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception('attachment cleanup failed')
