"""Thumbnails of uploaded images, made off the event loop on a small pool
of threads, with the pixels decoded at once bounded per process."""
import asyncio
import contextlib
import io
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from server.errors import UnsupportedType

log = logging.getLogger(__name__)

PILLOW_FORMATS = ['PNG', 'JPEG', 'GIF', 'WEBP']
# Decoding images is CPU work: two threads; the memory they take is
# bounded by _PixelBudget below.
_images = ThreadPoolExecutor(2, thread_name_prefix='pb-image')
# Sizes are checked from the header before anything is decoded, so
# Pillow's warning about big images (logged once per process) says
# nothing; its DecompressionBombError stays as a second guard.
warnings.simplefilter('ignore', Image.DecompressionBombWarning)


async def run_image(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(
        _images, fn, *args)


class _Turns:
    """One image at a time per user on the pool: a user uploading many
    big images at once waits for their own, and anyone else's image takes
    the next free thread (the pool's queue alone is first come, first
    served: 40 images of 40 megapixels held another user's thumbnail for
    4 s)."""

    def __init__(self):
        self._users = {}  # user id -> [asyncio.Lock, callers holding or waiting]

    @contextlib.asynccontextmanager
    async def of(self, user_id):
        entry = self._users.get(user_id)
        if entry is None:
            entry = self._users[user_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._users[user_id]


turns = _Turns()


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


def thumbnail(path, box, max_pixels):
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
