"""The bot: a Postbox client that never misses or repeats an event.

A :class:`Bot` logs in (username and password, or a bot token from
``POST /api/bots``), connects, and keeps itself connected with exponential
backoff. It remembers the last ``seq`` it handled in every room. On a
reconnect it first asks the server to recover its session (the connection
state recovery handshake: ``pid`` and the last offset in ``auth``): the
server then replays exactly what the bot missed and no ``sync`` is needed
(``bot.recovered`` is true). When the server cannot, the bot catches up
with ``sync`` (paging while ``has_more``). Either way a handler sees every
message and update exactly once and in order per room, across reconnects;
with ``state_path`` the seq map is kept in a JSON file and a restarted bot
resumes where it stopped. ``send`` is idempotent: it picks a
``client_msg_id`` once and retries with it on ``unavailable``,
``internal``, ``rate_limited``, timeouts and dropped connections.

Handlers run one at a time, in event order, so a slow handler delays the
next event: start a task for long work. The seq is saved after the handler
returns: a bot killed mid-handler (not stopped) sees that one event again
on restart, so handlers that send should derive their ``client_msg_id``
from the event to stay idempotent. Over the socket a handler that raises
is logged (with its name) and the bot moves on: the event is not handled
again. In webhook mode it answers 500 instead, so the server delivers the
event again later (see ``webhook.py``).

The token is refreshed before it expires (``tokens.py``).
"""
import asyncio
import functools
import inspect
import logging
import random
from pathlib import Path

import aiohttp
import socketio

from .api import ApiMixin
from .errors import BotError, LoginFailed
from .events import (OFFSET_EVENT, SEQ_EVENTS, TRACKED, Catchup, EventsMixin,
                     Recovered, Wake)
from .socketio_async_client import RecoveringClient
from .state import StateMixin
from .tokens import TokenMixin
from .webhook import WebhookMixin

log = logging.getLogger(__name__)


