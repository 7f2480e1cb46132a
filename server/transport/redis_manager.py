"""Socket.IO client manager that spreads emits across processes through
Redis, publishing only to the processes that hold a recipient.

python-socketio's stock ``AsyncRedisManager`` publishes every emit on one
channel that every process decodes, opens a new pooled connection whenever
one is busy (thousands under load), and awaits each publish inline with no
bound on what piles up while Redis is slow. This manager instead:

- delivers to local sockets at once, then hands the message to a single
  sender task through a bounded queue; the sender pipelines whatever is
  queued over one connection (a full queue drops and counts: clients that
  follow ``sync`` still get every stored message);
- keeps, for every Socket.IO room entered on this process (``user:<id>``,
  ``room:<id>``), this process's id in a Redis set
  ``<channel>:room:<namespace>:<room>``;
  a Lua script looks up the target rooms' sets and publishes to the channels
  of the live processes in them only;
- remembers, for each room it holds, which other processes hold it too, so
  a message whose recipients are all local never goes to Redis at all (see
  "Holders" below);
- proves each process alive with a key that expires (``<channel>:alive:<id>``)
  refreshed by a heartbeat, so a crashed process is dropped from the sets by
  itself and nobody publishes to it for long;
- reconnects its listener by itself and re-registers its rooms whenever it
  (re)connects or finds its liveness key gone (Redis restarted empty);
- publishes a probe to itself every ``probe_interval`` and expects it back
  on its own subscription: a listener that stays connected but hears
  nothing (python-socketio issue #1581) is counted (``deaf``), dropped and
  re-created, and readiness fails until a probe comes back;
- returns every connection to its pool on every failure path (pipelines
  are context managers: redis-py keeps a pipeline's connection when
  loading its scripts fails, and a crash under load used to leak the whole
  pool), and, while Redis is known to be unreachable, lets the callers
  that have a local fallback (room sets, presence, limits) skip it at once
  instead of each waiting for a timeout; they are registered again when
  Redis answers.

Holders: a process that enters a room for the first time adds itself to the
room's set and, in the same script, tells every other live process in it
(a notice on their host channels); each of them adds it to what it knows
and acks. ``enter_room`` returns only once all have acked (or after
``join_timeout``), so by the time a client is told it is connected, no
other process still believes it is alone in that room: a message stored
after that reaches it live, and one stored before is in the client's
``sync``. What a process knows counts only while its listener stays
subscribed: losing it forgets everything, and the re-registration after
the reconnect learns it afresh. Leaving sends a notice too (no ack needed:
an outdated "someone else is here" costs a publish, never a message).

URLs: ``redis://``, ``rediss://`` (TLS), ``unix://`` and ``redis+sentinel://``
with the same syntax python-socketio accepts, and ``redis+cluster://`` (or
``rediss+cluster://``) for a Redis Cluster: ``host:port`` of one or more
nodes separated by commas, ``redis+cluster://[:password@]h1:p1,h2:p2``.

On a Redis Cluster (see "Redis Cluster" in docs/operations.md):

- every key carries the hash tag ``{<channel>}`` (``{postbox}:room:...``,
  ``{postbox}:alive:...``, presence, connection counts, throttles): one
  slot, so each Lua script and multi-key command stays valid. That shard
  holds the small shared state; the message traffic is what spreads;
- messages travel by sharded pub/sub: each process SSUBSCRIBEs to its
  own host channel ``<channel>:host:<id>`` and to ``<channel>`` (the
  broadcast), each on the primary that owns the channel's slot, over plain
  connections (one per primary involved; redis-py's cluster client has
  no usable asyncio sharded listener for this); a lost connection or a
  slot that moved (Redis then sends ``sunsubscribe``) re-reads the slot
  map and subscribes again;
- a script cannot publish to a channel of another slot, so the routing
  and holder scripts return what to send and the sender SPUBLISHes it
  (one pipeline, which redis-py splits by node).
"""
import asyncio
import logging
import time
from urllib.parse import urlparse

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.asyncio.cluster import ClusterNode, RedisCluster
from socketio.async_pubsub_manager import AsyncPubSubManager
from socketio.async_manager import AsyncManager
from socketio.redis_manager import parse_redis_sentinel_url

from server.upstream.socketio_manager import local_emit

log = logging.getLogger(__name__)

# Not a client event: a published "disconnect these sockets" order.
DISCONNECT_EVENT = '__postbox_disconnect_room'

# Not a client event: a published notice for every process's ``on_notice``
# (a group's members changed: forget it, drop the leavers' sockets).
NOTICE_EVENT = '__postbox_notice'

# Pub/sub items between processes about room holders (not client events).
HOLDER_NOTICE = '__postbox_holder'
HOLDER_ACK = '__postbox_holder_ack'
# A process's probe to itself, proving its subscription hears.
PROBE = '__postbox_probe'

