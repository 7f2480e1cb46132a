"""HTTP API views: the same services as Socket.IO, for bots, mobile and
scripts. Errors are JSON ``{error: {code, message}}`` with their status."""
import asyncio
import functools
import inspect
import logging
from pathlib import Path

from aiohttp import web

from server.errors import Invalid, NotFound, PostboxError, Unauthorized
from server.logs import new_request_id, request_id
from server.metrics import METRICS, route_name
from server.services import auth, messages, push, rooms, webhooks
from server.services import search as search_service
from server.transport.addresses import client_address
from server.transport.json_depth import deeper_than

log = logging.getLogger(__name__)

CTX = web.AppKey('ctx', object)
REALTIME = web.AppKey('realtime', object)
# (name, check) pairs of /readyz (dependencies) and /healthz (this
# process's own parts); see ``_checked``.
READY_CHECKS = web.AppKey('ready_checks', list)
HEALTH_CHECKS = web.AppKey('health_checks', list)
# ``async disconnect_user(user_id)``: closes the user's live sockets (after
# a logout or password change revoked their tokens).
DISCONNECT_USER = web.AppKey('disconnect_user', object)

# The demo page loads only its own scripts and styles; it talks to this
# server over Socket.IO (ws:/wss:) and shows uploaded images as blobs.
DEMO_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' "
            "'unsafe-inline'; connect-src 'self' ws: wss:; "
            "img-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")
# API answers are data, never a page to render or frame.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


async def security_headers(request, response):
    """``on_response_prepare`` hook: headers that stop browsers from
    sniffing types, framing our pages or leaking URLs, on every response
    (errors, files and websocket handshakes included)."""
    headers = response.headers
    headers.setdefault('X-Content-Type-Options', 'nosniff')
    headers.setdefault('X-Frame-Options', 'DENY')
    headers.setdefault('Referrer-Policy', 'no-referrer')
    is_page = request.path == '/' or request.path.startswith('/static/')
    headers.setdefault('Content-Security-Policy',
                       DEMO_CSP if is_page else API_CSP)
    if request_id.get():
        headers.setdefault('X-Request-Id', request_id.get())


def error_response(error: PostboxError) -> web.Response:
    headers = {}
    if getattr(error, 'retry_after', None) is not None:
        headers['Retry-After'] = str(max(1, round(error.retry_after)))
    return web.json_response({'error': error.to_dict()},
                             status=error.status, headers=headers)


def websockets_pass(middleware, path='/socket.io/'):
    """``middleware`` for every request but websocket handshakes to
    ``path`` (the Socket.IO endpoint), which go straight on to their
    handler. A websocket's handler runs for as long as the socket is open,
    and a middleware awaiting it keeps a suspended coroutine per open
    socket (about 300 bytes, of an idle socket's 20 KB); Socket.IO sockets
    have metrics and an error path of their own. The wrapper is a plain
    function returning what aiohttp then awaits, so it holds no coroutine
    itself."""
    @web.middleware
    @functools.wraps(middleware)
    def wrapper(request, handler):
        if request.path == path and request.method == 'GET' and \
                request.headers.get('Upgrade', '').lower() == 'websocket':
            return handler(request)
        return middleware(request, handler)
    return wrapper


@web.middleware
async def metrics_middleware(request, handler):
    """Give the request an id (``X-Request-Id``, for the logs) and count
    it by route and status."""
    new_request_id()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[METRICS].http.labels(
            request.method, route_name(request), status).inc()


@web.middleware
async def errors_middleware(request, handler):
    """The one error path of HTTP: PostboxError -> its status and JSON,
    aiohttp's own HTTP errors -> JSON, anything else -> logged, 500."""
    try:
        return await handler(request)
    except PostboxError as exc:
        if exc.code == 'rate_limited':
            request.app[METRICS].rate_limited.labels(
                route_name(request)).inc()
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {401: 'unauthorized', 403: 'forbidden', 404: 'not_found',
                409: 'conflict', 413: 'too_large', 429: 'rate_limited',
                503: 'unavailable'}.get(exc.status, 'invalid')
        return web.json_response(
            {'error': {'code': code, 'message': exc.reason}},
            status=exc.status)
    except Exception:
        log.exception('HTTP %s %s failed', request.method, route_name(request))
        return web.json_response(
            {'error': {'code': 'internal', 'message': 'internal error'}},
            status=500)


