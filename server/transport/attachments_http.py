"""HTTP views of attachments: upload (multipart, streamed), download and
thumbnail. The rules are in server/services/attachments.py."""
import asyncio
import logging
from urllib.parse import quote, unquote

from aiohttp import MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from server.errors import Invalid, NotFound, RangeNotSatisfiable, \
    TooLarge, TooSlow
from server.services import attachments
from server.transport.http_base import (current_user, json_response,
                                        path_int)
from server.typedefs import CTX

log = logging.getLogger(__name__)

# Bytes read per step of an upload: big enough to keep system calls few,
# small enough that a thousand uploads at once hold only 64 MiB.
CHUNK_BYTES = 64 * 1024
# Room for the multipart boundaries and part headers around the file.
MULTIPART_SLACK = 64 * 1024
# Parts looked at before the one named ``file`` must have come.
MAX_PARTS = 8
NOT_MULTIPART = 'send multipart/form-data with a "file" field'
# Whatever the file holds, the page that shows it may run nothing, load
# nothing and is its own origin.
FILE_CSP = "default-src 'none'; sandbox"


class _Pace:
    """Deadlines of one upload's reads: a read waits at most
    ``attachment_upload_idle_seconds``, and after that many seconds the
    body must have come at ``attachment_upload_min_bytes_per_second`` on
    average. A client trickling a byte a minute holds a connection, a
    file and a quota slot for nothing."""

    def __init__(self, config):
        self.idle = config.attachment_upload_idle_seconds
        self.rate = config.attachment_upload_min_bytes_per_second
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.received = 0

    async def read(self, awaitable):
        limit = self.idle
        if self.rate > 0:
            due = self.started + self.idle + self.received / self.rate
            limit = min(limit, due - self.loop.time())
        try:
            if limit <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(awaitable, limit)
        except asyncio.TimeoutError:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise TooSlow(
                f'the upload came too slowly: at least {self.rate} bytes '
                f'a second, no pause over {self.idle:g} s') from None


async def _file_part(request, pace):
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise Invalid(NOT_MULTIPART) from None
    for _ in range(MAX_PARTS):
        try:
            part = await pace.read(reader.next())
        except (ValueError, HttpProcessingError):
            # A part's headers that do not parse: no colon, a control
            # character in the filename, a missing boundary.
            raise Invalid(f'{NOT_MULTIPART} (a part does not parse)') \
                from None
        if part is None:
            break
        if isinstance(part, MultipartReader):
            raise Invalid(f'{NOT_MULTIPART} (not a nested multipart)')
        if part.name == 'file' and getattr(part, 'filename', None) \
                is not None:
            encoding = part.headers.get('Content-Transfer-Encoding', '')
            if encoding.lower() not in ('', 'binary', '8bit', '7bit'):
                raise Invalid('Content-Transfer-Encoding is not supported')
            return part
        await pace.read(part.release())
    raise Invalid(NOT_MULTIPART)


async def _chunks(part, pace):
    while True:
        chunk = await pace.read(part.read_chunk(CHUNK_BYTES))
        if not chunk:
            return
        pace.received += len(chunk)
        yield chunk


async def upload(request):
    """``POST /api/attachments`` (field ``file``) -> ``201 {attachment}``."""
    user = await current_user(request)
    ctx = request.app[CTX]
    limit = ctx.config.attachment_max_bytes
    # A declared length already over the limit is refused before a byte
    # of it is read; a chunked body is counted as it streams.
    if (request.content_length or 0) > limit + MULTIPART_SLACK:
        raise TooLarge(f'attachments: at most {limit} bytes')
    pace = _Pace(ctx.config)
    part = await _file_part(request, pace)
    # Browsers send the name raw with only '"', CR and LF percent-encoded;
    # some clients (aiohttp's) percent-encode everything. Either way it is
    # a display name, cleaned by the service.
    filename = unquote(part.filename, errors='replace')
    # The declared length (less the multipart framing) lets a file over
    # the user's quota be refused before it streams.
    declared = max(0, (request.content_length or 0) - MULTIPART_SLACK)
    attachment = await attachments.upload(ctx, user['id'], filename,
                                          _chunks(part, pace), declared)
    return json_response({'attachment': attachment}, status=201)


