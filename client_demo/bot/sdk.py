"""A small async bot client for Postbox, on ``socketio.AsyncClient``.

A :class:`Bot` logs in (username and password, or a bot token from
``POST /api/bots``), connects, and keeps itself connected with exponential
backoff. It remembers the last ``seq`` it handled in every room and after
every (re)connect catches up with ``sync`` (paging while ``has_more``), so a
handler sees every message and update exactly once and in order per room,
across reconnects; with ``state_path`` the seq map is kept in a JSON file and
a restarted bot resumes where it stopped. ``send`` is idempotent: it picks a
``client_msg_id`` once and retries with it on ``unavailable``, rate limits and
timeouts.

    bot = Bot('http://127.0.0.1:8080', token=TOKEN, state_path='bot.json')

    @bot.on_message
    async def echo(message):
        await bot.send(room_id=message['room_id'], body=message['body'])

    asyncio.run(bot.run())

Handlers run one at a time, in event order, so a slow handler delays the
next event: start a task for long work (see remind_bot.py). The seq is saved
after the handler returns: a bot killed mid-handler (not stopped) sees that
one event again on restart, so handlers that send should derive their
``client_msg_id`` from the event (see echo_bot.py) to stay idempotent.
"""
import argparse
import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import random
import signal
import time
import uuid
from pathlib import Path

import aiohttp
import socketio
from aiohttp import web

log = logging.getLogger(__name__)

# Events numbered by the room's seq; everything else is passed straight on
# (a ``room`` event is numbered too when it reports a group change: its
# ``last_seq`` is then the change's seq).
SEQ_EVENTS = ('message', 'message_updated')
# Error codes worth retrying a send for, with the same client_msg_id.
RETRYABLE = ('unavailable', 'rate_limited', 'internal')


# How old a webhook delivery's signed time may be: a delivery replayed
# later than this (a captured request sent again) is refused.
WEBHOOK_TOLERANCE_SECONDS = 300


def verify_signature(secret, header, body: bytes,
                     tolerance=WEBHOOK_TOLERANCE_SECONDS) -> bool:
    """Whether ``header`` (``Postbox-Signature: t=<unix>,v1=<hex>``) signs
    ``body`` with the webhook's ``secret`` within ``tolerance`` seconds."""
    try:
        parts = dict(p.split('=', 1) for p in header.split(','))
        stamp = int(parts['t'])
        given = parts['v1']
    except (KeyError, ValueError):
        return False
    if abs(time.time() - stamp) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f'{stamp}.'.encode() + body,
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(given, expected)


class BotError(Exception):
    """A request the server refused: ``code`` is the contract's error code."""

    def __init__(self, code, message='', retry_after=None):
        super().__init__(f'{code}: {message}' if message else code)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class LoginFailed(BotError):
    """The username and password were refused: retrying will not help."""


class _Catchup:
    """Queue marker: catch up with ``sync`` before the next live event."""


class _Wake:
    """Queue marker: wakes the dispatcher so it can see that it must stop."""


