"""Requests: Socket.IO calls with their acks (``send`` with retries,
``search``, group changes, inbox pages) and the HTTP API."""
import asyncio
import json as _json
import logging
import random
import urllib.parse
import uuid
from pathlib import Path

import aiohttp
import socketio

from .errors import RETRYABLE, BotError, Disconnected

log = logging.getLogger(__name__)

# Rooms per page of the inbox (``rooms`` with ``limit``): a bot in
# thousands of rooms reads them in a few round trips of bounded size.
ROOMS_PAGE = 200


class ApiMixin:
    """The requests of :class:`postbox_bot.Bot`; they wait for a
    connection (up to ``request_timeout``) when there is none."""

    inbox_page = ROOMS_PAGE  # rooms per page of inbox()

    @property
    def socket_used(self) -> bool:
        """Whether the bot runs its socket (``run``, or ``start`` whose
        task has not begun yet): requests go over it; else over HTTP or
        not at all."""
        runner = self._runner
        return self._running or (runner is not None and not runner.done())

    async def call(self, event, data=None, timeout=None):
        """Emit ``event`` and return its successful ack; raises BotError
        for an error ack, ``unavailable`` at once when the connection drops
        before the ack (or when the socket is not started: see
        :meth:`start`; :meth:`http` needs no socket) and socketio's
        TimeoutError without an ack."""
        timeout = timeout or self.request_timeout
        if not self.socket_used:
            raise BotError('unavailable', f'{event}: the socket is not '
                           'started (bot.start() or bot.run()); without '
                           'a socket use bot.http()')
        if not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), timeout)
            except asyncio.TimeoutError:
                raise BotError('unavailable', 'not connected') from None
        # The connection this request goes out on, and its end: an ack
        # cannot come once it has dropped (python-socketio forgets the
        # request then), so the request fails at once instead of waiting
        # out its timeout.
        sio, lost = self.sio, self._lost
        request = asyncio.ensure_future(
            sio.call(event, data or {}, timeout=timeout))
        watch = asyncio.ensure_future(lost.wait())
        try:
            done, _ = await asyncio.wait({request, watch},
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not request.done():
                request.cancel()
        if request not in done:
            raise Disconnected('unavailable', f'{event}: disconnected '
                               'before the answer')
        try:
            ack = request.result()
        except socketio.exceptions.BadNamespaceError:
            raise Disconnected('unavailable', 'not connected') from None
        if not isinstance(ack, dict) or not ack.get('ok'):
            error = (ack or {}).get('error') or {}
            raise BotError(error.get('code', 'internal'),
                           error.get('message', ''), error.get('retry_after'))
        return ack

    async def send(self, body, *, room_id=None, to=None, reply_to=None,
                   attachments=None, client_msg_id=None, attempts=6,
                   rate_limit_wait=30.0):
        """Send a message to ``room_id`` or to the user ``to`` and return it
        once the server has stored it: over the socket when the bot runs
        one, else over HTTP (``POST /api/messages``: webhook mode). Retries
        with the same ``client_msg_id``, so a retry never sends twice:
        at once on the next connection when the connection dropped before
        the ack; with growing backoff on ``unavailable``, ``internal``
        and timeouts (``attempts`` tries in all); on ``rate_limited``
        after ``retry_after`` plus a growing random spread (so concurrent
        sends do not retry in lockstep) for up to ``rate_limit_wait``
        seconds. Raises BotError when it gives up or for any other code."""
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rate_limit_wait
        delay = self.backoff
        failures = limited = 0
        while True:
            try:
                if not self.socket_used:
                    _, answer = await self.http('POST', '/api/messages',
                                                json=data)
                    return answer['message']
                return (await self.call('send_dm', data))['message']
            except Disconnected as exc:
                # call() waits for the next connection: no sleep first.
                failure, wait = exc, 0.0
                failures += 1
            except BotError as exc:
                failure = exc
                if exc.code == 'rate_limited':
                    limited += 1
                    base = exc.retry_after or 0.0
                    spread = min(self.backoff_max,
                                 max(base, 0.05) * 2 ** limited)
                    wait = base + random.uniform(0, spread)
                    if loop.time() + wait > deadline:
                        raise
                elif exc.code in RETRYABLE or (exc.status or 0) >= 500:
                    failures += 1
                    wait = exc.retry_after or delay
                else:
                    raise
            except (socketio.exceptions.TimeoutError, aiohttp.ClientError,
                    asyncio.TimeoutError) as exc:
                failure = BotError('unavailable',
                                   f'no answer ({type(exc).__name__})')
                failures += 1
                wait = delay
            if failures >= attempts:
                raise failure
            if failure.code != 'rate_limited' and wait:
                delay = min(self.backoff_max, delay * 2)
            log.info('send %s: %s, retrying in %.2fs',
                     data['client_msg_id'], failure, wait)
            await asyncio.sleep(wait)

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

    async def inbox(self, page=None, over_http=False):
        """Every entry of the bot's inbox (``{room, last_message, unread,
        last_read_seq, muted}``), latest activity first, fetched ``page``
        (default ``inbox_page``) rooms at a time (``rooms`` with ``limit`` and ``before``; with
        ``over_http``, ``GET /api/rooms``: no connection needed)."""
        entries, before = [], None
        page = page or self.inbox_page
        while True:
            query = {'limit': page}
            if before is not None:
                query['before'] = before
            if over_http:
                _, answer = await self.http(
                    'GET', '/api/rooms?' + urllib.parse.urlencode(query))
            else:
                answer = await self.call('rooms', query)
            entries.extend(answer['rooms'])
            before = answer.get('next_before')
            if not answer.get('has_more') or not before:
                return entries

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

    async def http(self, method, path, json=None, authenticated=True,
                   data=None, stream=False):
        """One HTTP API request; returns ``(status, data)`` for a 2xx answer
        (``data``: the decoded JSON, the body's bytes when the answer is
        not JSON, e.g. a file, or None when there is no body) and raises
        BotError with the server's error code otherwise. ``data``: a body
        other than JSON (aiohttp's ``FormData`` for a multipart upload).
        ``stream``: a file's transfer, which may take longer than
        ``request_timeout`` as long as it never stalls that long. A token
        due for a refresh is refreshed first (see ``tokens.py``)."""
        if authenticated:
            await self._refresh_quietly()
        return await self._request(method, path, json, authenticated, data,
                                   stream)

    async def _request(self, method, path, json=None, authenticated=True,
                       data=None, stream=False):
        headers = {}
        if authenticated:
            headers['Authorization'] = f'Bearer {self.token}'
        timeout = aiohttp.ClientTimeout(
            total=None if stream else self.request_timeout,
            sock_read=self.request_timeout)
        async with self._session().request(
                method, self.url + path, json=json, data=data,
                headers=headers, timeout=timeout) as resp:
            body = await resp.read()
            answer = body if body and resp.status < 400 and \
                resp.content_type != 'application/json' else None
            if answer is None and body:
                try:
                    answer = _json.loads(body)
                except ValueError:
                    answer = None  # e.g. a proxy's HTML error page
            if resp.status >= 400:
                error = (answer if isinstance(answer, dict) else {}).get(
                    'error') or {}
                raise BotError(error.get('code', str(resp.status)),
                               error.get('message', ''),
                               error.get('retry_after'), resp.status)
            return resp.status, answer

    # Attachments.

    async def upload(self, file, filename=None, content_type=None) -> dict:
        """Upload a file (a path, or bytes with ``filename``) to send with
        a message: ``await bot.send('the report', room_id=...,
        attachments=[(await bot.upload('report.pdf'))['id']])``. Returns
        the stored attachment (``{id, filename, content_type, size, url}``);
        the server sniffs the type from the bytes and may refuse it
        (BotError ``invalid``, status 415)."""
        if isinstance(file, (bytes, bytearray)):
            if not filename:
                raise ValueError('give the filename of the bytes')
            body = bytes(file)
        else:
            path = Path(file)
            body = await asyncio.to_thread(path.read_bytes)
            filename = filename or path.name
        form = aiohttp.FormData()
        form.add_field('file', body, filename=filename,
                       content_type=content_type or
                       'application/octet-stream')
        _, answer = await self.http('POST', '/api/attachments', data=form,
                                    stream=True)
        return answer['attachment']

    async def download(self, attachment_id, thumbnail=False) -> bytes:
        """The bytes of an attachment of a message the bot can see (its
        thumbnail with ``thumbnail``: images only)."""
        path = f'/api/attachments/{int(attachment_id)}'
        _, body = await self.http(
            'GET', path + ('/thumbnail' if thumbnail else ''), stream=True)
        return body or b''

    async def close(self):
        """Close the HTTP session of a Bot used only for :meth:`http`
        requests (one that runs closes it when it stops)."""
        session, self._http = self._http, None
        if session is not None:
            await session.close()

    def _session(self) -> aiohttp.ClientSession:
        # One session for the HTTP API and Engine.IO, made on first use and
        # closed when run() ends or by stop().
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http
