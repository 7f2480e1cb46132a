"""Attachments: upload, who may read them, thumbnails, and removal (with
their message, or when never sent).

The bytes go to ``ctx.storage`` (see server/storage.py) under random keys;
the row keeps the user's file name for display only. The type is sniffed
from the bytes with ``filetype`` and must be in ``config.attachment_types``;
the client's name and Content-Type are never trusted.
"""
import asyncio
import codecs
import io
import logging
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import filetype
from PIL import Image, ImageOps, UnidentifiedImageError

from models import Attachment, Membership, Message
from server.errors import (Invalid, NotFound, RateLimited, TooLarge,
                           UnsupportedType)
from server.services.context import now_ms
from server.services.serialize import attachment_dict

log = logging.getLogger(__name__)

# filetype needs the first 261 bytes; the text checks look a bit further,
# about as far as a browser's own sniffing does.
SNIFF_BYTES = 1024
# Pictures a browser shows inline (with nosniff and a sandbox CSP); every
# other type is only ever served as a download.
INLINE_TYPES = frozenset({'image/png', 'image/jpeg', 'image/gif',
                          'image/webp'})
PILLOW_FORMATS = ['PNG', 'JPEG', 'GIF', 'WEBP']
# Starts of text that a browser (or a careless viewer) would treat as a
# page or a program rather than as plain text.
ACTIVE_TEXT = (b'<!doctype', b'<html', b'<head', b'<body', b'<script',
               b'<svg', b'<?xml', b'<iframe', b'<object', b'<embed',
               b'<meta', b'<style', b'<link', b'#!')
# Sniffed types that are a variant of an allowed one.
SAME_AS = {'image/apng': 'image/png'}
FILENAME_MAX = 255
THUMBNAIL_TYPE = 'image/webp'
# Decoding images takes memory in proportion to their pixels: two at a
# time bounds that, whatever the number of concurrent uploads.
_images = ThreadPoolExecutor(2, thread_name_prefix='pb-image')
# Rows removed per cleanup transaction, so one run never holds the writer
# for long.
CLEANUP_BATCH = 500


def clean_filename(name) -> str:
    """A display name: the last path component, no control characters,
    at most 255 characters. Never used as a path."""
    if not isinstance(name, str):
        name = ''
    name = unicodedata.normalize('NFC', name)
    name = re.split(r'[/\\]', name)[-1]
    name = ''.join(c for c in name
                   if unicodedata.category(c)[0] != 'C').strip()
    if name in ('', '.', '..'):
        name = 'file'
    return name[:FILENAME_MAX]


def sniff(head: bytes, allowed) -> str:
    """The content type of a file that starts with ``head``, if allowed.
    Files without magic bytes are text/plain when they look like plain
    UTF-8 text (the rest is checked as it streams). Raises
    UnsupportedType."""
    kind = filetype.guess(head)
    if kind is not None:
        mime = SAME_AS.get(kind.mime, kind.mime)
        if mime not in allowed:
            raise UnsupportedType(f'files of type {mime} are not allowed')
        return mime
    if 'text/plain' not in allowed:
        raise UnsupportedType('this type of file is not allowed')
    head = head[:SNIFF_BYTES]
    start = head.lstrip(b'\xef\xbb\xbf').lstrip().lower()
    if b'\x00' in head or start.startswith(ACTIVE_TEXT) or any(
            marker in head.lower() for marker in ACTIVE_TEXT[:9]):
        raise UnsupportedType('HTML, SVG, XML and scripts are not allowed')
    return 'text/plain'


async def upload(ctx, user_id, filename, chunks) -> dict:
    """Store an upload read from the async iterator ``chunks`` (bytes) and
    return its attachment object. Streams to storage: at most a chunk and
    the sniffed head are in memory. Raises TooLarge as soon as the size
    limit is passed, UnsupportedType for a type not allowed, Invalid for an
    empty file, RateLimited while the user holds ``attachment_unsent_max``
    unsent uploads; nothing is left in storage then."""
    config = ctx.config
    limit = config.attachment_max_bytes
    if await ctx.store.read(_unsent_count, user_id) >= \
            config.attachment_unsent_max:
        raise RateLimited(60, 'too many unsent uploads: send or wait')
    writer = await ctx.storage.writer()
    committed = False
    thumbnail_key = None
    try:
        head = bytearray()
        mime = None
        text = None
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise TooLarge(f'attachments: at most {limit} bytes')
            if mime is None:
                head += chunk
                if len(head) < SNIFF_BYTES:
                    continue
                chunk, head = bytes(head), None
                mime = sniff(chunk, config.attachment_types)
                if mime == 'text/plain':
                    text = codecs.getincrementaldecoder('utf-8')()
            if text is not None:
                _check_text(text, chunk)
            await writer.write(chunk)
        if mime is None:  # shorter than the sniffing window
            if not head:
                raise Invalid('the file is empty')
            chunk = bytes(head)
            mime = sniff(chunk, config.attachment_types)
            if mime == 'text/plain':
                text = codecs.getincrementaldecoder('utf-8')()
                _check_text(text, chunk)
            await writer.write(chunk)
        if text is not None:
            _check_text(text, b'', final=True)
        width = height = None
        if mime in INLINE_TYPES:
            await writer.flush()
            width, height, thumbnail = await _run_image(
                _thumbnail, writer.local_path, config.attachment_thumbnail_px,
                config.attachment_thumbnail_max_pixels)
            if thumbnail is not None:
                thumbnail_key = await ctx.storage.put_bytes(thumbnail)
        size = writer.size
        key = await writer.commit()
        committed = True
    finally:
        if not committed:
            writer.abort()
            if thumbnail_key:
                await remove_files(ctx, [thumbnail_key])
    try:
        return await ctx.store.write(
            _insert, user_id, clean_filename(filename), mime, size, key,
            width, height, thumbnail_key)
    except BaseException:
        await ctx.storage.delete([key, thumbnail_key])
        raise


