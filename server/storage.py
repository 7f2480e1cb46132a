"""Where attachment bytes live, behind a small interface.

A store hands out random keys, never names taken from user input, so an
uploaded ``../../x`` can only ever be a display name. ``LocalStorage`` keeps
files in a directory (``config.attachments_path`` by default).

The interface, for another backend (an S3-compatible bucket, say):

- ``writer() -> Writer``: a new upload. ``await write(chunk)`` appends,
  ``local_path`` is a local file with what was written so far (a remote
  store spools to it, which is also what a multipart upload to S3 wants),
  ``await commit() -> key`` publishes it, ``abort()`` throws it away.
- ``await put_bytes(data) -> key``: a small object (thumbnails).
- ``local_path(key) -> Path | None``: a local file to serve with range
  support; a remote store returns None and the transport would redirect to
  a pre-signed URL instead.
- ``await delete(keys)``: removal, idempotent.
- ``await remove_stale_parts(seconds)``: drops uploads that died with
  their process.

Every blocking call runs in a thread: the event loop never waits on a disk.
"""
import asyncio
import logging
import os
import re
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)

KEY_RE = re.compile(r'^[0-9a-f]{32}$')
PART_SUFFIX = '.part'
# Uploads are private to their room: only the server's own user may read
# them (and the database, the secret) on a shared host.
DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path):
    """Create ``path`` (and missing parents) readable by the server's user
    only; an existing one is tightened to that."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(DIR_MODE)


def private_data(config):
    """Make the data dir, the attachments dir and the SQLite files private
    before anything is written: created 0700 / 0600, and tightened if an
    older version left them world-readable. The SQLite file is created
    here, empty, because SQLite gives its -wal and -shm files the mode of
    the database file."""
    private_dir(config.data_path)
    private_dir(config.attachments_path)
    url = config.effective_database_url
    if not url.startswith('sqlite:///') or url.endswith(':memory:'):
        return
    database = Path(url[len('sqlite:///'):])
    database.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    for path in (database, Path(f'{database}-wal'), Path(f'{database}-shm'),
                 config.data_path / 'secret'):
        try:
            if path.stat().st_mode & 0o077:
                path.chmod(FILE_MODE)
        except FileNotFoundError:
            pass


def new_key() -> str:
    """128 random bits: unguessable and never derived from user input."""
    return secrets.token_hex(16)


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class LocalWriter:
    """One upload being written to a temporary file next to its final
    place (same file system, so commit is an atomic rename)."""

    def __init__(self, storage):
        self.storage = storage
        self.key = new_key()
        self.local_path = storage.root / (self.key + PART_SUFFIX)
        self._file = None
        self.size = 0

    async def open(self):
        def open_part():
            self.storage.root.mkdir(mode=DIR_MODE, parents=True,
                                    exist_ok=True)
            # O_EXCL: never follow or reuse something already there.
            fd = os.open(self.local_path,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            return os.fdopen(fd, 'wb')
        self._file = await _in_thread(open_part)
        return self

    async def write(self, chunk: bytes):
        await _in_thread(self._file.write, chunk)
        self.size += len(chunk)

    async def flush(self):
        """Make what was written readable through ``local_path``."""
        await _in_thread(self._file.flush)

    async def commit(self) -> str:
        """Sync the file to disk and move it to its key. Returns the key."""
        final = self.storage.path_of(self.key)

        def publish():
            self._file.flush()
            # An upload answered 201 should survive a power loss, like
            # an acked message.
            os.fsync(self._file.fileno())
            self._file.close()
            final.parent.mkdir(mode=DIR_MODE, exist_ok=True)
            os.replace(self.local_path, final)
        await _in_thread(publish)
        self._file = None
        return self.key

    def abort(self):
        """Close and remove the partial file. Synchronous (two fast system
        calls) so that it also runs inside a cancelled task."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        try:
            self.local_path.unlink(missing_ok=True)
        except OSError:
            log.warning('could not remove %s', self.local_path, exc_info=True)


class LocalStorage:
    """Files in ``root``: ``root/<k[:2]>/<key>``, partial uploads as
    ``root/<key>.part``."""

    def __init__(self, root):
        self.root = Path(root)

    def path_of(self, key: str) -> Path:
        if not KEY_RE.match(key or ''):
            raise ValueError(f'bad storage key {key!r}')
        return self.root / key[:2] / key

    async def writer(self) -> LocalWriter:
        return await LocalWriter(self).open()

    async def put_bytes(self, data: bytes) -> str:
        writer = await self.writer()
        try:
            await writer.write(data)
            return await writer.commit()
        except BaseException:
            writer.abort()
            raise

    def local_path(self, key: str) -> Path | None:
        return self.path_of(key)

    async def delete(self, keys):
        """Remove the files of ``keys``; missing ones are fine."""
        paths = [self.path_of(k) for k in keys if k]

        def remove():
            for path in paths:
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    log.warning('could not remove %s', path, exc_info=True)
        if paths:
            await _in_thread(remove)

    async def remove_stale_parts(self, seconds: float) -> int:
        """Remove partial uploads older than ``seconds``: what an upload
        leaves when its process dies mid-way. Returns how many."""
        cutoff = time.time() - seconds

        def remove():
            stale = [e for e in self._entries(self.root)
                     if e.name.endswith(PART_SUFFIX)
                     and self._older(e, cutoff)]
            for path in stale:
                path.unlink(missing_ok=True)
            return len(stale)
        return await _in_thread(remove)

    @staticmethod
    def _entries(directory):
        try:
            return list(directory.iterdir())
        except FileNotFoundError:
            return []

    @staticmethod
    def _older(path, cutoff) -> bool:
        try:
            return path.stat().st_mtime < cutoff
        except FileNotFoundError:  # removed while we looked
            return False
