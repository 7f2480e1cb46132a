"""The outbox: deliveries owed to the outside (bot webhooks, pushes to
offline users), written as rows in the transaction that stores the event
and sent by a dispatcher in the background.

Writing (``queue_messages``, on the writer thread inside the send's
transaction): two index probes tell whether any webhook and any push
subscription exist; if so, one query per batch finds, per room of the
batch, the bots with a webhook (led by the webhook table: a probe per
webhook) and the push subscriptions of the members who have not muted it
(a pass over the room's memberships); then one insert per chunk of rows
(not for the sender). Measured on SQLite, one message to a 1,000-member
group: 8 us with neither, 20 us with a webhook somewhere, about 320 us once
push subscriptions exist (the membership pass; a partial index of
subscribed, unmuted members would take that away).

"Offline" is decided twice. At write time a subscriber with a socket on
this process gets no row (a dict lookup, no I/O: the writer thread must not
wait on Redis). At delivery time the push sender asks again: a socket
on this process drops the row; online on another process (which may only
be the grace period after their last socket closed) makes the push wait
until the grace period of the message's time is over, then go unless they
are online still (``push.PushSender._connected``). So a push goes only to
a member connected nowhere, and a row costs one small insert per
subscriber who is not connected here.

Delivering (``Dispatcher``): every ``outbox_poll_seconds``, or at once
after a send on this process, it claims due rows (``claimed_until`` set
for ``outbox_claim_seconds`` in one UPDATE ... RETURNING; on PostgreSQL
its subquery takes ``FOR UPDATE SKIP LOCKED`` so processes never wait on
each other's rows), delivers them with at most ``outbox_concurrency`` in
flight, and deletes each row once delivered. A failure puts the row back
with ``due_at`` after an exponential backoff with full jitter; after
``outbox_dead_seconds`` it is dead-lettered (logged, counted, deleted).
A webhook row is claimable only when it is the lowest seq pending for its
(bot, room), so a bot gets each room's events in seq order even across
retries. Rows outlive the process: a SIGKILL leaves them to be claimed
again once their claim runs out.
"""
import asyncio
import json
import logging
import random

from server.data import outbox as data
from server.services.context import now_ms
from server.tasks import cancelled

log = logging.getLogger(__name__)


def connected_here(ctx, user_ids) -> set:
    """The users among ``user_ids`` with a socket on this process. Read
    from the writer thread; a socket that opens meanwhile is caught at
    delivery time."""
    presence = ctx.presence
    if presence is None:
        return set()
    return presence.connected_here(user_ids)


def queue_messages(ctx, items, now):
    """Add the outbox rows of new messages (inside the sending
    transaction). ``items``: (room id, seq, message id, sender id)."""
    webhooks, pushes = data.listening() if items else (False, False)
    if not (webhooks or pushes):
        return 0
    listeners = data.listeners(sorted({item[0] for item in items}),
                               webhooks, pushes)
    found = [(kind, target, user_id, room_id, seq, message_id)
             for room_id, seq, message_id, sender_id in items
             for kind, target, user_id in sorted(listeners.get(room_id, ()))
             if user_id != sender_id]
    if not found:
        return 0
    here = connected_here(ctx, {r[2] for r in found if r[0] == 'push'})
    rows = [(kind, target, user_id, room_id, seq, 'message', message_id,
             now, now, 0, 0)
            for kind, target, user_id, room_id, seq, message_id in found
            if not (kind == 'push' and user_id in here)]
    data.insert(rows)
    if rows:
        # Thread-safe; the dispatcher's claim queues behind this commit.
        ctx.outbox_wake()
    return len(rows)


def queue_event(ctx, room_id, seq, event, message_id=None, actor_id=None,
                bot_ids=None):
    """Add the webhook rows of one room event (inside its transaction):
    for ``message_updated`` and ``room``, the room's bots with a webhook
    but ``actor_id`` (a bot is not told of its own change); for
    ``room_left``, the bots among ``bot_ids`` (they are members no more)."""
    if bot_ids is not None and not bot_ids:
        return
    added = data.insert_webhook_event(room_id, seq, event, message_id,
                                      now_ms(), but=actor_id, bot_ids=bot_ids)
    if added:
        ctx.outbox_wake()


def queue_new_room(ctx, info, creator_id):
    """Add the webhook rows of a new dm or group (inside its
    transaction) for its bots but ``creator_id``: a 'room' event under seq
    0 (it comes before the room's first event), with the room as it was
    created kept with it, so that a bot hears of the room as it was even
    when it changes (or the bot is removed) before the delivery."""
    added = data.insert_webhook_event(info.id, 0, 'room', None, now_ms(),
                                      but=creator_id)
    if added:
        data.save_room_state(info.id, 0, json.dumps({
            'kind': info.kind, 'name': info.name, 'owner_id': info.owner_id,
            'members': list(info.member_ids),
            'created_at': info.created_at}))
        ctx.outbox_wake()


class Later:
    """A sender's outcome for a row not to try before ``due_at`` (ms),
    without counting an attempt."""
    __slots__ = ('due_at',)

    def __init__(self, due_at):
        self.due_at = due_at


class Row:
    """One claimed delivery."""
    __slots__ = ('id', 'kind', 'target', 'user_id', 'room_id', 'seq',
                 'event', 'message_id', 'created_at', 'attempts')

    def __init__(self, values):
        for name, value in zip(self.__slots__, values):
            setattr(self, name, value)