# Enter (ARGV[4] = "1") or leave (ARGV[4] = "") one room set (KEYS[1]) and
# send ARGV[5], a notice, to every other live process in it (unless it is
# empty: on a cluster the caller sends it); dead ones are dropped from the
# set on the way. Returns those other processes. ARGV[1..3] as in
# PUBLISH_SCRIPT.
HOLDER_SCRIPT = """
local me, chan, alive_prefix = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[1], me)
else
  redis.call('SREM', KEYS[1], me)
end
local others = {}
for _, host in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if host ~= me then
    if redis.call('EXISTS', alive_prefix .. host) == 1 then
      table.insert(others, host)
      if ARGV[5] ~= '' then
        redis.call('PUBLISH', chan .. host, ARGV[5])
      end
    else
      redis.call('SREM', KEYS[1], host)
    end
  end
end
return others
"""

# One call carries a whole batch of messages, in few arguments (redis-py
# encodes each argument in Python: one per message cost about 15 us per
# message). KEYS: the distinct room sets the batch targets. ARGV: own id,
# host channel prefix, liveness key prefix, an index with one
# "<payload bytes>:<key number>,<key number>..." entry per message separated
# by ";", and every message's JSON payload concatenated. Each room set is
# read once per batch. Each live process found in a message's sets (never
# ourselves) gets that message once; all messages for one process go out as
# one JSON list in one PUBLISH, so a busy receiver decodes one pub/sub
# message per batch, not one per emit. Dead processes are dropped from the
# sets on the way. With ARGV[6] = "1" (a cluster, where a script cannot
# publish to another slot's channel) nothing is published and the payloads
# are not needed (ARGV[5] may be empty): the script returns host, "<message
# numbers, 1-based, comma separated>", host, ... for the caller to build
# and SPUBLISH the batches.
PUBLISH_SCRIPT = """
local me, chan, alive_prefix = ARGV[1], ARGV[2], ARGV[3]
local index, blob = ARGV[4], ARGV[5]
local alive, holders, out, hosts = {}, {}, {}, {}
local function live_hosts(j)
  local list = holders[j]
  if list ~= nil then
    return list
  end
  list = {}
  local key = KEYS[j]
  for _, host in ipairs(redis.call('SMEMBERS', key)) do
    if host ~= me then
      local live = alive[host]
      if live == nil then
        live = redis.call('EXISTS', alive_prefix .. host) == 1
        alive[host] = live
      end
      if live then
        table.insert(list, host)
      else
        redis.call('SREM', key, host)
      end
    end
  end
  holders[j] = list
  return list
end
local routes_only = ARGV[6] == '1'
local pos, n = 1, 0
for size, keylist in string.gmatch(index, '(%d+):([%d,]+)') do
  n = n + 1
  local payload = n
  if not routes_only then
    size = tonumber(size)
    payload = string.sub(blob, pos, pos + size - 1)
    pos = pos + size
  end
  local sent = {}
  for j in string.gmatch(keylist, '%d+') do
    for _, host in ipairs(live_hosts(tonumber(j))) do
      if not sent[host] then
        sent[host] = true
        if out[host] == nil then
          out[host] = {}
          table.insert(hosts, host)
        end
        table.insert(out[host], payload)
      end
    end
  end
end
local routes = {}
for _, host in ipairs(hosts) do
  if routes_only then
    table.insert(routes, host)
    table.insert(routes, table.concat(out[host], ','))
  else
    local batch = '[' .. table.concat(out[host], ',') .. ']'
    redis.call('PUBLISH', chan .. host, batch)
  end
end
if routes_only then
  return routes
end
return #hosts
"""


def script_arguments(messages):
    """KEYS and the index and payload ARGV of PUBLISH_SCRIPT for
    ``messages``, a list of (room set keys, JSON payload)."""
    keys, numbers, index, payloads = [], {}, [], []
    for targets, payload in messages:
        data = payload.encode() if isinstance(payload, str) else payload
        mine = []
        for key in targets:
            if key not in numbers:
                keys.append(key)
                numbers[key] = len(keys)
            mine.append(str(numbers[key]))
        index.append(f'{len(data)}:{",".join(mine)}')
        payloads.append(data)
    return keys, [';'.join(index), b''.join(payloads)]


class _Acks:
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


class RedisNotReady(Exception):
    """Raised by ``RedisManager.ready`` with the reason."""


