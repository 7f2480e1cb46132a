"""The bot's state file: the last seq handled per room, so that a
restarted bot resumes where it stopped."""
import asyncio
import json
import logging
import os
from pathlib import Path

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
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning('ignoring unreadable state file %s', self.state_path)
            return
        self._have_state = True

    def _check_state_owner(self):
        owner = self._state_user_id
        if owner is not None and owner != self.user['id']:
            # Another account's seqs would skip or replay this one's rooms.
            log.warning('state file %s belongs to user %s; starting fresh',
                        self.state_path, owner)
            self.seqs = {}
            self._have_state = False

    async def _save_state(self):
        if self.state_path is None:
            return
        state = {'url': self.url,
                 'user_id': self.user['id'] if self.user else None,
                 'seqs': {str(k): v for k, v in self.seqs.items()}}
        await asyncio.to_thread(_write_atomically, self.state_path,
                                json.dumps(state))


def _write_atomically(path: Path, text: str):
    # Write then rename, so a crash mid-write never leaves half a file.
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)