def _retrieved(task):
    """Done callback of a task nobody awaits: its outcome is read, so
    asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


class Bot(EventsMixin, ApiMixin, WebhookMixin, StateMixin, TokenMixin):
    """A Postbox client that never misses or repeats an event.

    ``url`` is the server's base URL. Give either ``token`` (a bot token) or
    ``username`` and ``password`` (a regular user account run as a bot:
    bot accounts have no password; logged in with ``POST /api/login``, and
    logged in again when the token stops working). ``state_path``: a JSON
    file for the per-room seq map, the kinds of the bot's rooms and its
    latest token, so a restart resumes. ``skip_history`` (default on): on
    a first start without saved state, begin at each room's current
    ``last_seq``: messages sent before that first start are never
    handled; off, they are all handled (every room's whole history).
    ``backoff`` and ``backoff_max``: the first and the longest wait
    between reconnects, in seconds (doubled per failed attempt, with
    jitter so a fleet of bots does not reconnect in lockstep).
    ``recover``: use connection state recovery on reconnects (off: always
    ``sync``). ``request_timeout``: how long a request waits for its
    answer (one that loses its connection fails at once).

    Counters for monitoring: ``connects`` (successful connects),
    ``recoveries`` (reconnects the server recovered: no ``sync``),
    ``replayed`` (the events those recoveries replayed), ``syncs``
    (catch-ups with ``sync``); ``recovered`` says whether the last connect
    recovered."""

    def __init__(self, url, token=None, *, username=None, password=None,
                 state_path=None, skip_history=True, transports=('websocket',),
                 backoff=0.5, backoff_max=30.0, request_timeout=10.0,
                 recover=True):
        if not token and not (username and password):
            raise ValueError('give a token, or a username and password')
        self.url = url.rstrip('/')
        self.token = token
        self.username = username
        self.password = password
        self.state_path = Path(state_path) if state_path else None
        self.skip_history = skip_history
        self.transports = list(transports)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.recover = recover
        self.user = None            # the bot's own user dict, from /api/me
        self.seqs = {}              # room id -> last seq handled
        self.rooms = {}             # room id -> room dict, kept current
        self.sio = None             # the current socketio.AsyncClient
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()  # connected and caught up
        self.connects = 0           # successful connects so far
        self.recoveries = 0         # connects that recovered (no sync)
        self.syncs = 0              # catch-ups with sync
        self.replayed = 0           # events replayed by recoveries
        self.recovered = False      # whether the last connect recovered
        self._pid = None            # the recovery session's pid
        self._offset = None         # the last offset received in it
        self._resumable = False     # caught up to the session's start
        self._deferred = set()      # rooms left to the next catch-up
        self._handlers = {}         # event -> [fn]
        self._queue = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._have_state = False
        self._state_user_id = None
        self._dispatcher = None
        self._runner = None
        self._abandoned = set()  # refused connects still closing
        self._http = None           # aiohttp session while running
        self._running = False       # inside run(): the socket is used
        self._lost = asyncio.Event()  # set when the current socket drops
        self._socket_token = None   # the token the socket connected with
        self._reconnect_now = False  # a planned reconnect: no backoff
        self._background = set()    # tasks nobody awaits
        self._token_received = None  # (token, local time) of a refresh
        self._token_lock = asyncio.Lock()
        self._kinds = {}            # room id -> 'dm' or 'group' (saved)
        self._webhook_busy = set()  # (room id, seq) being handled
        self._webhook_failures = {}  # (room id, seq) -> handler failures
        self._state_lock = None     # serializes state file writes
        self._load_state()

    # Handlers.

    def on(self, event):
        """Decorator: call ``fn(payload)`` for every server ``event``
        (``message``, ``message_updated``, ``room``, ``typing``, ``read``,
        ``presence``, ...), and ``fn()`` for ``ready``: after every catch-up.
        ``fn`` may be a coroutine function."""
        def decorator(fn):
            self._handlers.setdefault(event, []).append(fn)
            return fn
        return decorator

    def on_message(self, fn=None, *, include_own=False):
        """Decorator: call ``fn(message)`` for every new message, once.
        Deleted messages are skipped, and so are the bot's own unless
        ``include_own`` is set. Use bare (``@bot.on_message``) or called
        (``@bot.on_message(include_own=True)``)."""
        def decorator(fn):
            @functools.wraps(fn)  # logs name the function, not this
            async def handler(message):
                if message.get('deleted'):
                    return
                if not include_own and self.is_own(message):
                    return
                result = fn(message)
                if inspect.isawaitable(result):
                    await result
            self._handlers.setdefault('message', []).append(handler)
            return fn
        return decorator(fn) if fn is not None else decorator

    def on_room(self, fn):
        """Decorator: call ``fn(room)`` when a room is created with the bot
        in it, and once per change of a group's members, owner or name
        (also the changes made while the bot was away, from ``sync``)."""
        self._handlers.setdefault('room', []).append(fn)
        return fn

    def on_room_left(self, fn):
        """Decorator: call ``fn(room_id)`` once when the bot left or was
        removed from a group (live, or from ``sync`` if it was away)."""
        self._handlers.setdefault('room_left', []).append(fn)
        return fn

    def is_own(self, message) -> bool:
        """Whether ``message`` was sent by this bot."""
        return bool(self.user) and message['sender']['id'] == self.user['id']

    def is_dm(self, room_id) -> bool:
        """Whether ``room_id`` is a dm room. Known for every room the bot
        has had an event of: the kinds are kept in the state file, and in
        webhook mode a message from a room not known yet has the room read
        over HTTP before the handlers run."""
        room = self.rooms.get(room_id)
        kind = room.get('kind') if room else self._kinds.get(room_id)
        return kind == 'dm'

    # Running.

    async def start(self, timeout=None):
        """Run in the background; with ``timeout``, wait until connected
        and caught up (raises asyncio.TimeoutError)."""
        if self._runner is None or self._runner.done():
            self._stopping.clear()
            self._runner = asyncio.create_task(self.run())
        if timeout is not None:
            await self.wait_ready(timeout)
        return self

    async def wait_ready(self, timeout=10.0):
        """Wait until the bot is connected and has caught up."""
        waiter = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait({waiter, self._runner}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._runner in done:
            waiter.cancel()
            self._runner.result()  # raises what stopped the bot
            raise BotError('unavailable', 'the bot stopped')
        if waiter not in done:
            waiter.cancel()
            raise asyncio.TimeoutError('bot not ready')

    async def wait_stopped(self):
        """Wait until the bot has stopped; raises what stopped it, if
        anything but :meth:`stop`."""
        runner = self._runner
        if runner is not None:
            await asyncio.shield(runner)

    async def run(self):
        """Connect, handle events and reconnect until :meth:`stop`. Raises
        BotError if the credentials are refused for good."""
        self._dispatcher = asyncio.create_task(self._dispatch_loop())
        failures = 0
        self._session()
        self._running = True
        keeper = asyncio.create_task(self._keep_token_fresh())
        keeper.add_done_callback(_retrieved)
        try:
            while not self._stopping.is_set():
                try:
                    await self._connect()
                except LoginFailed:
                    raise
                except BotError as exc:
                    if exc.code != 'unauthorized':
                        log.info('connect failed: %s', exc)
                    elif self.password:
                        log.warning('token refused, logging in again')
                        self.token = None
                    else:
                        log.error('the token was refused (expired or '
                                  'revoked): the bot stops. Its owner gets '
                                  'a new one with POST /api/bots/{username}'
                                  '/token')
                        raise
                except (socketio.exceptions.ConnectionError,
                        aiohttp.ClientError, OSError,
                        asyncio.TimeoutError) as exc:
                    log.info('connect failed: %s', exc)
                else:
                    failures = 0
                    await self._wait_disconnected()
                    log.info('disconnected')
                if self._stopping.is_set():
                    break
                if self._reconnect_now:
                    # A reconnect of our own (a refreshed token): at once.
                    self._reconnect_now = False
                    continue
                delay = min(self.backoff_max, self.backoff * 2 ** failures)
                failures += 1
                delay *= random.uniform(0.5, 1.0)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            keeper.cancel()
            await self._finish_dispatcher()
            self._running = False
            for task in list(self._abandoned):
                task.cancel()  # nothing to wait for: it was refused
            self.connected.clear()
            self.ready.clear()
            if self.sio is not None and self.sio.connected:
                await self.sio.disconnect()
            await self.close()

    async def stop(self):
        """Let the handler that is running finish, then disconnect. Events
        not yet handled are caught up on the next start."""
        self._stopping.set()
        # Events received but not handled are dropped: the next start
        # catches up with sync, not by recovering this session.
        self._pid = None
        # Still connected while the last handler finishes, so its sends
        # get their acks and its seq is saved.
        await self._finish_dispatcher()
        self._disconnected.set()
        if self.sio is not None:
            await self.sio.disconnect()
        if self._runner is not None:
            try:
                await self._runner
            except BotError:
                pass
            self._runner = None
        await self.close()

    async def _finish_dispatcher(self):
        # Called by both stop() and run(): each waits for the same task.
        task = self._dispatcher
        if task is None or task.done():
            return
        self._queue.put_nowait(Wake())
        try:
            await asyncio.wait_for(asyncio.shield(task),
                                   self.request_timeout * 3)
        except asyncio.TimeoutError:
            log.warning('a handler did not finish in time; cancelled')
            task.cancel()

    async def _login(self):
        try:
            status, data = await self.http('POST', '/api/login', json={
                'username': self.username, 'password': self.password},
                authenticated=False)
        except BotError as exc:
            if exc.code == 'unauthorized':
                raise LoginFailed('unauthorized', exc.message) from None
            raise
        self.token = data['token']
        self.user = data['user']

    async def _connect(self):
        if not self.token:
            log.debug('logging in as %s', self.username)
            await self._login()
        if self.user is None:
            self.user = (await self.http('GET', '/api/me'))[1]['user']
            self._check_state_owner()
        # Reconnection is this class's own loop (it logs in again when the
        # token is refused); the shared session is closed by run(), and
        # SIGINT is left to the application (see run_forever).
        sio = RecoveringClient(reconnection=False, handle_sigint=False,
                               http_session=self._session())
        refused = {}
        rejected = asyncio.Event()
        lost = asyncio.Event()

        async def connect_error(data=None):
            if isinstance(data, dict):
                refused.update(data)
            rejected.set()

        async def disconnect(*args):
            lost.set()  # fails the requests waiting for an ack on it
            if sio is self.sio:
                self.connected.clear()
                self.ready.clear()
                self._disconnected.set()

        # Events that come while connecting (a recovery's replay, then
        # live ones) are taken once connect() has returned, so that
        # handlers see the connection's counters and state set, and the
        # offsets of a connect that failed are not kept.
        early = []

        async def live(event, *args):
            # Taken without awaiting anything first, so arrival order
            # holds. Events before the CONNECT reply are a replay.
            if event == OFFSET_EVENT:
                entry = (None, args[0] if args else None)
            else:
                offset = args[-1] if event in TRACKED and len(args) > 1 \
                    and isinstance(args[-1], str) else None
                entry = ((event, args[0] if args else None,
                          not sio.replied), offset)
            if early is not None:
                early.append(entry)
            else:
                self._take(*entry)

        def forward(event):
            async def handler(*args):
                await live(event, *args)
            return handler

        sio.on('connect_error', connect_error)
        sio.on('disconnect', disconnect)
        for event in SEQ_EVENTS:
            sio.on(event, forward(event))
        sio.on('*', live)
        self._disconnected.clear()
        self.sio, self._lost = sio, lost
        auth = self._auth()
        self._socket_token = auth['token']
        log.debug('connecting (recovering: %s)', 'pid' in auth)
        connecting = asyncio.create_task(sio.connect(
            self.url, auth=auth, transports=self.transports,
            wait_timeout=self.request_timeout))
        refusal = asyncio.create_task(rejected.wait())
        await asyncio.wait({connecting, refusal},
                           return_when=asyncio.FIRST_COMPLETED)
        refusal.cancel()
        code = (refused.get('data') or {}).get('code') \
            or refused.get('message')
        if rejected.is_set():
            # Refused: go on at once. After a refusal python-engineio's
            # client may wait for its write loop's idle timeout (30 s)
            # before connect() returns; it ends by itself.
            self._abandoned.add(connecting)
            connecting.add_done_callback(self._abandoned.discard)
            connecting.add_done_callback(_retrieved)
            raise BotError(code if isinstance(code, str) else 'unavailable',
                           'connection refused')
        try:
            await connecting
        except socketio.exceptions.ConnectionError:
            if code in ('unauthorized', 'unavailable'):
                raise BotError(code, 'connection refused') from None
            raise
        self.connects += 1
        log.debug('connected, %d events before the reply', len(early))
        self.recovered = 'pid' in auth and sio.pid == auth['pid']
        self._pid = sio.pid
        self.connected.set()
        arrived, early = early, None  # from here live() takes directly
        for entry in arrived:
            self._take(*entry)
        if self.recovered:
            self.recoveries += 1
            self.replayed += sum(1 for item, _ in arrived if item and item[2])
            self._queue.put_nowait(Recovered())
        else:
            self._resumable = False
            # Catch up before any live event that arrives after this point.
            self._queue.put_nowait(Catchup())

    def _take(self, item, offset):
        """Queue a received event (None: the offset event only) and keep
        its offset: the last one the bot has, for the next reconnect."""
        if item is not None:
            self._queue.put_nowait(item)
        if offset is not None:
            self._offset = offset

    def _auth(self) -> dict:
        """The CONNECT payload: the token, and with ``recover`` the opt-in
        and, when the bot is caught up to its session's start, the session
        to resume and the last offset the bot received in it."""
        auth = {'token': self.token}
        if self.recover:
            auth['recover'] = True
            if self._pid and self._resumable and self._offset is not None:
                auth.update(pid=self._pid, offset=self._offset)
        return auth

    async def _wait_disconnected(self):
        await self._disconnected.wait()
