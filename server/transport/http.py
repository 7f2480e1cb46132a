"""HTTP API views: the same services as Socket.IO, for bots, mobile and
scripts. Errors are JSON ``{error: {code, message}}`` with their status."""
import asyncio
import functools
import inspect
import logging
from pathlib import Path

from aiohttp import web

from server.errors import Invalid, NotFound, PostboxError
from server.services import (auth, groups, inbox, messages, push, rooms,
                             webhooks)
from server.services import search as search_service
from server.transport.http_base import (current_user, json_body,
                                        json_response, path_int,
                                        query_int, request_address)
from server.typedefs import (CTX, DISCONNECT_USER, HEALTH_CHECKS,
                             READY_CHECKS, REALTIME)

log = logging.getLogger(__name__)


async def register(request):
    data = await json_body(request)
    result = await auth.register(request.app[CTX], data.get('username'),
                                 data.get('password'),
                                 data.get('display_name'),
                                 ip=request_address(request))
    return json_response(result, status=201)


async def login(request):
    data = await json_body(request)
    result = await auth.login(request.app[CTX], data.get('username'),
                              data.get('password'),
                              ip=request_address(request))
    return json_response(result)


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
        return json_response({'ok': True})
    for user_id in await auth.revoke_tokens(request.app[CTX], user['id']):
        await request.app[DISCONNECT_USER](user_id)  # the user's bots too
    return json_response({'ok': True})


