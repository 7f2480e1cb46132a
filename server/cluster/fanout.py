"""Socket.IO fan-out across processes through Redis, publishing only to
the processes that hold a recipient.

python-socketio's stock ``AsyncRedisManager`` publishes every emit on one
channel that every process decodes, opens a new pooled connection whenever
one is busy (thousands under load), and awaits each publish inline with no
bound on what piles up while Redis is slow. Postbox's manager
(``server/upstream/socketio_pubsub_manager.py``, a thin subclass of
python-socketio's ``AsyncPubSubManager``) hands what leaves the process to
``Fanout``, which:

- delivers to local sockets at once, then hands the message to a single
  sender task through a bounded queue; the sender pipelines whatever is
  queued over one connection (a full queue drops and counts: clients that
  follow ``sync`` still get every stored message);
- keeps, for every Socket.IO room entered on this process (``user:<id>``,
  ``room:<id>``), this process's id in a Redis set
  ``<prefix>:room:<namespace>:<room>``; a Lua script
  (``scripts.PUBLISH_SCRIPT``) looks up the target rooms' sets and
  publishes to the channels of the live processes in them only;
- remembers which other processes hold its rooms (``holders.py``), so a
  message whose recipients are all local never goes to Redis at all;
- returns every connection to its pool on every failure path (pipelines
  are context managers: redis-py keeps a pipeline's connection when
  loading its scripts fails, and a crash under load used to leak the whole
  pool).

Host identity, liveness, the listener, its probe and re-registration are
the ``Cluster``'s (``cluster.py``); ``Fanout`` registers the rooms as one of
the cluster's ``on_register`` hooks.

On a Redis Cluster a script cannot publish to a channel of another slot,
so the routing and holder scripts return what to send and the sender
SPUBLISHes it (one pipeline, which redis-py splits by node).
"""
import asyncio
import logging

from redis.exceptions import NoScriptError

from server import fastjson
from server.cluster.holders import Holders
from server.cluster.scripts import HOLDER_SCRIPT, PUBLISH_SCRIPT, \
    script_arguments
from server.tasks import cancelled

log = logging.getLogger(__name__)