class Bot:
    """A Postbox client that never misses or repeats an event.

    ``url`` is the server's base URL. Give either ``token`` (a bot token) or
    ``username`` and ``password`` (logged in with ``POST /api/login``, and
    logged in again when the token stops working). ``state_path``: a JSON
    file for the per-room seq map, so a restart resumes. ``skip_history``:
    on a first start without saved state, begin at each room's current
    ``last_seq`` instead of replaying all of its history. ``backoff`` and
    ``backoff_max``: the first and the longest wait between reconnects, in
    seconds (doubled per failed attempt, with jitter so a fleet of bots does
    not reconnect in lockstep)."""

    def __init__(self, url, token=None, *, username=None, password=None,
                 state_path=None, skip_history=True, transports=('websocket',),
                 backoff=0.5, backoff_max=30.0, request_timeout=10.0):
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
        self.user = None            # the bot's own user dict, from /api/me
        self.seqs = {}              # room id -> last seq handled
        self.rooms = {}             # room id -> room dict, kept current
        self.sio = None             # the current socketio.AsyncClient
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()  # connected and caught up
        self.connects = 0           # successful connects so far
        self._handlers = {}         # event -> [fn]
        self._queue = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._have_state = False
        self._state_user_id = None
        self._dispatcher = None
        self._runner = None
        self._http = None           # aiohttp session while running
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

    # Webhook mode: events POSTed by the server instead of a socket.

    def webhook_handler(self, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS):
        """An aiohttp request handler for the bot's webhook (set with
        ``PUT /api/bots/{username}/webhook``, which gave ``secret``): it
        checks the signature (401 if wrong or too old), hands the event to
        the same handlers a socket would (``on_message``, ``on``,
        ``on_room``, ``on_room_left``), once per room and seq, and answers
        204 after they ran, so the server retries what was not handled.
        Mount it with ``app.router.add_post(path, handler)``."""
        async def handle(request):
            body = await request.read()
            if not verify_signature(secret, request.headers.get(
                    'Postbox-Signature', ''), body, tolerance):
                return web.Response(status=401)
            try:
                event = json.loads(body)
                await self._webhook_event(event)
            except (ValueError, KeyError, TypeError, AttributeError):
                return web.Response(status=400)
            return web.Response(status=204)
        return handle

    async def _webhook_event(self, event):
        """One webhook event; its id is '<room id>.<seq>', in seq order
        per room (the bot's own messages are not sent, so seqs skip)."""
        kind, data = event['type'], event['data']
        room_id, seq = (int(v) for v in event['id'].split('.'))
        if seq <= self.seqs.get(room_id, 0):
            return  # a retry of one handled already
        self.seqs[room_id] = seq
        if kind == 'room_left':
            self.rooms.pop(room_id, None)
            await self._call_handlers('room_left', room_id)
        else:
            if kind == 'room':
                self.rooms[room_id] = data
            await self._call_handlers(kind, data)
        await self._save_state()

    def is_own(self, message) -> bool:
        """Whether ``message`` was sent by this bot."""
        return bool(self.user) and message['sender']['id'] == self.user['id']

    def is_dm(self, room_id) -> bool:
        """Whether ``room_id`` is a dm room (as far as the bot knows)."""
        return self.rooms.get(room_id, {}).get('kind') == 'dm'

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
                delay = min(self.backoff_max, self.backoff * 2 ** failures)
                failures += 1
                delay *= random.uniform(0.5, 1.0)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._finish_dispatcher()
            self.connected.clear()
            self.ready.clear()
            if self.sio is not None and self.sio.connected:
                await self.sio.disconnect()
            session, self._http = self._http, None
            if session is not None:
                await session.close()

    async def stop(self):
        """Let the handler that is running finish, then disconnect. Events
        not yet handled are caught up on the next start."""
        self._stopping.set()
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
        session, self._http = self._http, None
        if session is not None:
            await session.close()

    async def _finish_dispatcher(self):
        # Called by both stop() and run(): each waits for the same task.
        task = self._dispatcher
        if task is None or task.done():
            return
        self._queue.put_nowait(_Wake())
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
            await self._login()
        if self.user is None:
            self.user = (await self.http('GET', '/api/me'))[1]['user']
            self._check_state_owner()
        # Reconnection is this class's own loop (it logs in again when the
        # token is refused); the shared session is closed by run(), and
        # SIGINT is left to the application (see run_forever).
        sio = socketio.AsyncClient(reconnection=False, handle_sigint=False,
                                   http_session=self._session())
        refused = {}

        async def connect_error(data=None):
            if isinstance(data, dict):
                refused.update(data)

        async def disconnect(*args):
            if sio is self.sio:
                self.connected.clear()
                self.ready.clear()
                self._disconnected.set()

        async def live(event, *args):
            # Queued without awaiting anything first, so arrival order holds.
            self._queue.put_nowait((event, args[0] if args else None))

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
        self.sio = sio
        try:
            await sio.connect(self.url, auth={'token': self.token},
                              transports=self.transports,
                              wait_timeout=self.request_timeout)
        except socketio.exceptions.ConnectionError:
            code = (refused.get('data') or {}).get('code') \
                or refused.get('message')
            if code in ('unauthorized', 'unavailable'):
                raise BotError(code, 'connection refused') from None
            raise
        self.connects += 1
        self.connected.set()
        # Catch up before any live event that arrives after this point.
        self._queue.put_nowait(_Catchup())

    async def _wait_disconnected(self):
        await self._disconnected.wait()

    # Events, in order, exactly once.

    async def _dispatch_loop(self):
        while not self._stopping.is_set():
            item = await self._queue.get()
            if self._stopping.is_set() or isinstance(item, _Wake):
                break
            try:
                if isinstance(item, _Catchup):
                    await self._catch_up()
                else:
                    await self._live(*item)
            except (BotError, socketio.exceptions.SocketIOError) as exc:
                # Disconnected mid-way: the next connect catches up again.
                log.info('catch-up interrupted: %s', exc)

    async def _live(self, event, payload):
        if event in SEQ_EVENTS and isinstance(payload, dict):
            seq = payload.get('update_seq' if event == 'message_updated'
                              else 'seq')
            await self._accept(event, payload['room_id'], seq, payload,
                               from_sync=False)
            return
        if event == 'room' and isinstance(payload, dict):
            seq = payload.get('last_seq') or 0
            if seq > 0:  # a group change, numbered like messages
                if payload['id'] not in self.seqs:
                    # Added to a group: it starts here for the bot, the
                    # messages from before are history, not news.
                    self.seqs[payload['id']] = seq - 1
                await self._accept('room', payload['id'], seq, payload,
                                   from_sync=False)
                return
            self.rooms[payload['id']] = payload
        if event == 'room_left' and isinstance(payload, dict):
            await self._left(payload.get('room_id'))
            return
        await self._call_handlers(event, payload)

    async def _left(self, room_id):
        """The bot is out of ``room_id``: forget it (a later sync then
        does not list it) and tell the handlers, once."""
        known = (self.rooms.pop(room_id, None) is not None) | (
            self.seqs.pop(room_id, None) is not None)
        if known:
            await self._save_state()
            await self._call_handlers('room_left', room_id)

    async def _accept(self, event, room_id, seq, message, from_sync):
        last = self.seqs.get(room_id, 0)
        if seq <= last:
            return  # seen already (live and sync overlap)
        if seq != last + 1 and not from_sync:
            # A gap: something arrived while the socket was changing.
            # sync fills it in order, this event included.
            await self._catch_up()
            return
        self.seqs[room_id] = seq
        if event == 'room':
            self.rooms[room_id] = message
        await self._call_handlers(event, message)
        await self._save_state()

    async def _catch_up(self):
        listing = await self.call('rooms', {})
        for entry in listing['rooms']:
            room = entry['room']
            self.rooms[room['id']] = room
            if not self._have_state and self.skip_history:
                self.seqs[room['id']] = room['last_seq']
            elif self._have_state and room['id'] not in self.seqs and \
                    room['kind'] == 'group':
                # A group the bot was added to while away: from its
                # arrival (the server starts an added member's read
                # marker at the seq of the change that added it).
                self.seqs[room['id']] = max(0, entry['last_read_seq'] - 1)
        if not self._have_state:
            self._have_state = True
            await self._save_state()
        pages = 0
        while True:
            ack = await self.call('sync', {'rooms': {
                str(k): v for k, v in self.seqs.items()}})
            pages += 1
            for event in ack['events']:
                if event['type'] == 'room_left':
                    await self._left(event['room_id'])
                    continue
                await self._accept(event['type'], event['room_id'],
                                   event['seq'],
                                   event.get('message') or event.get('room'),
                                   from_sync=True)
            if not ack['has_more']:
                break
        log.info('caught up in %d sync page(s)', pages)
        if self.connected.is_set():
            self.ready.set()
        await self._call_handlers('ready', None)

    async def _call_handlers(self, event, payload):
        for fn in self._handlers.get(event, ()):
            try:
                result = fn(payload) if payload is not None else fn()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # A broken handler must not stop the bot or replay the
                # event forever; it is logged and the bot moves on.
                log.exception('handler %r for %s failed', fn, event)

    # Requests.

    async def call(self, event, data=None, timeout=None):
        """Emit ``event`` and return its successful ack; raises BotError
        for an error ack and socketio's TimeoutError without an ack."""
        timeout = timeout or self.request_timeout
        if not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), timeout)
            except asyncio.TimeoutError:
                raise BotError('unavailable', 'not connected') from None
        try:
            ack = await self.sio.call(event, data or {}, timeout=timeout)
        except socketio.exceptions.BadNamespaceError:
            raise BotError('unavailable', 'not connected') from None
        if not isinstance(ack, dict) or not ack.get('ok'):
            error = (ack or {}).get('error') or {}
            raise BotError(error.get('code', 'internal'),
                           error.get('message', ''), error.get('retry_after'))
        return ack

    async def send(self, body, *, room_id=None, to=None, reply_to=None,
                   attachments=None, client_msg_id=None, attempts=6):
        """Send a message to ``room_id`` or to the user ``to`` and return it
        once the server has stored it. Retries on ``unavailable``, rate
        limits, timeouts and disconnects with the same ``client_msg_id``,
        so a retry never sends twice."""
        if (room_id is None) == (to is None):
            raise ValueError('give room_id or to')
        data = {'body': body, 'client_msg_id': client_msg_id or str(uuid.uuid4())}
        if room_id is not None:
            data['room_id'] = room_id
        else:
            data['to'] = to
        if reply_to is not None:
            data['reply_to'] = reply_to
        if attachments:
            data['attachments'] = list(attachments)
        delay = self.backoff
        for attempt in range(attempts):
            try:
                return (await self.call('send_dm', data))['message']
            except BotError as exc:
                if exc.code not in RETRYABLE or attempt == attempts - 1:
                    raise
                wait = exc.retry_after or delay
                log.info('send %s: %s, retrying in %.1fs',
                         data['client_msg_id'], exc.code, wait)
            except socketio.exceptions.TimeoutError:
                if attempt == attempts - 1:
                    raise BotError('unavailable', 'no ack') from None
                wait = delay
            await asyncio.sleep(wait)
            delay = min(self.backoff_max, delay * 2)

    async def search(self, query, room_id=None, before=None, limit=None):
        """Messages of the bot's rooms (or of ``room_id``) containing every
        word of ``query``, newest first: ``(messages, has_more)``. For the
        next page pass ``before=messages[-1]['id']``."""
        data = {'query': query}
        for name, value in (('room_id', room_id), ('before', before),
                            ('limit', limit)):
            if value is not None:
                data[name] = value
        ack = await self.call('search', data)
        return ack['results'], ack['has_more']

    # Groups.

    async def add_members(self, room_id, usernames) -> dict:
        """Add ``usernames`` to a group the bot is in; returns the room."""
        return (await self.call('add_members', {
            'room_id': room_id, 'members': list(usernames)}))['room']

    async def remove_member(self, room_id, username) -> dict:
        """Remove ``username`` from a group the bot owns; returns the
        room."""
        return (await self.call('remove_member', {
            'room_id': room_id, 'username': username}))['room']

    async def leave_group(self, room_id):
        """Leave a group (``room_left`` handlers then run for it)."""
        await self.call('leave_group', {'room_id': room_id})

    async def rename_group(self, room_id, name) -> dict:
        """Rename a group the bot owns; returns the room."""
        return (await self.call('rename_group', {
            'room_id': room_id, 'name': name}))['room']

    async def http(self, method, path, json=None, authenticated=True):
        """One HTTP API request; returns ``(status, data)`` for a 2xx answer
        and raises BotError with the server's error code otherwise."""
        headers = {}
        if authenticated:
            headers['Authorization'] = f'Bearer {self.token}'
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with self._session().request(
                method, self.url + path, json=json, headers=headers,
                timeout=timeout) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None  # e.g. a proxy's HTML error page
            if resp.status >= 400:
                error = (data or {}).get('error') or {}
                raise BotError(error.get('code', str(resp.status)),
                               error.get('message', ''),
                               error.get('retry_after'))
            return resp.status, data

    def _session(self) -> aiohttp.ClientSession:
        # One session for the HTTP API and Engine.IO, made on first use and
        # closed when run() ends or by stop().
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    # State.

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


