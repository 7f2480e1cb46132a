"""Attachments: upload, who may read them, thumbnails, and removal (with
their message, or when never sent).

The bytes go to ``ctx.storage`` (see server/storage.py) under random keys;
the row keeps the user's file name for display only (never with a
runnable ending). The type is sniffed from the bytes (``Sniffer``): what a
browser or a desktop would run is refused, a type in
``config.attachment_types`` keeps its name, anything else is
application/octet-stream; the client's name and Content-Type are never
trusted. Only images with a thumbnail are shown inline.
"""
import asyncio
import codecs
import contextlib
import errno
import io
import logging
import mimetypes
import re
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor

import filetype
from peewee import fn
from PIL import Image, UnidentifiedImageError

from models import Attachment, Membership, Message
from server.errors import (Invalid, NotFound, PostboxError, RateLimited,
                           TooLarge, UnsupportedType)
from server.services.context import now_ms
from server.services.serialize import attachment_dict
from server.data.database import dialect

log = logging.getLogger(__name__)

# filetype needs the first 261 bytes; the markup checks look a bit
# further, as far as a browser's own sniffing does (1445 bytes, WHATWG
# MIME Sniffing), after any leading whitespace.
SNIFF_BYTES = 1445
OCTET_STREAM = 'application/octet-stream'
# Pictures a browser shows inline (with nosniff and a sandbox CSP) when
# they have a thumbnail (so their size was checked); every other type is
# only ever served as a download.
INLINE_TYPES = frozenset({'image/png', 'image/jpeg', 'image/gif',
                          'image/webp'})
PILLOW_FORMATS = ['PNG', 'JPEG', 'GIF', 'WEBP']
# Starts of text that a browser (or a careless viewer) would treat as a
# page or a program rather than as plain text.
ACTIVE_TEXT = (b'<!doctype', b'<html', b'<head', b'<body', b'<script',
               b'<svg', b'<?xml', b'<iframe', b'<object', b'<embed',
               b'<meta', b'<style', b'<link', b'#!')
# Sniffed types that run when opened, whatever they are served as:
# refused. Other types not in ``attachment_types`` are kept as
# application/octet-stream.
RUNNABLE_TYPES = frozenset({
    'application/x-msdownload', 'application/x-executable',
    'application/x-shockwave-flash', 'application/x-google-chrome-extension'})
# File name endings that a browser or a desktop runs (or renders as a
# page) when the downloaded file is opened. A file whose name ends in one
# is stored with its type's own ending appended: invoice.html.txt.
RUNNABLE_EXTENSIONS = frozenset({
    'html', 'htm', 'xhtml', 'xht', 'shtml', 'mht', 'mhtml', 'svg', 'svgz',
    'xml', 'xsl', 'xslt', 'js', 'mjs', 'hta', 'htc', 'swf', 'exe', 'com',
    'bat', 'cmd', 'scr', 'pif', 'msi', 'vbs', 'vbe', 'jse', 'wsf', 'wsh',
    'ps1', 'lnk', 'reg', 'jar', 'cpl', 'url', 'desktop', 'command'})
# Sniffed types that are a variant of an allowed one.
SAME_AS = {'image/apng': 'image/png'}
# Skipped before looking at how a file starts (a byte order mark too).
LEADING = b' \t\r\n\f\v\xef\xbb\xbf'
FILENAME_MAX = 255
# Endings for stored_filename where mimetypes has none or an odd one.
TYPE_EXTENSIONS = {'text/plain': '.txt', OCTET_STREAM: '.bin',
                   'image/jpeg': '.jpg'}
THUMBNAIL_TYPE = 'image/webp'
# Decoding images is CPU work: two threads; the memory they take is
# bounded by _PixelBudget below.
_images = ThreadPoolExecutor(2, thread_name_prefix='pb-image')
# Sizes are checked from the header before anything is decoded, so
# Pillow's warning about big images (logged once per process) says
# nothing; its DecompressionBombError stays as a second guard.
warnings.simplefilter('ignore', Image.DecompressionBombWarning)
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
    # Windows drops trailing dots and spaces: "a.html. " opens as a.html.
    name = name.rstrip('. ')
    if not name:
        name = 'file'
    return name[:FILENAME_MAX]