class RedisManager(AsyncPubSubManager):
    """Client manager for ``socketio.AsyncServer(client_manager=...)``.

    Counters for metrics: ``published`` (messages handed to Redis),
    ``publish_failures`` (messages dropped: Redis down or queue full),
    ``listen_failures`` (listener connections lost), ``deaf`` (listeners
    re-created because their own probe did not come back). ``listening``
    is True while the pub/sub listener is subscribed."""

    name = 'postbox-redis'

    def __init__(self, url, channel='postbox', *, max_connections=4,
                 queue_max=10000, heartbeat=5.0, socket_timeout=5.0,
                 retry_max=2.0, join_timeout=2.0, probe_interval=1.0,
                 probe_timeout=3.0):
        super().__init__(channel=channel)
        self.url = url
        self.heartbeat = heartbeat
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.retry_max = retry_max
        self.join_timeout = join_timeout
        self.socket_timeout = socket_timeout
        self.queue_max = queue_max
        self.cluster = is_cluster_url(url)
        # Every key's prefix: on a cluster a hash tag, so that all of them
        # (and so every script's keys) are in one slot.
        self.key_prefix = f'{{{channel}}}' if self.cluster else channel
        self.host_channel_prefix = f'{channel}:host:'
        self.alive_prefix = f'{self.key_prefix}:alive:'
        self.host_channel = self.host_channel_prefix + self.host_id
        self.alive_key = self.alive_prefix + self.host_id
        options = dict(socket_connect_timeout=socket_timeout,
                       socket_keepalive=True)
        # Commands (publish, room sets, heartbeat) share a small bounded
        # pool: the sender task needs one connection, the rest is for the
        # occasional room change. The listener gets its own client without
        # a read timeout, since a quiet channel is not an error.
        self.redis = _client(url, channel, max_connections=max_connections,
                             socket_timeout=socket_timeout, **options)
        # On a cluster the listener opens its own plain connections to the
        # nodes that own its channels (_ShardedSubscription).
        self._sub_options = options
        self._sub_redis = None if self.cluster else \
            _client(url, channel, max_connections=2, **options)
        self._script = self.redis.register_script(PUBLISH_SCRIPT)
        self._holder_script = self.redis.register_script(HOLDER_SCRIPT)
        # (namespace, room) -> the other processes holding it, for rooms
        # this process holds and has registered since its listener last
        # subscribed (see "Holders"); notices heard before that
        # registration answered wait in _noticed.
        self._holders = {}
        self._noticed = {}
        self._acks = {}  # nonce -> _Acks
        self._nonce = 0
        self._generation = 0  # bumped whenever the listener (re)subscribes
        self._subscribed = False  # or loses its subscription
        self._queue = asyncio.Queue(queue_max)
        self._register_lock = asyncio.Lock()
        self._tasks = []
        self._down_since = None
        self._unreachable_since = None  # a Redis command failed
        self._need_register = False  # something skipped Redis meanwhile
        self._last_log = 0.0
        # Probes sent and not yet heard back (number -> loop time sent),
        # whether one came back since the listener last subscribed, and
        # why the listener was last found deaf (until a probe is heard).
        self._probes = {}
        self._probe_n = 0
        self._heard = False
        self._deaf_reason = None
        self._probe_wake = asyncio.Event()
        self.on_register = []  # async callables run after a re-registration
        self.on_notice = None  # callable(data) for notify_all notices
        self.listening = False
        self.published = 0
        self.publish_failures = 0
        self.listen_failures = 0
        self.deaf = 0

    # -- life cycle ----------------------------------------------------

    def initialize(self):
        """Called by the server before its first request. The background
        tasks are started by ``start()`` instead, with the app, so that
        readiness does not wait for a first client."""
        AsyncManager.initialize(self)

    async def start(self):
        """Start the listener, the sender, the heartbeat and the probe
        (``thread`` is the listener's task; a deaf one is replaced)."""
        self.thread = asyncio.create_task(self._thread())
        self._tasks = [asyncio.create_task(self._send_loop()),
                       asyncio.create_task(self._heartbeat_loop()),
                       asyncio.create_task(self._probe_loop())]

    async def close(self):
        """Stop the tasks and withdraw this process from Redis (telling
        the other holders of its rooms), so other processes stop
        publishing to it at once."""
        # The probe first: it may replace the listener's task.
        for task in [*self._tasks[::-1], getattr(self, 'thread', None)]:
            if task is None:
                continue
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            async with asyncio.timeout(2):
                rooms = list(self._local_rooms())
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.delete(self.alive_key)
                    await self._holder_calls(pipe, rooms, False)
                    found = (await pipe.execute())[1:]
                await self._send_notices(rooms, found, False)
        except Exception as exc:
            log.info('could not withdraw from redis: %s', exc)
        for client in (self.redis, self._sub_redis):
            try:
                if client is not None:
                    await client.aclose()
            except Exception:
                pass

    async def ready(self) -> bool:
        """True if the listener is subscribed, hears its own probes and
        Redis answers; else raises RedisNotReady saying why."""
        if not self.listening:
            raise RedisNotReady(self._deaf_reason or
                                'listener not subscribed to redis')
        if not self.reachable:
            raise RedisNotReady(
                f'redis commands failing for '
                f'{time.monotonic() - self._unreachable_since:.1f}s '
                f'(local fallbacks in use)')
        overdue = self._probe_overdue()
        if overdue:
            raise RedisNotReady(f'listener deaf: own probe not back after '
                                f'{overdue:.1f}s')
        if not self._heard:
            raise RedisNotReady(self._deaf_reason or
                                'listener subscribed, own probe not back yet')
        try:
            async with asyncio.timeout(2):
                if self.cluster:
                    # The shard that holds every shared key (the ones
                    # holding our channels are proven by the probe).
                    await self.redis.exists(self.alive_key)
                else:
                    await self.redis.ping()
        except Exception as exc:
            raise RedisNotReady(f'redis does not answer: '
                                f'{exc or type(exc).__name__}') from None
        return True

    @property
    def reachable(self) -> bool:
        """False from a failed Redis command until one succeeds again.
        Callers with a local fallback (presence, connection counts, login
        throttle) then use it at once instead of each waiting up to a
        timeout for a Redis that hangs; they call ``skipped()`` when
        Redis must learn something later."""
        return self._unreachable_since is None

    def skipped(self):
        """Something was kept from Redis while it was unreachable:
        register everything again (rooms, host, hooks) once it answers."""
        self._need_register = True

    def trouble(self, what, exc):
        """A Redis call of a caller with a local fallback failed: mark
        Redis unreachable and log it (rate limited, like ours)."""
        self._failed('%s: redis unavailable (%s)', what, exc)

    # -- emitting ------------------------------------------------------

    async def emit(self, event, data, namespace=None, room=None,
                   skip_sid=None, callback=None, to=None, **kwargs):
        """Deliver to this process's sockets now; queue the message for
        the processes that hold the other recipients."""
        room = to or room
        namespace = namespace or '/'
        if kwargs.get('ignore_queue') or callback is not None or \
                self.server.packet_class.data_is_binary([data]):
            # Rare paths (acks across processes, binary payloads): the
            # stock broadcast handling, published through our queue.
            return await super().emit(event, data, namespace=namespace,
                                      room=room, skip_sid=skip_sid,
                                      callback=callback, **kwargs)
        await local_emit(self, event, data, namespace, room, skip_sid)
        if room is None:
            keys = self.channel  # everyone: every process
        else:
            rooms = room if isinstance(room, list) else [room]
            # A sid of this process is a room no other process has.
            keys = [self._room_key(namespace, r) for r in rooms
                    if not self.is_sid_room(namespace, r)
                    and not self._only_here(namespace, r)]
            if not keys:
                return  # every recipient is local
        message = {'method': 'emit', 'event': event,
                   'data': list(data) if isinstance(data, tuple) else [data],
                   'binary': False, 'namespace': namespace, 'room': room,
                   'skip_sid': skip_sid, 'callback': None,
                   'host_id': self.host_id}
        self._enqueue(keys, message)

    def _only_here(self, namespace, room):
        """True if this process holds ``room`` and knows that no other
        process does."""
        holders = self._holders.get((namespace, room))
        return holders is not None and not holders

    async def disconnect_room(self, room, namespace='/'):
        """Disconnect every socket in ``room`` on every process (a user's
        sockets after logout-everywhere). Travels as an emit of an internal
        event that ``_handle_emit`` turns into disconnects."""
        await self._disconnect_local(room, namespace)
        self._enqueue(self.channel, {
            'method': 'emit', 'event': DISCONNECT_EVENT, 'data': [None],
            'binary': False, 'namespace': namespace, 'room': room,
            'skip_sid': None, 'callback': None, 'host_id': self.host_id})

    async def notify_all(self, data):
        """Hand ``data`` (JSON-able) to ``on_notice`` on every other
        process, through the publish queue (in order with the emits queued
        before and after it)."""
        self._enqueue(self.channel, {
            'method': 'emit', 'event': NOTICE_EVENT, 'data': [data],
            'binary': False, 'namespace': '/', 'room': None,
            'skip_sid': None, 'callback': None, 'host_id': self.host_id})

    async def _disconnect_local(self, room, namespace):
        for sid, _ in list(self.get_participants(namespace, room)):
            await self.server.disconnect(sid, namespace=namespace,
                                         ignore_queue=True)

    async def _handle_emit(self, message):
        """An emit from another process: deliver it to our sockets with
        ``local_emit`` (no task per recipient), like our own emits."""
        if message.get('event') == DISCONNECT_EVENT:
            return await self._disconnect_local(
                message['room'], message.get('namespace') or '/')
        if message.get('event') == NOTICE_EVENT:
            if self.on_notice is not None:
                self.on_notice(message['data'][0])
            return
        if message.get('callback') is not None or message.get('binary'):
            return await super()._handle_emit(message)
        data = message['data']
        data = data[0] if len(data) == 1 else tuple(data)
        await local_emit(self, message['event'], data,
                         message.get('namespace') or '/',
                         message.get('room'), message.get('skip_sid'))

    async def _publish(self, data):
        """Used by the base class for disconnects, callbacks and binary
        emits: every process gets them."""
        self._enqueue(self.channel, data)

    def _enqueue(self, targets, message):
        """Queue ``message`` for the sender: ``targets`` is a channel to
        publish on, or the room set keys for the routing script."""
        try:
            self._queue.put_nowait((targets, self.json.dumps(message)))
        except asyncio.QueueFull:
            self.publish_failures += 1
            self._trouble('publish queue full (%s): dropping', self.queue_max)

    async def _send_loop(self):
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 512:
                batch.append(self._queue.get_nowait())
            try:
                # The context manager resets the pipeline, giving its
                # connection back, however execute() fails: redis-py does
                # not when loading the scripts fails (its SCRIPT EXISTS
                # runs before the try/finally that resets).
                if self.cluster:
                    await self._send_sharded(batch)
                else:
                    async with self.redis.pipeline(
                            transaction=False) as pipe:
                        routed = []
                        for targets, payload in batch:
                            if isinstance(targets, str):
                                pipe.publish(targets, payload)
                            else:
                                routed.append((targets, payload))
                        if routed:
                            keys, args = script_arguments(routed)
                            await self._script(
                                keys=keys, client=pipe,
                                args=[self.host_id, self.host_channel_prefix,
                                      self.alive_prefix, *args])
                        await pipe.execute()
                self.published += len(batch)
                self._recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.publish_failures += len(batch)
                self._failed('redis publish failed, %s messages not sent '
                             'to other processes: %s', len(batch), exc)

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
                keys=keys, args=[self.host_id, self.host_channel_prefix,
                                 self.alive_prefix, index, '', '1'])
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
                sends.append((self.host_channel_prefix + host,
                              b'[' + batch + b']'))
        await self._spublish(sends)

    async def _spublish(self, sends):
        """SPUBLISH each (channel, payload) of ``sends``."""
        if not sends:
            return
        if len(sends) == 1:
            await self.redis.execute_command('SPUBLISH', *sends[0])
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, payload in sends:
                pipe.execute_command('SPUBLISH', channel, payload)
            await pipe.execute()

    async def _holder_calls(self, pipe, rooms, joined):
        """Queue HOLDER_SCRIPT on ``pipe`` for each (namespace, room) of
        ``rooms``, with no ack asked. On a cluster by EVAL: redis-py's
        cluster pipeline does not load scripts; the notices are sent by
        ``_send_notices`` with what the pipeline returns."""
        for namespace, room in rooms:
            key = self._room_key(namespace, room)
            args = self._holder_args(namespace, room, joined)
            if self.cluster:
                pipe.eval(HOLDER_SCRIPT, 1, key, *args[:4], '')
            else:
                await self._holder_script(keys=[key], client=pipe, args=args)

    async def _send_notices(self, rooms, found, joined, nonce=''):
        """On a cluster: send each room's holder notice to the other
        processes HOLDER_SCRIPT found in it (in-script on one Redis)."""
        if not self.cluster:
            return
        sends = []
        for (namespace, room), others in zip(rooms, found):
            if not others:
                continue
            notice = self._holder_args(namespace, room, joined, nonce)[4]
            for host in others:
                host = host.decode() if isinstance(host, bytes) else host
                sends.append((self.host_channel_prefix + host, notice))
        await self._spublish(sends)

    # -- rooms ---------------------------------------------------------

    def _room_key(self, namespace, room):
        return f'{self.key_prefix}:room:{namespace}:{room}'

    def _local_rooms(self):
        for namespace, rooms in list(self.rooms.items()):
            for room in list(rooms):
                if room is not None and \
                        not self.is_sid_room(namespace, room):
                    yield namespace, room

    async def enter_room(self, sid, namespace, room, eio_sid=None):
        """Enter locally; the first local member registers this process
        in the room's set, and waits for the other holders to know it,
        before the caller goes on: a message sent right after reaches it."""
        namespace = namespace or '/'
        new = room not in self.rooms.get(namespace, {})
        await super().enter_room(sid, namespace, room, eio_sid=eio_sid)
        if new and room != sid and room in self.rooms.get(namespace, {}):
            await self._sync_room(namespace, room)

    def basic_leave_room(self, sid, namespace, room):
        super().basic_leave_room(sid, namespace, room)
        if room is not None and room != sid and \
                room not in self.rooms.get(namespace, {}):
            self._holders.pop((namespace, room), None)
            self._noticed.pop((namespace, room), None)
            asyncio.get_running_loop().create_task(
                self._sync_room(namespace, room))

    async def _sync_room(self, namespace, room):
        """Make Redis agree with the local state of one room. Decided
        under the lock, at the time the command goes out, so a leave and
        a re-enter racing each other end in the right state. After an
        enter, wait (outside the lock) for the other holders' acks."""
        nonce = ''
        try:
            async with self._register_lock:
                if not self._subscribed or not self.reachable:
                    # No ack could reach us, and Redis may not answer: the
                    # registration after the listener resubscribes (or
                    # after Redis answers again) covers this room.
                    self.skipped()
                    return
                joined = room in self.rooms.get(namespace, {})
                generation = self._generation
                if joined:
                    nonce, acks = self._expect_acks()
                try:
                    args = self._holder_args(namespace, room, joined, nonce)
                    if self.cluster:
                        args[4] = ''  # sent below, from here
                    others = await self._holder_script(
                        keys=[self._room_key(namespace, room)], args=args)
                    await self._send_notices([(namespace, room)], [others],
                                             joined, nonce)
                except Exception as exc:
                    # Everything is registered again once Redis answers.
                    self.skipped()
                    self._failed('redis room update failed: %s', exc)
                    return
            if not joined:
                return
            others = self._learn(namespace, room, others, generation)
            await acks.wait(others, self.join_timeout)
        except TimeoutError:
            log.warning('entered %s: no ack from %s of %s processes in %.1fs',
                        room, len(set(others) - acks.acked), len(others),
                        self.join_timeout)
        finally:
            self._acks.pop(nonce, None)

    def _expect_acks(self):
        self._nonce += 1
        nonce = f'{self.host_id}:{self._nonce}'
        self._acks[nonce] = acks = _Acks()
        return nonce, acks

    def _holder_args(self, namespace, room, joined, nonce=''):
        """ARGV of HOLDER_SCRIPT; an empty nonce asks for no ack."""
        notice = self.json.dumps([{
            'method': HOLDER_NOTICE, 'namespace': namespace, 'room': room,
            'joined': joined, 'host': self.host_id, 'nonce': nonce}])
        return [self.host_id, self.host_channel_prefix, self.alive_prefix,
                '1' if joined else '', notice]

    def _learn(self, namespace, room, others, generation):
        """Record what entering ``room`` found: the other live holders
        (plus any that announced themselves meanwhile), if this process
        still holds it and its listener has stayed subscribed since the
        script went out (else a notice could have been missed).
        Returns the others as strings."""
        others = [h.decode() if isinstance(h, bytes) else h for h in others]
        key = (namespace, room)
        heard = self._noticed.pop(key, set())
        if generation == self._generation and \
                room in self.rooms.get(namespace, {}):
            self._holders[key] = frozenset(others) | heard
        return others

    def _on_holder_item(self, item) -> bool:
        """Handle a holder notice or ack from another process, or our own
        probe; False if ``item`` is none of them."""
        method = item.get('method') if isinstance(item, dict) else None
        if method == PROBE:
            if item.get('host') == self.host_id:
                self._probe_heard(item.get('n'))
            return True
        if method == HOLDER_ACK:
            acks = self._acks.get(item.get('nonce'))
            if acks is not None:
                acks.ack(item.get('host'))
            return True
        if method != HOLDER_NOTICE:
            return False
        key, host = (item['namespace'], item['room']), item['host']
        known = self._holders.get(key)
        if item['joined']:
            if known is not None:
                self._holders[key] = known | {host}
            elif item['room'] in self.rooms.get(item['namespace'], {}):
                self._noticed.setdefault(key, set()).add(host)
            if item['nonce']:
                self._enqueue(self.host_channel_prefix + host, [{
                    'method': HOLDER_ACK, 'nonce': item['nonce'],
                    'host': self.host_id}])
        else:
            if known is not None:
                self._holders[key] = known - {host}
            self._noticed.get(key, set()).discard(host)
        return True

    async def _register_all(self):
        """Announce this process alive and in every room it holds, and
        learn who else holds them."""
        async with self._register_lock:
            self._need_register = False  # a skip from now on sets it again
            generation = self._generation if self._subscribed else None
            rooms = list(self._local_rooms())
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.alive_key, 1, ex=self._ttl)
                    await self._holder_calls(pipe, rooms, True)
                    found = (await pipe.execute())[1:]
                await self._send_notices(rooms, found, True)
            except BaseException:
                self._need_register = True
                raise
            for (namespace, room), others in zip(rooms, found):
                self._learn(namespace, room, others, generation)
        try:
            for hook in self.on_register:
                await hook()
        except BaseException:
            self._need_register = True
            raise

    @property
    def _ttl(self):
        return max(1, int(self.heartbeat * 3))

    async def _heartbeat_loop(self):
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                # NX: the key is missing only if Redis lost it (restart,
                # or we were away past the TTL): then register everything.
                if await self.redis.set(self.alive_key, 1, ex=self._ttl,
                                        nx=True):
                    log.info('redis lost our registration: registering again')
                    await self._register_all()
                else:
                    await self.redis.expire(self.alive_key, self._ttl)
                    await self._register_if_skipped()
                self._recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed('redis heartbeat failed: %s', exc)

    async def _register_if_skipped(self):
        """Redis answered: if anything skipped it meanwhile (and the
        listener is subscribed, else its own registration comes), register
        everything again."""
        if self._need_register and self._subscribed:
            self._unreachable_since = None  # let the hooks use Redis
            await self._register_all()

    # -- probing the listener ------------------------------------------

    async def _probe_loop(self):
        """Every ``probe_interval`` (and at once after each subscription)
        publish a probe to our own channel; if the oldest probe not heard
        back is older than ``probe_timeout``, the listener is deaf."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                async with asyncio.timeout(self.probe_interval):
                    await self._probe_wake.wait()
            except TimeoutError:
                pass
            self._probe_wake.clear()
            # A loop that could not run on time did not let the listener
            # run either: judge next round, not now.
            stalled = loop.time() - started - self.probe_interval > \
                self.probe_timeout / 2
            if not self.listening:
                continue
            overdue = self._probe_overdue()
            if overdue and not stalled:
                await self._deaf(overdue)
                continue
            await self._send_probe(loop)

    async def _send_probe(self, loop):
        self._probe_n += 1
        n = self._probe_n
        # Counted from before the publish: the probe may come back before
        # PUBLISH answers.
        self._probes[n] = loop.time()
        probe = self.json.dumps([{'method': PROBE, 'host': self.host_id,
                                  'n': n}])
        try:
            async with asyncio.timeout(self.socket_timeout):
                # Not through the send queue: a backlog there is not
                # deafness.
                if self.cluster:
                    await self._spublish([(self.host_channel, probe)])
                else:
                    await self.redis.publish(self.host_channel, probe)
            self._recovered()
            await self._register_if_skipped()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Redis trouble, not deafness: the listener is not to blame.
            self._probes.pop(n, None)
            self._failed('redis probe failed: %s', exc)

    def _probe_overdue(self) -> float:
        """The age of the oldest probe not heard back if that is more than
        ``probe_timeout``, else 0.0."""
        if not self._probes:
            return 0.0
        age = asyncio.get_running_loop().time() - min(self._probes.values())
        return age if age > self.probe_timeout else 0.0

    def _probe_heard(self, n):
        """Our probe ``n`` came back: so did every earlier one."""
        if not isinstance(n, int):
            return
        for k in [k for k in self._probes if k <= n]:
            del self._probes[k]
        if self._deaf_reason:
            log.warning('redis listener hears again (own probe back)')
        self._heard = True
        self._deaf_reason = None

    async def _deaf(self, waited):
        """The listener is subscribed as far as it knows but did not hear
        its own probe: count it, drop it and subscribe afresh (which
        registers every room again)."""
        self.deaf += 1
        self._deaf_reason = (f'listener deaf: own probe not back after '
                             f'{waited:.1f}s; subscription re-created, '
                             f'waiting for a probe to come back')
        log.warning('redis listener deaf: own probe not back after %.1fs; '
                    'dropping and re-creating the subscription', waited)
        old = self.thread
        old.cancel()
        try:
            async with asyncio.timeout(self.socket_timeout):
                await asyncio.gather(old, return_exceptions=True)
        except TimeoutError:
            log.warning('deaf redis listener did not stop in %.1fs',
                        self.socket_timeout)
        self.thread = asyncio.create_task(self._thread())

    # -- listening -----------------------------------------------------

    async def _listen(self):
        """Yield messages from the broadcast and host channels forever,
        reconnecting with a capped backoff."""
        delay = 0.1
        while True:
            if self.cluster:
                pubsub = _ShardedSubscription(
                    self.redis, [self.channel, self.host_channel],
                    self._sub_options)
            else:
                pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self.cluster:
                    if self.listen_failures:
                        # A shard may have moved (failover): read the slot
                        # map afresh before asking who owns our channels.
                        await self.redis.nodes_manager.initialize()
                    await pubsub.subscribe(self.socket_timeout)
                else:
                    await pubsub.subscribe(self.channel, self.host_channel)
                    if self.listen_failures:
                        await self._drop_idle_connections()
                    await self._subscription_active()
                self._resubscribed(True)
                self._unreachable_since = None  # it answered: register
                await self._register_all()
                self.listening = True
                self._probe_wake.set()  # prove it hears, now
                delay = 0.1
                self._recovered()
                async for message in pubsub.listen():
                    if message.get('type') not in ('message', 'smessage'):
                        continue
                    data = message['data']
                    if data[:1] == b'[':  # a batch on our own channel
                        for item in self.json.loads(data):
                            if not self._on_holder_item(item):
                                yield item
                    else:
                        yield data
                raise ConnectionError('subscription ended')
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listen_failures += 1
                self._failed('redis listener lost (%s), reconnecting in '
                             '%.1fs', exc, delay)
            finally:
                self.listening = False
                self._resubscribed(False)
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _drop_idle_connections(self):
        """Close the command pool's idle connections after the listener
        lost Redis: they may be sockets to a Redis that restarted since,
        and each would fail the first command that takes it."""
        try:
            await self.redis.connection_pool.disconnect(
                inuse_connections=False)
        except Exception as exc:
            log.debug('closing idle redis connections: %s', exc)

    async def _subscription_active(self):
        """Return once Redis has processed our SUBSCRIBE (redis-py does not
        wait for it): from then on, nothing published to us is missed.
        Raises TimeoutError (the listener then reconnects) if that takes
        longer than a command may."""
        async with asyncio.timeout(self.socket_timeout):
            while True:
                found = await self.redis.pubsub_numsub(self.host_channel)
                if found and found[0][1] >= 1:
                    return
                await asyncio.sleep(0.01)

    def _resubscribed(self, subscribed):
        """The listener (re)subscribed or lost its subscription: forget
        what is known of other holders, since notices may have been
        missed; a registration answered after this learns it again."""
        self._subscribed = subscribed
        self._generation += 1
        self._holders.clear()
        self._noticed.clear()
        # Probes sent before are lost with the old subscription.
        self._probes.clear()
        self._heard = False

    # -- trouble reporting ---------------------------------------------

    def _trouble(self, msg, *args):
        # One warning when trouble starts, then at most one every 10 s, so
        # an outage does not flood the log at the message rate.
        args = tuple(str(a) or type(a).__name__
                     if isinstance(a, BaseException) else a for a in args)
        now = time.monotonic()
        if self._down_since is None or now - self._last_log >= 10:
            log.warning(msg, *args)
            self._last_log = now
        if self._down_since is None:
            self._down_since = now

    def _failed(self, msg, *args):
        """A Redis command failed: report it, and treat Redis as
        unreachable until one succeeds."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
        self._trouble(msg, *args)

    def _recovered(self):
        self._unreachable_since = None
        if self._down_since is not None:
            log.warning('redis is back after %.1fs',
                        time.monotonic() - self._down_since)
            self._down_since = None