def argument_parser(description) -> argparse.ArgumentParser:
    """Command-line options shared by the example bots, each with an
    environment fallback: --url (POSTBOX_URL), --token (POSTBOX_TOKEN),
    --username/--password (POSTBOX_USERNAME/POSTBOX_PASSWORD) and --state
    (POSTBOX_STATE)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--url', default=env('POSTBOX_URL',
                                             'http://127.0.0.1:8080'))
    parser.add_argument('--token', default=env('POSTBOX_TOKEN'),
                        help='bot token from POST /api/bots')
    parser.add_argument('--username', default=env('POSTBOX_USERNAME'))
    parser.add_argument('--password', default=env('POSTBOX_PASSWORD'))
    parser.add_argument('--state', default=env('POSTBOX_STATE'),
                        help='JSON file keeping the last seq per room')
    parser.add_argument('-v', '--verbose', action='store_true')
    return parser


def bot_from_args(args) -> Bot:
    """A Bot from :func:`argument_parser`'s options."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')
    if not args.token and not (args.username and args.password):
        raise SystemExit('give --token (or POSTBOX_TOKEN), or --username '
                         'and --password')
    return Bot(args.url, args.token, username=args.username,
               password=args.password, state_path=args.state)


def run_forever(bot: Bot):
    """Run ``bot`` until SIGINT or SIGTERM, then stop it cleanly (the
    handler that is running finishes and the seq map is saved)."""
    async def serve():
        stopping = []

        def on_signal():
            if not stopping:
                stopping.append(asyncio.ensure_future(bot.stop()))

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await bot.start()
        await bot.wait_stopped()
        if stopping:
            await stopping[0]
    try:
        asyncio.run(serve())
    except BotError as exc:
        raise SystemExit(f'bot stopped: {exc}') from None