def content_disposition(kind: str, filename: str) -> str:
    """RFC 6266: an ASCII fallback name plus the exact one in
    ``filename*`` (RFC 5987 percent-encoding)."""
    fallback = ''.join(c if 32 <= ord(c) < 127 and c not in '"\\%;'
                       else '_' for c in filename) or 'file'
    return (f'{kind}; filename="{fallback}"; '
            f"filename*=UTF-8''{quote(filename, safe='')}")


def _check_range(request, path):
    """Refuse a byte range the file cannot serve, as JSON like every other
    refusal (aiohttp's own 416 has an empty body). The same rules as
    aiohttp's ``FileResponse``: a range is ignored when If-Range names an
    older version, a suffix range is clamped to the file, and a range
    starting at or past the end is unsatisfiable."""
    if 'Range' not in request.headers:
        return
    stat = path.stat()
    if_range = request.if_range
    if if_range is not None and stat.st_mtime > if_range.timestamp():
        return  # the whole file is sent
    try:
        start, end = request.http_range.start, request.http_range.stop
    except ValueError:
        start = end = stat.st_size  # unreadable: refused below
    if start is None:
        return
    if start < 0 and end is None:
        start = max(0, start + stat.st_size)
    if start >= stat.st_size:
        raise RangeNotSatisfiable(stat.st_size)


def _file_response(request, key, content_type, disposition):
    ctx = request.app[CTX]
    path = ctx.storage.local_path(key)
    if path is None or not path.is_file():
        raise NotFound('no such attachment')
    _check_range(request, path)
    if content_type == 'text/plain':
        content_type = 'text/plain; charset=utf-8'
    return web.FileResponse(path, headers={
        'Content-Type': content_type,
        'Content-Disposition': disposition,
        'X-Content-Type-Options': 'nosniff',
        'Content-Security-Policy': FILE_CSP,
        # Embedding from other sites gets nothing.
        'Cross-Origin-Resource-Policy': 'same-origin',
        # Private: never in a shared cache. no-cache: the browser asks
        # again (a cheap 304) so a revoked access is noticed.
        'Cache-Control': 'private, no-cache',
    })


async def download(request):
    """``GET /api/attachments/{id}``: the bytes, for the uploader and the
    members of a room where it was sent; 404 for everyone else. Images are
    shown inline, everything else is a download. Range requests work."""
    user = await current_user(request, spend=False)
    ctx = request.app[CTX]
    att = await attachments.readable(ctx, user['id'],
                                     path_int(request, 'attachment_id'))
    kind = 'inline' if attachments.is_inline(
        att['content_type'], att['thumbnail_key']) else 'attachment'
    return _file_response(request, att['storage_key'], att['content_type'],
                          content_disposition(kind, att['filename']))


async def thumbnail(request):
    """``GET /api/attachments/{id}/thumbnail``: a small WebP of an image,
    same access as the file."""
    user = await current_user(request, spend=False)
    ctx = request.app[CTX]
    att = await attachments.readable(ctx, user['id'],
                                     path_int(request, 'attachment_id'))
    if not att['thumbnail_key']:
        raise NotFound('this attachment has no thumbnail')
    name = att['filename'].rsplit('.', 1)[0] + '.thumb.webp'
    return _file_response(request, att['thumbnail_key'],
                          attachments.THUMBNAIL_TYPE,
                          content_disposition('inline', name))


def add_routes(app: web.Application):
    app.router.add_post('/api/attachments', upload)
    app.router.add_get('/api/attachments/{attachment_id}', download)
    app.router.add_get('/api/attachments/{attachment_id}/thumbnail',
                       thumbnail)