class _ShardedSubscription:
    """SSUBSCRIBE to ``channels`` on a Redis Cluster: a plain connection to
    each primary that owns one of their slots (as the cluster client's
    slot map says), their messages merged into one ``listen()`` stream.
    That stream raises as soon as any connection fails or Redis takes a
    channel away (``sunsubscribe``: its slot moved, e.g. a failover); the
    caller then subscribes afresh with a new slot map."""

    def __init__(self, cluster, channels, options):
        self.cluster = cluster
        self.channels = channels
        self.options = options
        self._subs = []  # (client, pubsub)
        self._readers = []
        # Bounded, so a slow consumer slows the readers (as one socket
        # would) instead of piling up messages.
        self._queue = asyncio.Queue(1000)

    async def subscribe(self, timeout):
        """Subscribe everywhere; returns once every node confirmed (from
        then on nothing published to the channels is missed)."""
        await self.cluster.initialize()  # a no-op once it has a slot map
        by_node = {}
        for channel in self.channels:
            node = self.cluster.get_node_from_key(channel)
            by_node.setdefault((node.host, node.port), []).append(channel)
        async with asyncio.timeout(timeout):
            for (host, port), channels in by_node.items():
                # No retries of its own: a lost node is for the caller to
                # re-resolve, not to reconnect to for seconds.
                client = aioredis.Redis(host=host, port=port,
                                        retry=Retry(NoBackoff(), 0),
                                        **self.options)
                pubsub = client.pubsub()
                self._subs.append((client, pubsub))
                for channel in channels:  # one slot per SSUBSCRIBE
                    await pubsub.ssubscribe(channel)
                pending = set(channels)
                while pending:
                    message = await pubsub.get_message(timeout=timeout)
                    if message and message['type'] == 'ssubscribe':
                        channel = message['channel']
                        pending.discard(channel.decode()
                                        if isinstance(channel, bytes)
                                        else channel)
        self._readers = [asyncio.create_task(self._read(pubsub))
                         for _, pubsub in self._subs]

    async def _read(self, pubsub):
        try:
            async for message in pubsub.listen():
                kind = message['type']
                if kind == 'smessage':
                    await self._queue.put(message)
                elif kind == 'sunsubscribe':
                    raise ConnectionError(
                        f'shard channel {message["channel"]!r} moved')
            raise ConnectionError('subscription ended')
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._queue.put(exc)

    async def listen(self):
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self):
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for client, pubsub in self._subs:
            for closing in (pubsub, client):
                try:
                    await closing.aclose()
                except Exception:
                    pass