class Fanout:
    """Messages to other processes of ``cluster``, and the room sets that
    say which process needs what. ``holds(namespace, room)`` says whether
    this process holds a room; ``local_rooms()`` yields the (namespace,
    room) pairs it holds (sids excluded).

    Counters for metrics: ``published`` (messages handed to Redis),
    ``publish_failures`` (messages dropped: Redis down or queue full)."""

    def __init__(self, cluster, holds, local_rooms, *, queue_max=10000,
                 join_timeout=2.0):
        self.cluster = cluster
        self.holds = holds
        self.local_rooms = local_rooms
        self.host_id = cluster.host_id
        self.queue_max = queue_max
        self.join_timeout = join_timeout
        self._script = cluster.script(PUBLISH_SCRIPT)
        self._holder_script = cluster.script(HOLDER_SCRIPT)
        self.holders = Holders(cluster.host_id, holds, self._send_ack)
        self._queue = asyncio.Queue(queue_max)
        self._sender = None
        self.published = 0
        self.publish_failures = 0
        # Rooms first: the other hooks may count on the host being known.
        cluster.on_register.insert(0, self._register_rooms)
        cluster.on_subscription.append(lambda subscribed:
                                       self.holders.forget())

    def start(self):
        self._sender = asyncio.create_task(self._send_loop())

    async def close(self):
        """Stop sending, and withdraw this process from its rooms' sets
        (telling the other holders), so other processes stop publishing
        to it at once."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        try:
            async with asyncio.timeout(2):
                rooms = list(self.local_rooms())
                if rooms:
                    async with self.cluster.redis.pipeline(
                            transaction=False) as pipe:
                        await self._holder_calls(pipe, rooms, False)
                        found = await pipe.execute()
                    await self._send_notices(rooms, found, False)
        except Exception as exc:
            log.info('could not withdraw rooms from redis: %s', exc)

    # -- sending ---------------------------------------------------------

    def to_rooms(self, namespace, rooms, message):
        """Queue ``message`` (a dict) for the processes holding any of
        ``rooms``; rooms this process alone holds are left out (and
        nothing is queued if that leaves none)."""
        keys = [self._room_key(namespace, r) for r in rooms
                if not self.holders.only_here(namespace, r)]
        if keys:
            self.enqueue(keys, message)

    def to_all(self, message):
        """Queue ``message`` for every process (the broadcast channel)."""
        self.enqueue(self.cluster.channel, message)

    def enqueue(self, targets, message):
        """Queue ``message`` for the sender: ``targets`` is a channel to
        publish on, or the room set keys for the routing script."""
        try:
            self._queue.put_nowait((targets, fastjson.dumps(message)))
        except asyncio.QueueFull:
            self.publish_failures += 1
            self.cluster.warn('publish queue full (%s): dropping',
                              self.queue_max)

    def on_item(self, item) -> bool:
        """Take holder notices and acks out of what the listener hears."""
        return self.holders.on_item(item)

    def _send_ack(self, host, item):
        self.enqueue(self.cluster.host_channel_prefix + host, item)

    async def _send_loop(self):
        cluster = self.cluster
        while not cancelled():  # not while True: see server/tasks.py
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 512:
                batch.append(self._queue.get_nowait())
            try:
                # The context manager resets the pipeline, giving its
                # connection back, however execute() fails: redis-py does
                # not when loading the scripts fails (its SCRIPT EXISTS
                # runs before the try/finally that resets).
                if cluster.is_cluster:
                    await self._send_sharded(batch)
                else:
                    await self._send_batch(batch)
                self.published += len(batch)
                cluster.recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.publish_failures += len(batch)
                cluster.failed('redis publish failed, %s messages not sent '
                               'to other processes: %s', len(batch), exc)

    async def _send_batch(self, batch):
        """A batch on one Redis, in one pipeline: messages for a known
        channel are published, the rest go through the routing script by
        its sha. Not as a redis-py Script in the pipeline: that asks
        SCRIPT EXISTS first, a round trip of its own before every batch.
        A Redis that lost its scripts (restarted) answers NOSCRIPT; the
        routed part is sent once more through the Script, which loads it."""
        routed = [(t, p) for t, p in batch if not isinstance(t, str)]
        async with self.cluster.redis.pipeline(transaction=False) as pipe:
            for targets, payload in batch:
                if isinstance(targets, str):
                    pipe.publish(targets, payload)
            if routed:
                keys, args = script_arguments(routed)
                args = [*self._script_head(), *args]
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        if routed and isinstance(results[-1], NoScriptError):
            results[-1] = await self._script(keys=keys, args=args)
        for result in results:
            if isinstance(result, Exception):
                raise result

    def _script_head(self):
        """The first ARGV of PUBLISH_SCRIPT and HOLDER_SCRIPT."""
        return [self.host_id, self.cluster.host_channel_prefix,
                self.cluster.alive_prefix]

    async def _send_sharded(self, batch):
        """A batch on a cluster: the routing script (on the shard of the
        shared keys) says which process gets what, then every message goes
        out by SPUBLISH in one pipeline (redis-py sends each to the primary
        of its channel)."""
        sends, routed = [], []
        for targets, payload in batch:
            if isinstance(targets, str):
                sends.append((targets, payload))
            else:
                routed.append((targets, payload))
        if routed:
            # The payloads stay here: the script only needs their routes.
            keys, (index, _) = script_arguments(routed)
            routes = await self._script(
                keys=keys, args=[*self._script_head(), index, '', '1'])
            payloads = [p.encode() if isinstance(p, str) else p
                        for _, p in routed]
            for i in range(0, len(routes), 2):
                host = routes[i].decode() if isinstance(routes[i], bytes) \
                    else routes[i]
                numbers = routes[i + 1]
                if isinstance(numbers, str):
                    numbers = numbers.encode()
                batch = b','.join(payloads[int(k) - 1]
                                  for k in numbers.split(b','))
                sends.append((self.cluster.host_channel_prefix + host,
                              b'[' + batch + b']'))
        await self.cluster.spublish(sends)

    # -- rooms ---------------------------------------------------------

    def _room_key(self, namespace, room):
        return self.cluster.key(f'room:{namespace}:{room}')

    async def entered(self, namespace, room):
        """This process now holds ``room``: register it in the room's
        set, and wait for the other holders to know it, before the caller
        goes on: a message sent right after reaches it."""
        await self._sync_room(namespace, room)

    def left(self, namespace, room):
        """This process no longer holds ``room``."""
        self.holders.forget((namespace, room))
        asyncio.get_running_loop().create_task(
            self._sync_room(namespace, room))

    async def _sync_room(self, namespace, room):
        """Make Redis agree with the local state of one room. Decided
        under the lock, at the time the command goes out, so a leave and
        a re-enter racing each other end in the right state. After an
        enter, wait (outside the lock) for the other holders' acks."""
        cluster = self.cluster
        nonce = ''
        try:
            async with cluster.register_lock:
                if not cluster.subscribed or not cluster.reachable:
                    # No ack could reach us, and Redis may not answer: the
                    # registration after the listener resubscribes (or
                    # after Redis answers again) covers this room.
                    cluster.skipped()
                    return
                joined = self.holds(namespace, room)
                generation = cluster.generation
                if joined:
                    nonce, acks = self.holders.expect_acks()
                try:
                    notice = '' if cluster.is_cluster else \
                        self.holders.notice(namespace, room, joined, nonce)
                    others = await self._holder_script(
                        keys=[self._room_key(namespace, room)],
                        args=[*self._script_head(), '1' if joined else '',
                              notice])
                    await self._send_notices([(namespace, room)], [others],
                                             joined, nonce)
                except Exception as exc:
                    # Everything is registered again once Redis answers.
                    cluster.skipped()
                    cluster.failed('redis room update failed: %s', exc)
                    return
            if not joined:
                return
            others = self.holders.learn(namespace, room, others,
                                        generation == cluster.generation)
            await acks.wait(others, self.join_timeout)
        except TimeoutError:
            log.warning('entered %s: no ack from %s of %s processes in %.1fs',
                        room, len(set(others) - acks.acked), len(others),
                        self.join_timeout)
        finally:
            self.holders.done(nonce)

    async def _holder_calls(self, pipe, rooms, joined):
        """Queue HOLDER_SCRIPT on ``pipe`` for each (namespace, room) of
        ``rooms``, with no ack asked. On a cluster by EVAL: redis-py's
        cluster pipeline does not load scripts; the notices are sent by
        ``_send_notices`` with what the pipeline returns."""
        flag = '1' if joined else ''
        for namespace, room in rooms:
            key = self._room_key(namespace, room)
            if self.cluster.is_cluster:
                pipe.eval(HOLDER_SCRIPT, 1, key, *self._script_head(), flag,
                          '')
            else:
                notice = self.holders.notice(namespace, room, joined)
                await self._holder_script(
                    keys=[key], client=pipe,
                    args=[*self._script_head(), flag, notice])

    async def _send_notices(self, rooms, found, joined, nonce=''):
        """On a cluster: send each room's holder notice to the other
        processes HOLDER_SCRIPT found in it (in-script on one Redis)."""
        if not self.cluster.is_cluster:
            return
        sends = []
        for (namespace, room), others in zip(rooms, found):
            if not others:
                continue
            notice = self.holders.notice(namespace, room, joined, nonce)
            for host in others:
                host = host.decode() if isinstance(host, bytes) else host
                sends.append((self.cluster.host_channel_prefix + host,
                              notice))
        await self.cluster.spublish(sends)

    async def _register_rooms(self):
        """The cluster's ``on_register`` hook (run under its lock): this
        process in every room it holds, and who else holds them."""
        cluster = self.cluster
        generation = cluster.generation if cluster.subscribed else None
        rooms = list(self.local_rooms())
        if not rooms:
            return
        async with cluster.redis.pipeline(transaction=False) as pipe:
            await self._holder_calls(pipe, rooms, True)
            found = await pipe.execute()
        await self._send_notices(rooms, found, True)
        for (namespace, room), others in zip(rooms, found):
            self.holders.learn(namespace, room, others,
                               generation == cluster.generation)
