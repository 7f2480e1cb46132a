"""What this process knows of the other processes holding its rooms.

A process that enters a room for the first time adds itself to the room's
set and, in the same script, tells every other live process in it (a
notice on their host channels); each of them adds it to what it knows and
acks. Entering returns only once all have acked (or after the fan-out's
``join_timeout``), so by the time a client is told it is connected, no
other process still believes it is alone in that room: a message stored
after that reaches it live, and one stored before is in the client's
``sync``. What a process knows counts only while its listener stays
subscribed: losing it forgets everything, and the re-registration after
the reconnect learns it afresh. Leaving sends a notice too (no ack needed:
an outdated "someone else is here" costs a publish, never a message).

A message whose rooms are all known to be held by this process alone
never goes to Redis (``only_here``).
"""
import asyncio

from server import fastjson

# Pub/sub items between processes about room holders (not client events).
HOLDER_NOTICE = '__postbox_holder'
HOLDER_ACK = '__postbox_holder_ack'


class Acks:
    """The acks a process waits for after entering a room: one from each
    other live holder of it."""

    def __init__(self):
        self.acked = set()
        self.needed = None  # known once the holder script has answered
        self.done = asyncio.Event()

    def ack(self, host):
        self.acked.add(host)
        self._check()

    def _check(self):
        if self.needed is not None and self.needed <= self.acked:
            self.done.set()

    async def wait(self, needed, timeout):
        self.needed = set(needed)
        self._check()
        async with asyncio.timeout(timeout):
            await self.done.wait()


class Holders:
    """(namespace, room) -> the other processes holding it, for rooms this
    process holds and has registered since its listener last subscribed;
    notices heard before that registration answered wait in ``_noticed``.
    ``holds(namespace, room)`` says whether this process holds a room;
    ``send_ack(host, item)`` queues an ack for another process."""

    def __init__(self, host_id, holds, send_ack):
        self.host_id = host_id
        self.holds = holds
        self.send_ack = send_ack
        self._known = {}
        self._noticed = {}
        self._acks = {}  # nonce -> Acks
        self._nonce = 0

    def only_here(self, namespace, room) -> bool:
        """True if this process holds ``room`` and knows that no other
        process does."""
        holders = self._known.get((namespace, room))
        return holders is not None and not holders

    def forget(self, key=None):
        """Forget one (namespace, room) (left), or everything (notices
        may have been missed)."""
        if key is None:
            self._known.clear()
            self._noticed.clear()
        else:
            self._known.pop(key, None)
            self._noticed.pop(key, None)

    def expect_acks(self):
        """A fresh nonce and the Acks that will collect its answers."""
        self._nonce += 1
        nonce = f'{self.host_id}:{self._nonce}'
        self._acks[nonce] = acks = Acks()
        return nonce, acks

    def done(self, nonce):
        self._acks.pop(nonce, None)

    def notice(self, namespace, room, joined, nonce='') -> str:
        """The notice of entering (``joined``) or leaving a room; an
        empty nonce asks for no ack."""
        return fastjson.dumps([{
            'method': HOLDER_NOTICE, 'namespace': namespace, 'room': room,
            'joined': joined, 'host': self.host_id, 'nonce': nonce}])

    def learn(self, namespace, room, others, current) -> list:
        """Record what entering ``room`` found: the other live holders
        (plus any that announced themselves meanwhile), if ``current``
        (this process's listener has stayed subscribed since the script
        went out, else a notice could have been missed) and this process
        still holds it. Returns the others as strings."""
        others = [h.decode() if isinstance(h, bytes) else h for h in others]
        key = (namespace, room)
        heard = self._noticed.pop(key, set())
        if current and self.holds(namespace, room):
            self._known[key] = frozenset(others) | heard
        return others

    def on_item(self, item) -> bool:
        """Handle a holder notice or ack from another process; False if
        ``item`` is neither."""
        method = item.get('method') if isinstance(item, dict) else None
        if method == HOLDER_ACK:
            acks = self._acks.get(item.get('nonce'))
            if acks is not None:
                acks.ack(item.get('host'))
            return True
        if method != HOLDER_NOTICE:
            return False
        key, host = (item['namespace'], item['room']), item['host']
        known = self._known.get(key)
        if item['joined']:
            if known is not None:
                self._known[key] = known | {host}
            elif self.holds(*key):
                self._noticed.setdefault(key, set()).add(host)
            if item['nonce']:
                self.send_ack(host, [{'method': HOLDER_ACK,
                                      'nonce': item['nonce'],
                                      'host': self.host_id}])
        else:
            if known is not None:
                self._known[key] = known - {host}
            self._noticed.get(key, set()).discard(host)
        return True