def is_cluster_url(url) -> bool:
    return urlparse(url).scheme in ('redis+cluster', 'rediss+cluster')


def _cluster_client(url, options):
    """A RedisCluster for ``redis+cluster://[user:password@]h1:p1,h2:p2``
    (``rediss+cluster://`` for TLS): the nodes it starts from."""
    parsed = urlparse(url)
    userinfo, _, hosts = parsed.netloc.rpartition('@')
    username, _, password = userinfo.partition(':')
    nodes = []
    for part in hosts.split(','):
        host, _, port = part.strip().rpartition(':')
        nodes.append(ClusterNode(host or part.strip(), int(port or 6379)))
    options.pop('max_connections', None)  # per node, unbounded: it raises
    # Postbox needs only the shards of the shared slot and of its
    # processes' channels: a shard down elsewhere must not stop it.
    return RedisCluster(startup_nodes=nodes, username=username or None,
                        password=password or None,
                        require_full_coverage=False,
                        ssl=parsed.scheme == 'rediss+cluster', **options)


def _client(url, channel, **options):
    """A redis.asyncio client for ``url``; Sentinel URLs go through
    python-socketio's own parser so they mean the same thing."""
    if is_cluster_url(url):
        return _cluster_client(url, options)
    if urlparse(url).scheme in ('redis+sentinel', 'valkey+sentinel'):
        sentinels, service, kwargs = parse_redis_sentinel_url(url)
        options.pop('max_connections', None)
        sentinel = aioredis.sentinel.Sentinel(sentinels, **kwargs, **options)
        return sentinel.master_for(service or channel)
    # Waiting for a free connection is bounded like a command: a pool
    # that stays empty is trouble to report, not a queue to join.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, timeout=options.get('socket_timeout') or
        options['socket_connect_timeout'], **options)
    return aioredis.Redis(connection_pool=pool)
