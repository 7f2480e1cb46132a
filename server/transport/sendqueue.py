"""The send queue of an Engine.IO socket (``upstream.engineio_server.
Engine.create_queue``): what python-engineio uses of ``asyncio.Queue``,
without the memory an empty one holds."""
import asyncio
import collections


class SendQueue:
    """The part of ``asyncio.Queue`` that Engine.IO sockets use (unbounded,
    FIFO, ``task_done``/``join``), holding no deque while empty and no
    futures while nobody waits: an ``asyncio.Queue`` keeps four deques of
    about 700 bytes each for its whole life."""

    __slots__ = ('_items', '_getters', '_unfinished', '_joiners')

    def __init__(self):
        self._items = None  # a deque while anything is queued
        self._getters = None  # futures of get() callers waiting
        self._unfinished = 0
        self._joiners = None  # futures of join() callers waiting

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item):
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()

    async def put(self, item):
        self.put_nowait(item)

    def get_nowait(self):
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if not items:
            self._items = None
        return item

    async def get(self):
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = collections.deque()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                if self._getters is not None and getter in self._getters:
                    self._getters.remove(getter)
                # Woken and cancelled at once: pass the item on.
                if self._items and not getter.cancelled():
                    self._wake_getter()
                raise
        return self.get_nowait()

    def task_done(self):
        if self._unfinished <= 0:
            raise ValueError('task_done() called too many times')
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners is not None:
            joiners, self._joiners = self._joiners, None
            for joiner in joiners:
                if not joiner.done():
                    joiner.set_result(None)

    async def join(self):
        if self._unfinished > 0:
            joiner = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(joiner)
            await joiner

    def _wake_getter(self):
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break
        if not getters:
            self._getters = None