class Dispatcher:
    """Claims and delivers outbox rows in the background. ``senders``
    maps a row kind to ``async send(rows, gate) -> {row id: None |
    error | Later}`` (each request made holding the semaphore ``gate``)
    (None: done, or no longer owed: the user is connected, the webhook or
    subscription is gone; a string: retry later with that error)."""

    def __init__(self, ctx, senders, metrics=None):
        self.ctx = ctx
        self.config = ctx.config
        self.senders = senders
        self.metrics = metrics
        # Requests in flight, across every claimed batch and kind.
        self.gate = asyncio.Semaphore(ctx.config.outbox_concurrency)
        self._wake = asyncio.Event()
        self._task = None
        self._batches = set()  # delivery tasks of claimed batches
        self._busy = 0  # rows claimed and not settled yet
        self.queued = None  # rows waiting, counted when idle (metrics)

    def start(self):
        self._task = asyncio.create_task(self._run())

    def wake(self):
        self._wake.set()

    async def close(self):
        """Stop claiming and drop deliveries in flight: their rows stay
        claimed until ``outbox_claim_seconds`` pass, then are sent again
        (at least once)."""
        tasks = [t for t in (self._task, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self):
        """Claim while there is room for more rows in flight; each claimed
        batch is delivered by a task of its own, so a slow receiver holds
        up only its own rows, not the next claims."""
        config = self.config
        while not cancelled():  # not while True: see server/tasks.py
            # Cleared before the claim: a wake during it is kept.
            self._wake.clear()
            room = config.outbox_batch - self._busy
            claimed = 0
            if room > 0:
                try:
                    claimed = await self._claim_batch(room)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The database may be away: try again at the next poll.
                    log.warning('outbox: claiming failed: %s', exc)
            if claimed:
                continue
            if not self._busy:
                try:
                    self.queued = await self.pending()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass  # the claim above logged the database being away
            await self._woken_or(config.outbox_poll_seconds)

    async def _woken_or(self, seconds):
        """Wait for a wake or ``seconds``. Not ``asyncio.wait_for``: on
        Python 3.11 it swallows a cancel that comes in the same loop turn
        as the wake (a delivery finishing as ``close`` runs), and this loop
        then never ended, so the server never finished its shutdown."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _claim_batch(self, limit) -> int:
        rows = [Row(r) for r in await self.ctx.store.write(
            data.claim, now_ms(), limit,
            int(self.config.outbox_claim_seconds * 1000))]
        if rows:
            self._busy += len(rows)
            task = asyncio.create_task(self._deliver(rows))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        return len(rows)

    async def _deliver(self, rows):
        try:
            by_kind = {}
            for row in rows:
                by_kind.setdefault(row.kind, []).append(row)
            results = {}
            for outcome in await asyncio.gather(*(
                    self._send(kind, group)
                    for kind, group in by_kind.items())):
                results.update(outcome)
            await self._settle(rows, results)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left claimed: taken again once the claim runs out.
            log.exception('outbox: delivering %s rows failed', len(rows))
        finally:
            self._busy -= len(rows)
            self.wake()  # room for more, and the next of each webhook queue

    async def _send(self, kind, rows) -> dict:
        sender = self.senders.get(kind)
        if sender is None:
            return {r.id: None for r in rows}
        return await sender(rows, self.gate)

    async def _settle(self, rows, results):
        config = self.config
        now = now_ms()
        done = []
        for row in rows:
            error = results.get(row.id, 'no outcome')
            if isinstance(error, Later):
                await self.ctx.store.write(data.postpone, row.id, error.due_at)
                continue
            if error is None:
                done.append(row.id)
                if self.metrics is not None:
                    self.metrics.outbox_sent.labels(row.kind).inc()
                    self.metrics.outbox_latency.labels(row.kind).observe(
                        max(0, now - row.created_at) / 1000)
                continue
            if self.metrics is not None:
                self.metrics.outbox_failed.labels(row.kind).inc()
            if now - row.created_at >= config.outbox_dead_seconds * 1000:
                log.warning('outbox: %s %s for room %s seq %s dead after '
                            '%s attempts: %s', row.kind, row.target,
                            row.room_id, row.seq, row.attempts + 1, error)
                if self.metrics is not None:
                    self.metrics.outbox_dead.labels(row.kind).inc()
                done.append(row.id)
                continue
            await self.ctx.store.write(data.retry_later, row.id,
                                       now + self.backoff_ms(row.attempts),
                                       error)
        if done:
            await self.ctx.store.write(data.done, done)

    def backoff_ms(self, attempts) -> int:
        """Exponential backoff with full jitter: a random wait up to
        base * 2**attempts, capped, so receivers coming back are not hit
        by every retry at once."""
        config = self.config
        ceiling = min(config.outbox_retry_max_seconds,
                      config.outbox_retry_base_seconds * 2 ** min(attempts,
                                                                   30))
        return int(1000 * random.uniform(ceiling / 2, ceiling))

    async def pending(self) -> int:
        return await self.ctx.store.read(data.pending)


async def bounded(gate, calls, timeout=None):
    """Run the coroutine functions ``calls``, each holding the semaphore
    ``gate`` (the dispatcher's bound on requests in flight); their
    results in order. One call failing in any way (a bad key, a host name
    that does not encode, more than ``timeout`` seconds) is that call's
    error to retry with, never the batch's: a batch that raised would stay
    claimed, and be sent again whole once the claim ran out."""
    async def one(call):
        async with gate:
            try:
                async with asyncio.timeout(timeout):  # see _woken_or
                    return await call()
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                return f'no answer within {timeout} s'
            except Exception as exc:
                log.warning('outbox: a delivery failed: %r', exc)
                return f'{type(exc).__name__}: {exc}'[:300]

    return await asyncio.gather(*(one(c) for c in calls))