async def json_body(request) -> dict:
    """The request's JSON object. Invalid (400) when the body is not
    JSON, is nested deeper than ``json_max_depth`` (too deep for the
    parser, RecursionError, included) or is not an object."""
    try:
        data = await request.json()
    except (ValueError, RecursionError):
        raise Invalid('body must be JSON') from None
    if not isinstance(data, dict):
        raise Invalid('body must be a JSON object')
    limit = request.app[CTX].config.json_max_depth
    if deeper_than(data, limit):
        raise Invalid(f'body is nested too deeply (at most {limit} levels)')
    return data


async def current_user(request, spend=True) -> dict:
    """The login check of every authenticated view. Each authenticated
    request also costs a token of the user's event bucket, the one their
    Socket.IO events spend: a script looping on HTTP is as costly as one
    looping on events (RateLimited when it is empty). File downloads pass
    ``spend=False``: a conversation full of pictures fetches dozens of
    thumbnails at once, and serving a file is a read from disk that the
    connection limits already bound."""
    header = request.headers.get('Authorization', '')
    scheme, _, token = header.partition(' ')
    if scheme.lower() != 'bearer' or not token:
        raise Unauthorized('missing bearer token')
    ctx = request.app[CTX]
    user = await auth.authenticate(ctx, token.strip())
    if spend:
        ctx.limits.events.take(user['id'])
    return user


def request_address(request):
    """The client's address (per ``trusted_proxies``), for the limits
    per address."""
    return client_address(request, request.app[CTX].config.trusted_proxies)


def query_int(request, name):
    value = request.query.get(name)
    if value is None or value == '':
        return None
    try:
        return int(value)
    except ValueError:
        raise Invalid(f'{name} must be an integer') from None


def path_int(request, name):
    try:
        value = int(request.match_info[name])
    except ValueError:
        raise NotFound('not found') from None
    if not 0 < value < 2**63:  # ids are positive 64-bit integers
        raise NotFound('not found')
    return value


async def register(request):
    data = await json_body(request)
    result = await auth.register(request.app[CTX], data.get('username'),
                                 data.get('password'),
                                 data.get('display_name'),
                                 ip=request_address(request))
    return web.json_response(result, status=201)


async def login(request):
    data = await json_body(request)
    result = await auth.login(request.app[CTX], data.get('username'),
                              data.get('password'),
                              ip=request_address(request))
    return web.json_response(result)


async def logout(request):
    """``{all: true}`` revokes every token of the user and closes their
    live sockets; without it there is nothing to forget server-side (tokens
    are stateless), so the client just drops its token."""
    user = await current_user(request)
    data = await json_body(request) if request.can_read_body else {}
    revoke = data.get('all', False)
    if not isinstance(revoke, bool):
        raise Invalid('all must be a boolean')
    if not revoke:
        return web.json_response({'ok': True})
    for user_id in await auth.revoke_tokens(request.app[CTX], user['id']):
        await request.app[DISCONNECT_USER](user_id)  # the user's bots too
    return web.json_response({'ok': True})


async def refresh_token(request):
    user = await current_user(request)
    return web.json_response(
        await auth.refresh_token(request.app[CTX], user['id']))


async def change_password(request):
    """``{old_password, new_password}`` -> ``{user, token}``: older tokens
    (the user's bots' included) and the sockets opened with them stop
    working."""
    user = await current_user(request)
    data = await json_body(request)
    result, revoked = await auth.change_password(
        request.app[CTX], user['id'], data.get('old_password'),
        data.get('new_password'), ip=request_address(request))
    for user_id in revoked:
        await request.app[DISCONNECT_USER](user_id)
    return web.json_response(result)


async def me(request):
    return web.json_response({'user': await current_user(request)})


async def create_bot(request):
    user = await current_user(request)
    data = await json_body(request)
    result = await auth.create_bot(request.app[CTX], user['id'],
                                   data.get('username'),
                                   data.get('display_name'))
    return web.json_response(result, status=201)