def stored_filename(name: str, mime: str) -> str:
    """``name`` (cleaned) as it is kept and offered for download: a name
    ending in a runnable extension gets the ending of the file's real type
    appended (``invoice.html`` holding text becomes ``invoice.html.txt``,
    unknown bytes ``.bin``), so opening the download never runs it."""
    name = clean_filename(name)
    if name.rsplit('.', 1)[-1].lower() in RUNNABLE_EXTENSIONS and \
            '.' in name:
        ending = TYPE_EXTENSIONS.get(mime) or \
            mimetypes.guess_extension(mime) or '.bin'
        name = name[:FILENAME_MAX - len(ending)] + ending
    return name


def refuse_markup(start: bytes, head: bytes):
    """Raise UnsupportedType if a file without magic bytes is a page, an
    image a browser would render (SVG, XML) or a script: ``start`` is its
    beginning after leading whitespace, ``head`` its first bytes."""
    start = start.lstrip(b'\xef\xbb\xbf').lstrip().lower()
    if start.startswith(b'#!'):
        raise UnsupportedType('scripts are not allowed')
    if start.startswith(ACTIVE_TEXT) or (b'\x00' not in head and any(
            marker in head.lower() for marker in ACTIVE_TEXT[:9])):
        raise UnsupportedType('HTML, SVG and XML documents are not allowed')


