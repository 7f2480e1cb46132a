"""The bot's state file: the last seq handled per room, the kinds of its
rooms (``is_dm`` after a restart, webhook mode included) and its latest
token (refreshed ones: see ``tokens.py``), so that a restarted bot resumes
where it stopped. The file holds a token: it is written readable by its
owner only."""
import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path

from .tokens import newer_token

log = logging.getLogger(__name__)


class StateMixin:
    """Loads and saves :class:`postbox_bot.Bot`'s ``seqs`` to
    ``state_path`` (None: kept in memory only)."""

    def _load_state(self):
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            state = json.loads(self.state_path.read_text())
            self.seqs = {int(k): int(v) for k, v in state['seqs'].items()}
            self._state_user_id = state.get('user_id')
            self._kinds = {int(k): v for k, v in
                           (state.get('kinds') or {}).items()
                           if v in ('dm', 'group')}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning('ignoring unreadable state file %s', self.state_path)
            return
        self._have_state = True
        saved = state.get('token')
        if self.token and isinstance(saved, str):
            # A token refreshed by an earlier run (the one given may have
            # expired since); a newer one given wins.
            self.token = newer_token(self.token, saved)

    def _check_state_owner(self):
        owner = self._state_user_id
        if owner is not None and owner != self.user['id']:
            # Another account's seqs would skip or replay this one's rooms.
            log.warning('state file %s belongs to user %s; starting fresh',
                        self.state_path, owner)
            self.seqs = {}
            self._kinds = {}
            self._have_state = False

    def _room_kinds(self) -> dict:
        kinds = dict(self._kinds)
        for room_id, room in self.rooms.items():
            if isinstance(room, dict) and room.get('kind') in ('dm', 'group'):
                kinds[room_id] = room['kind']
        return kinds  # a room left is dropped from both when it is left

    async def _save_state(self):
        if self.state_path is None:
            return
        if self._state_lock is None:
            self._state_lock = asyncio.Lock()
        # One write at a time (webhook deliveries run concurrently), each
        # taking the state as it is when its turn comes: the last write
        # has the newest state.
        async with self._state_lock:
            self._kinds = self._room_kinds()
            state = {'url': self.url,
                     'user_id': self.user['id'] if self.user else None,
                     'seqs': {str(k): v for k, v in self.seqs.items()},
                     'kinds': {str(k): v for k, v in self._kinds.items()}}
            if self.token:
                state['token'] = self.token
            await asyncio.to_thread(_write_atomically, self.state_path,
                                    json.dumps(state))


def _write_atomically(path: Path, text: str):
    # Write a temporary file of its own (unique name, same directory) then
    # rename it over the file, so a crash mid-write never leaves half a
    # file and two writes never share a temporary file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.',
                               suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