async def rotate_bot_token(request):
    """``POST /api/bots/{username}/token`` (the bot's owner) -> ``{token}``;
    the bot's earlier tokens and the sockets opened with them stop
    working."""
    user = await current_user(request)
    result, bot_id = await auth.rotate_bot_token(
        request.app[CTX], user['id'], request.match_info['username'])
    await request.app[DISCONNECT_USER](bot_id)
    return web.json_response(result)


async def set_bot_webhook(request):
    """``PUT /api/bots/{username}/webhook {url}`` (the bot's owner) ->
    ``{webhook: {url, secret}}``."""
    user = await current_user(request)
    data = await json_body(request)
    webhook = await webhooks.set_webhook(
        request.app[CTX], user['id'], request.match_info['username'],
        data.get('url'))
    return web.json_response({'webhook': webhook})


async def delete_bot_webhook(request):
    user = await current_user(request)
    await webhooks.delete_webhook(request.app[CTX], user['id'],
                                  request.match_info['username'])
    return web.Response(status=204)


async def vapid_key(request):
    await current_user(request)
    return web.json_response(
        {'public_key': request.app[CTX].vapid_public_key})


async def add_push_subscription(request):
    user = await current_user(request)
    data = await json_body(request)
    subscription = await push.subscribe(request.app[CTX], user['id'], data)
    return web.json_response({'subscription': subscription}, status=201)


async def list_push_subscriptions(request):
    user = await current_user(request)
    return web.json_response({'subscriptions': await push.subscriptions(
        request.app[CTX], user['id'])})


async def delete_push_subscription(request):
    user = await current_user(request)
    await push.unsubscribe(request.app[CTX], user['id'],
                           path_int(request, 'subscription_id'))
    return web.Response(status=204)


async def list_rooms(request):
    user = await current_user(request)
    return web.json_response(await rooms.inbox(
        request.app[CTX], user['id'], limit=query_int(request, 'limit'),
        before=request.query.get('before') or None))


async def list_messages(request):
    user = await current_user(request)
    result = await messages.history(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        before=query_int(request, 'before'), after=query_int(request, 'after'),
        limit=query_int(request, 'limit'))
    return web.json_response(result)


async def post_message(request):
    user = await current_user(request)
    data = await json_body(request)
    sent = await messages.send_message(
        request.app[CTX], user['id'], data.get('body'),
        data.get('client_msg_id'), room_id=path_int(request, 'room_id'),
        attachments=data.get('attachments'), reply_to=data.get('reply_to'))
    await request.app[REALTIME].deliver_sent(sent)
    return web.json_response({'message': sent.message},
                             status=201 if sent.created else 200)


async def add_room_members(request):
    """``{members: [username]}`` -> ``{room}`` (the ``add_members``
    event)."""
    user = await current_user(request)
    data = await json_body(request)
    change = await rooms.add_members(request.app[CTX], user['id'],
                                     path_int(request, 'room_id'),
                                     data.get('members'))
    await request.app[REALTIME].group_changed(change)
    return web.json_response({'room': change.room})


async def remove_room_member(request):
    """Remove a member (owner only); your own username leaves the group:
    ``{room}`` either way."""
    user = await current_user(request)
    change = await rooms.remove_member(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        request.match_info['username'])
    await request.app[REALTIME].group_changed(change)
    return web.json_response({'room': change.room})


async def update_room(request):
    """``{name}`` -> ``{room}``: rename a group (owner only)."""
    user = await current_user(request)
    data = await json_body(request)
    change = await rooms.rename_group(request.app[CTX], user['id'],
                                      path_int(request, 'room_id'),
                                      data.get('name'))
    await request.app[REALTIME].group_changed(change)
    return web.json_response({'room': change.room})


async def list_blocks(request):
    """The caller's blocks, newest first (a Postbox addition to the
    contract: clients had no other way to learn them)."""
    user = await current_user(request)
    return web.json_response(
        {'blocks': await rooms.list_blocks(request.app[CTX], user['id'])})


async def search(request):
    """``GET /api/search?q=&room_id=&before=&limit=`` -> ``{results,
    has_more}`` (the ``search`` event)."""
    user = await current_user(request)
    return web.json_response(await search_service.search(
        request.app[CTX], user['id'], request.query.get('q'),
        room_id=query_int(request, 'room_id'),
        before=query_int(request, 'before'),
        limit=query_int(request, 'limit')))