class Sniffer:
    """The type of an upload, from its bytes as they stream (``feed``),
    final at ``result()``. Keeps at most twice ``SNIFF_BYTES``.

    - Magic bytes (``filetype``): executables are refused; a type in
      ``allowed`` keeps its name, any other is application/octet-stream.
    - No magic bytes: a page, SVG, XML or script is refused (by how it
      starts, after any whitespace); valid UTF-8 without NUL bytes is
      text/plain; anything else is application/octet-stream.
    Raises UnsupportedType as soon as the bytes seen decide a refusal."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.head = bytearray()    # the first SNIFF_BYTES
        self.start = bytearray()   # the first SNIFF_BYTES after whitespace
        self.magic = None          # the type from magic bytes, or ''
        self.checked = False       # markup checked
        self.text = codecs.getincrementaldecoder('utf-8')()
        self.is_text = True

    def feed(self, chunk: bytes):
        if len(self.head) < SNIFF_BYTES:
            self.head += chunk[:SNIFF_BYTES - len(self.head)]
        if len(self.start) < SNIFF_BYTES:
            lead = chunk if self.start else chunk.lstrip(LEADING)
            self.start += lead[:SNIFF_BYTES - len(self.start)]
        if self.magic is None and len(self.head) >= SNIFF_BYTES:
            self._magic()
        if self.magic == '' and not self.checked and \
                len(self.start) >= SNIFF_BYTES:
            self._markup()
        if self.is_text and not self.magic:
            try:
                self.text.decode(chunk)
            except UnicodeDecodeError:
                self.is_text = False
            if b'\x00' in chunk:
                self.is_text = False

    def _magic(self):
        kind = filetype.guess(bytes(self.head))
        if kind is None:
            self.magic = ''
            return
        mime = SAME_AS.get(kind.mime, kind.mime)
        if mime in RUNNABLE_TYPES:
            raise UnsupportedType(f'executables are not allowed ({mime})')
        self.magic = mime if mime in self.allowed else OCTET_STREAM

    def _markup(self):
        self.checked = True
        refuse_markup(bytes(self.start), bytes(self.head))

    def result(self) -> str:
        """The type, once every byte was fed. Raises UnsupportedType."""
        if self.magic is None:
            self._magic()
        if self.magic:
            return self.magic
        if not self.checked:
            self._markup()
        if self.is_text:
            try:
                self.text.decode(b'', True)
            except UnicodeDecodeError:
                self.is_text = False
        if self.is_text and 'text/plain' in self.allowed:
            return 'text/plain'
        return OCTET_STREAM


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
                width, height, thumbnail = await _run_image(
                    _thumbnail, writer.local_path,
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
    unsent = (Attachment.select(fn.COUNT(Attachment.id),
                                fn.COALESCE(fn.SUM(Attachment.size), 0))
              .where(Attachment.uploader == user_id,
                     Attachment.message.is_null()).tuples().get())
    others = Membership.alias()
    # Rooms first (at most rooms_per_user_max, usually none of them
    # alone), so the common case reads no sent attachment at all.
    alone = [room for (room,) in Membership.select(Membership.room).where(
        Membership.user == user_id,
        ~fn.EXISTS(others.select(others.id).where(
            others.room == Membership.room,
            others.user != user_id))).tuples()]
    if not alone:
        return unsent[0], int(unsent[1])
    kept = (Attachment.select(fn.COUNT(Attachment.id),
                              fn.COALESCE(fn.SUM(Attachment.size), 0))
            .join(Message, on=(Attachment.message == Message.id))
            .where(Attachment.uploader == user_id,
                   Message.room.in_(alone)).tuples().get())
    return unsent[0] + kept[0], int(unsent[1]) + int(kept[1])


async def _run_image(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(
        _images, fn, *args)


class _PixelBudget:
    """Pixels being decoded at once in this process: at most ``limit``,
    or one image of any allowed size. A decoded pixel takes up to 4 bytes,
    so the memory thumbnails take stays under 4 x the pixel limit however
    many images arrive together."""

    def __init__(self):
        self._free = threading.Condition()
        self.in_use = 0

    @contextlib.contextmanager
    def take(self, pixels, limit):
        with self._free:
            self._free.wait_for(
                lambda: not self.in_use or self.in_use + pixels <= limit)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._free:
                self.in_use -= pixels
                self._free.notify_all()


_decoding = _PixelBudget()
# EXIF orientations that swap width and height, and how to undo each.
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def _thumbnail(path, box, max_pixels):
    """(width, height, thumbnail bytes or None) of the image at ``path``.
    Runs in a thread: decoding is CPU work. The size comes from the
    header; an image of more than ``max_pixels`` is never decoded and gets
    no thumbnail (it is then only served as a download). Raises
    UnsupportedType when the file is not a readable image after all."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                return width, height, None
            # Only EXIF already read with the header: PNG's getexif()
            # would decode the whole image to look after it.
            orientation = image.getexif().get(0x0112) \
                if 'exif' in image.info else None
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            image.draft('RGB', (box, box))  # JPEG: decode at a fraction
            with _decoding.take(image.size[0] * image.size[1], max_pixels):
                image.thumbnail((box, box))
            if orientation in TRANSPOSE:
                image = image.transpose(TRANSPOSE[orientation])
            if image.mode not in ('RGB', 'RGBA'):
                image = image.convert(
                    'RGBA' if 'transparency' in image.info
                    or image.mode in ('LA', 'PA') else 'RGB')
            out = io.BytesIO()
            image.save(out, 'WEBP', quality=80)
            return width, height, out.getvalue()
    except Image.DecompressionBombError:
        # Past Pillow's own limit (which it checks in the header): kept
        # as a download without a thumbnail, like any other huge image.
        return None, None, None
    except (UnidentifiedImageError, OSError, ValueError,
            SyntaxError) as exc:
        log.info('refused an image that does not decode: %s', exc)
        raise UnsupportedType('the image could not be read') from None


def _insert(user_id, filename, mime, size, key, width, height,
            thumbnail_key, config):
    # The quota is checked again here, in the writer's transaction, where
    # no other insert can come between the count and this row: with the
    # user's row locked on PostgreSQL, and under SQLite's write lock.
    dialect().lock_rows('user', [user_id])
    count, held = held_uploads(user_id)
    check_quota(config, count, held, size)
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


def is_inline(content_type, thumbnail_key) -> bool:
    """Whether a browser may show this file in the page: an image small
    enough to have a thumbnail (a huge one would be a decompression bomb
    in the viewer's browser). The rest is served as a download."""
    return content_type in INLINE_TYPES and bool(thumbnail_key)


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