def _unsent_count(user_id):
    return (Attachment.select().where(Attachment.uploader == user_id,
                                      Attachment.message.is_null())
            .count())


def _check_text(decoder, chunk, final=False):
    try:
        decoder.decode(chunk, final)
    except UnicodeDecodeError:
        raise UnsupportedType('this type of file is not allowed') from None


async def _run_image(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(
        _images, fn, *args)


def _thumbnail(path, box, max_pixels):
    """(width, height, thumbnail bytes or None) of the image at ``path``.
    Runs in a thread: decoding is CPU work. Raises UnsupportedType when
    the file is not a readable image after all."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            width, height = image.size
            # The stored pixels may be rotated; EXIF says how to show them.
            if (image.getexif().get(0x0112) or 1) in (5, 6, 7, 8):
                width, height = height, width
            if width * height > max_pixels:
                return width, height, None
            image.draft('RGB', (box, box))  # JPEG: decode at a fraction
            image = ImageOps.exif_transpose(image)
            image.thumbnail((box, box))
            if image.mode not in ('RGB', 'RGBA'):
                image = image.convert(
                    'RGBA' if 'transparency' in image.info
                    or image.mode in ('LA', 'PA') else 'RGB')
            out = io.BytesIO()
            image.save(out, 'WEBP', quality=80)
            return width, height, out.getvalue()
    except Image.DecompressionBombError:
        # Refused rather than kept without a thumbnail: it would be served
        # inline, and the bomb would go off in the recipients' browsers.
        raise UnsupportedType('the image has too many pixels') from None
    except (UnidentifiedImageError, OSError, ValueError,
            SyntaxError) as exc:
        log.info('refused an image that does not decode: %s', exc)
        raise UnsupportedType('the image could not be read') from None


def _insert(user_id, filename, mime, size, key, width, height,
            thumbnail_key):
    att = Attachment.create(
        uploader=user_id, filename=filename, content_type=mime, size=size,
        storage_key=key, width=width, height=height,
        thumbnail_key=thumbnail_key, created_at=now_ms())
    return attachment_dict(att)


def _readable(user_id, attachment_id):
    att = Attachment.get_or_none(Attachment.id == attachment_id)
    if att is not None and att.uploader_id != user_id and (
            att.message_id is None or not Membership.select().join(
                Message, on=(Message.room == Membership.room)).where(
                Message.id == att.message_id,
                Membership.user == user_id).exists()):
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


def is_inline(content_type) -> bool:
    """Whether a browser may show this type in the page; the rest is
    served as a download."""
    return content_type in INLINE_TYPES


def detach_message(message_id) -> list:
    """Delete the attachment rows of a message and return their storage
    keys, for ``remove_files`` after the commit. Runs on the writer, inside
    the transaction that deletes the message."""
    rows = list(Attachment.select(Attachment.storage_key,
                                  Attachment.thumbnail_key)
                .where(Attachment.message == message_id).tuples())
    Attachment.delete().where(Attachment.message == message_id).execute()
    return [key for row in rows for key in row if key]


async def remove_files(ctx, keys):
    """Remove stored files whose rows are gone (committed). Never raises:
    a file left behind is found again by the sweep."""
    try:
        await ctx.storage.delete([k for k in keys if k])
    except Exception:
        log.exception('removing %s stored files failed', len(keys))


def _orphans(cutoff_ms, limit):
    return list(Attachment.select(Attachment.id, Attachment.storage_key,
                                  Attachment.thumbnail_key)
                .where(Attachment.message.is_null(),
                       Attachment.created_at < cutoff_ms)
                # Oldest first: on SQLite the order of the (message,
                # created_at) index, so no sort and the search stops after
                # ``limit`` rows. PostgreSQL sorts the expired rows it
                # finds through that index.
                .order_by(Attachment.created_at, Attachment.id)
                .limit(limit).tuples())


def _delete_unsent(rows):
    keys = []
    for att_id, key, thumb in rows:
        # Re-checked in the DELETE: a send may have taken it since it was
        # found (the search runs on a reader, outside this transaction).
        if Attachment.delete().where(Attachment.id == att_id,
                                     Attachment.message.is_null()).execute():
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
        rows = await ctx.store.read(_orphans, now_ms() - seconds * 1000,
                                    CLEANUP_BATCH)
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