async def refresh_token(request):
    user = await current_user(request)
    return json_response(
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
    return json_response(result)


async def me(request):
    return json_response({'user': await current_user(request)})


async def create_bot(request):
    user = await current_user(request)
    data = await json_body(request)
    result = await auth.create_bot(request.app[CTX], user['id'],
                                   data.get('username'),
                                   data.get('display_name'))
    return json_response(result, status=201)


async def rotate_bot_token(request):
    """``POST /api/bots/{username}/token`` (the bot's owner) -> ``{token}``;
    the bot's earlier tokens and the sockets opened with them stop
    working."""
    user = await current_user(request)
    result, bot_id = await auth.rotate_bot_token(
        request.app[CTX], user['id'], request.match_info['username'])
    await request.app[DISCONNECT_USER](bot_id)
    return json_response(result)


async def set_bot_webhook(request):
    """``PUT /api/bots/{username}/webhook {url}`` (the bot's owner) ->
    ``{webhook: {url, secret}}``."""
    user = await current_user(request)
    data = await json_body(request)
    webhook = await webhooks.set_webhook(
        request.app[CTX], user['id'], request.match_info['username'],
        data.get('url'))
    return json_response({'webhook': webhook})


async def delete_bot_webhook(request):
    user = await current_user(request)
    await webhooks.delete_webhook(request.app[CTX], user['id'],
                                  request.match_info['username'])
    return web.Response(status=204)


async def vapid_key(request):
    await current_user(request)
    return json_response(
        {'public_key': request.app[CTX].vapid_public_key})


async def add_push_subscription(request):
    user = await current_user(request)
    data = await json_body(request)
    subscription = await push.subscribe(request.app[CTX], user['id'], data)
    return json_response({'subscription': subscription}, status=201)


async def list_push_subscriptions(request):
    user = await current_user(request)
    return json_response({'subscriptions': await push.subscriptions(
        request.app[CTX], user['id'])})


async def delete_push_subscription(request):
    user = await current_user(request)
    await push.unsubscribe(request.app[CTX], user['id'],
                           path_int(request, 'subscription_id'))
    return web.Response(status=204)


async def list_rooms(request):
    user = await current_user(request)
    return json_response(await inbox.inbox(
        request.app[CTX], user['id'], limit=query_int(request, 'limit'),
        before=request.query.get('before') or None))


async def list_messages(request):
    user = await current_user(request)
    result = await messages.history(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        before=query_int(request, 'before'), after=query_int(request, 'after'),
        limit=query_int(request, 'limit'))
    return json_response(result)


async def post_message(request):
    """A message to the room in the path."""
    return await _send(request, in_path=True)


async def post_dm(request):
    """A message to ``room_id`` or to the user ``to`` (the dm with them,
    opened if needed): the ``send_dm`` event over HTTP."""
    return await _send(request, in_path=False)


async def _send(request, in_path):
    user = await current_user(request)  # first: 401 before anything else
    data = await json_body(request)
    if in_path:
        room_id, to = path_int(request, 'room_id'), None
    else:
        room_id, to = data.get('room_id'), data.get('to')
    sent = await request.app[REALTIME].send(messages.send_message(
        request.app[CTX], user['id'], data.get('body'),
        data.get('client_msg_id'), room_id=room_id, to=to,
        attachments=data.get('attachments'), reply_to=data.get('reply_to')))
    return json_response({'message': sent.message},
                             status=201 if sent.created else 200)


async def add_room_members(request):
    """``{members: [username]}`` -> ``{room}`` (the ``add_members``
    event)."""
    user = await current_user(request)
    data = await json_body(request)
    return await _group_changed(request, await groups.add_members(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        data.get('members')))


async def remove_room_member(request):
    """Remove a member (owner only); your own username leaves the group:
    ``{room}`` either way."""
    user = await current_user(request)
    return await _group_changed(request, await groups.remove_member(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        request.match_info['username']))


async def get_room(request):
    """``{room}``: one room of the caller's, by id (members, name, owner,
    ``last_seq``); 403 for a room they are not in."""
    user = await current_user(request)
    ctx = request.app[CTX]
    info = await rooms.member_room(ctx, user['id'],
                                   path_int(request, 'room_id'))
    return json_response({'room': await rooms.room_payload(ctx, info)})


async def update_room(request):
    """``{name}`` -> ``{room}``: rename a group (owner only)."""
    user = await current_user(request)
    data = await json_body(request)
    return await _group_changed(request, await groups.rename_group(
        request.app[CTX], user['id'], path_int(request, 'room_id'),
        data.get('name')))


async def _group_changed(request, change) -> web.Response:
    """Tell the members (old and new) and answer ``{room}``."""
    await request.app[REALTIME].group_changed(change)
    return json_response({'room': change.room})


async def list_blocks(request):
    """The caller's blocks, newest first (a Postbox addition to the
    contract: clients had no other way to learn them)."""
    user = await current_user(request)
    return json_response(
        {'blocks': await rooms.list_blocks(request.app[CTX], user['id'])})


async def search(request):
    """``GET /api/search?q=&room_id=&before=&limit=`` -> ``{results,
    has_more}`` (the ``search`` event)."""
    user = await current_user(request)
    if 'q' not in request.query:
        raise Invalid('q: the words to search for')
    return json_response(await search_service.search(
        request.app[CTX], user['id'], request.query['q'],
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
    failed. These routes need no token: ``why`` is Postbox's own words
    (a ``PostboxError``) or only the exception's type; anything a driver
    says (hosts, users) goes to the log."""
    checks, errors, details = {}, {}, {}
    for name, check in named_checks:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            checks[name] = bool(result)
        except Exception as exc:  # any failure means not ready
            checks[name] = False
            details[name] = str(exc) or type(exc).__name__
            errors[name] = details[name] if isinstance(exc, PostboxError) \
                else type(exc).__name__
        # One log line when a check starts failing (or fails differently)
        # and one when it passes again, not one per probe.
        key = (id(named_checks), name)
        reason = None if checks[name] else details.get(name, 'false')
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
    return json_response(body, status=200 if ok else 503)


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
    app.router.add_post('/api/messages', post_dm)
    app.router.add_get(r'/api/rooms/{room_id}/messages', list_messages)
    app.router.add_post(r'/api/rooms/{room_id}/messages', post_message)
    app.router.add_post(r'/api/rooms/{room_id}/members', add_room_members)
    app.router.add_delete(r'/api/rooms/{room_id}/members/{username}',
                          remove_room_member)
    app.router.add_get(r'/api/rooms/{room_id}', get_room)
    app.router.add_patch(r'/api/rooms/{room_id}', update_room)
    app.router.add_get('/api/blocks', list_blocks)
    app.router.add_get('/api/search', search)
    app.router.add_get('/healthz', healthz)
    app.router.add_get('/readyz', readyz)
    app.router.add_get('/api/openapi.yaml', openapi)
