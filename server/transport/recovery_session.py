"""A recovery session's bookkeeping (see ``recovery.py``): which log event
each offset sent to a socket was, folded into per-room marks past the last
``recovery_max_events`` sends, and what a client that returns an offset
has received. Plain data, no I/O."""
import collections

TRACKED = frozenset(('message', 'message_updated', 'room', 'room_left'))
# Payload fields that only sockets with a recovery session get (the others
# see no change): room_left's seq, the departure's, as sync gives it.
RECOVERY_FIELDS = {'room_left': ('seq',)}


def plain_payload(event, data):
    """``data`` as sockets without a recovery session get it."""
    fields = RECOVERY_FIELDS.get(event)
    if not fields or not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k not in fields}


def event_key(event, data):
    """The log event ``(room_id, seq)`` an emitted event is; for a
    ``room`` event that is not in the log (a new dm's, a new group's)
    ``(room_id, 0)``. No log event has seq 0: it folds into the room's
    marks at 0, so the session knows the client heard of the room (a
    recovery does not send it again; a live copy of a replayed one is a
    duplicate). None for anything else."""
    if not isinstance(data, dict):
        return None
    try:
        if event == 'message':
            return int(data['room_id']), int(data['seq'])
        if event == 'message_updated':
            return int(data['room_id']), int(data['update_seq'])
        if event == 'room':
            # Only a group change is logged; its room carries the change's
            # seq as last_seq. A new group (last_seq 0) and dms are not.
            if data.get('kind') == 'group' and data.get('last_seq'):
                return int(data['id']), int(data['last_seq'])
            return int(data['id']), 0
        if event == 'room_left' and data.get('seq'):
            return int(data['room_id']), int(data['seq'])
    except (KeyError, TypeError, ValueError):
        pass
    return None


def _fold(marks, extras, key):
    """Add a received log event to ``marks`` (room -> highest seq with
    none missing before it) and ``extras`` (room -> received seqs above
    that). A room first seen here starts just before its first event."""
    if key is None:
        return
    room, seq = key
    mark = marks.get(room)
    if mark is None:
        mark = marks[room] = seq - 1
    if seq <= mark:
        return
    if seq == mark + 1:
        above = extras.get(room)
        mark = seq
        while above and mark + 1 in above:
            mark += 1
            above.discard(mark)
        if above is not None and not above:
            del extras[room]
        marks[room] = mark
    else:
        extras.setdefault(room, set()).add(seq)


class Session:
    """One recovery session: what was sent to it, by offset."""

    def __init__(self, pid, user_id, base):
        self.pid = pid
        self.user_id = user_id
        self.marks = dict(base)  # folded sends included
        self.extras = {}
        self.ring = collections.deque()  # (room, seq) or None, by offset
        self.sent = collections.Counter()  # the log events in ring
        self.count = 0  # the last offset given
        self.joined = ()  # room ids joined (join_room), when frozen
        self.saved_at = 0.0
        self.buffer = None  # live events held while recovering

    @property
    def first(self) -> int:
        """The offset of the oldest send kept one by one."""
        return self.count - len(self.ring) + 1

    def record(self, key, keep) -> str:
        self.count += 1
        self.ring.append(key)
        self.sent[key] += 1
        while len(self.ring) > keep:
            old = self.ring.popleft()
            self._forget(old)
            _fold(self.marks, self.extras, old)
        return str(self.count)

    def _forget(self, key):
        left = self.sent[key] - 1
        if left > 0:
            self.sent[key] = left
        else:
            del self.sent[key]

    def has_sent(self, key) -> bool:
        """Whether the log event ``key`` is among the sends kept one by
        one (so the client has it, or gets it again by recovering)."""
        return key is not None and key in self.sent

    def received(self, offset):
        """(marks, extras) of what a client that saw ``offset`` has; the
        sends after it are dropped from the session (never received)."""
        while self.count > offset:
            self._forget(self.ring.pop())
            self.count -= 1
        marks = dict(self.marks)
        extras = {r: set(s) for r, s in self.extras.items()}
        for key in self.ring:
            # A room new to the session (a new dm, a group the user was
            # added to) counts from its start, as sync does: its first
            # event received says nothing of the ones sent before it.
            if key is not None and key[0] not in marks:
                marks[key[0]] = 0
            _fold(marks, extras, key)
        return marks, extras

    def to_json(self):
        return {'pid': self.pid, 'user_id': self.user_id,
                'marks': list(self.marks.items()),
                'extras': [[r, sorted(s)] for r, s in self.extras.items()],
                'ring': list(self.ring), 'count': self.count,
                'joined': list(self.joined), 'saved_at': self.saved_at}

    @classmethod
    def from_json(cls, data):
        session = cls(data['pid'], data['user_id'],
                      {int(r): int(s) for r, s in data['marks']})
        session.extras = {int(r): set(s) for r, s in data['extras']}
        session.ring = collections.deque(
            tuple(k) if k is not None else None for k in data['ring'])
        session.sent.update(session.ring)
        session.count = int(data['count'])
        session.joined = tuple(data['joined'])
        session.saved_at = float(data['saved_at'])
        return session