# The OpenAPI document of this API, kept beside the protocol's prose
# (tests/test_openapi.py checks it lists exactly the routes served).
OPENAPI_PATH = Path(__file__).resolve().parents[2] / 'docs' / 'openapi.yaml'


@functools.cache
def _openapi_text() -> str:
    return OPENAPI_PATH.read_text('utf-8')


async def openapi(request):
    """``GET /api/openapi.yaml``: the OpenAPI 3.1 document of the HTTP
    API, no token needed. Read once, off the event loop; 404 when this
    copy of Postbox was installed without its ``docs/``."""
    try:
        text = await asyncio.to_thread(_openapi_text)
    except OSError:
        raise NotFound('the OpenAPI document is not installed') from None
    return web.Response(text=text, content_type='application/yaml')


async def healthz(request):
    """Alive while the process can serve: its own parts run (the store's
    writer thread and reader pool). 503 means restart it."""
    return await _checked(request.app.get(HEALTH_CHECKS, ()), 'liveness')


async def readyz(request):
    """Ready when every dependency (database, disk, Redis) answers."""
    return await _checked(request.app[READY_CHECKS], 'readiness')


# (id of a check list, check name) -> why it failed last, while it fails.
_check_failures = {}


async def _checked(named_checks, what) -> web.Response:
    """Run ``(name, check)`` pairs: a check returns (or returns an
    awaitable of) a truthy value, or raises saying why not. The answer is
    ``{ok, checks: {name: bool}, errors: {name: why}}``, 503 if any
    failed."""
    checks, errors = {}, {}
    for name, check in named_checks:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            checks[name] = bool(result)
        except Exception as exc:  # any failure means not ready
            checks[name] = False
            errors[name] = str(exc) or type(exc).__name__
        # One log line when a check starts failing (or fails differently)
        # and one when it passes again, not one per probe.
        key = (id(named_checks), name)
        reason = None if checks[name] else errors.get(name, 'false')
        if reason != _check_failures.get(key):
            if reason is None:
                _check_failures.pop(key, None)
                log.warning('%s check %s passes again', what, name)
            else:
                _check_failures[key] = reason
                log.warning('%s check %s failed: %s', what, name, reason)
    ok = all(checks.values())
    body = {'ok': ok, 'checks': checks}
    if errors:
        body['errors'] = errors
    return web.json_response(body, status=200 if ok else 503)


def add_routes(app: web.Application):
    app.router.add_post('/api/register', register)
    app.router.add_post('/api/login', login)
    app.router.add_get('/api/me', me)
    app.router.add_post('/api/logout', logout)
    app.router.add_post('/api/token/refresh', refresh_token)
    app.router.add_post('/api/password', change_password)
    app.router.add_post('/api/bots', create_bot)
    app.router.add_post(r'/api/bots/{username}/token', rotate_bot_token)
    app.router.add_put(r'/api/bots/{username}/webhook', set_bot_webhook)
    app.router.add_delete(r'/api/bots/{username}/webhook',
                          delete_bot_webhook)
    app.router.add_get('/api/push/vapid', vapid_key)
    app.router.add_post('/api/push/subscriptions', add_push_subscription)
    app.router.add_get('/api/push/subscriptions', list_push_subscriptions)
    app.router.add_delete(r'/api/push/subscriptions/{subscription_id}',
                          delete_push_subscription)
    app.router.add_get('/api/rooms', list_rooms)
    app.router.add_get(r'/api/rooms/{room_id}/messages', list_messages)
    app.router.add_post(r'/api/rooms/{room_id}/messages', post_message)
    app.router.add_post(r'/api/rooms/{room_id}/members', add_room_members)
    app.router.add_delete(r'/api/rooms/{room_id}/members/{username}',
                          remove_room_member)
    app.router.add_patch(r'/api/rooms/{room_id}', update_room)
    app.router.add_get('/api/blocks', list_blocks)
    app.router.add_get('/api/search', search)
    app.router.add_get('/healthz', healthz)
    app.router.add_get('/readyz', readyz)
    app.router.add_get('/api/openapi.yaml', openapi)
