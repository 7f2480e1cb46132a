"""What every HTTP view shares: the middlewares (request ids and metrics,
the one error path), the security headers of every response, and the
helpers that read a request (JSON body, bearer token, ids in the path)."""
import asyncio
import functools
import logging

from aiohttp import web

from server import fastjson
from server.errors import Invalid, NotFound, PostboxError, TooSlow, \
    Unauthorized
from server.logs import new_request_id, request_id
from server.metrics import METRICS, route_name
from server.services import auth
from server.transport.addresses import client_address
from server.transport.json_depth import deeper_than
from server.typedefs import CTX

log = logging.getLogger(__name__)

# The demo page loads only its own scripts and styles; it talks to this
# server over Socket.IO (ws:/wss:) and shows uploaded images as blobs.
DEMO_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' "
            "'unsafe-inline'; connect-src 'self' ws: wss:; "
            "img-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")
# API answers are data, never a page to render or frame.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def json_response(data, status=200, **kwargs) -> web.Response:
    """``web.json_response`` encoded by orjson (``server/fastjson.py``):
    the stdlib encoder was a tenth of an HTTP send's event-loop time.
    The body is orjson's UTF-8 as it is: a str in between (decoded, then
    encoded back by aiohttp) cost more than serializing a big inbox."""
    return web.Response(body=fastjson.dumps_bytes(data), status=status,
                        content_type='application/json', charset='utf-8',
                        **kwargs)


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
    headers = error.http_headers()
    if getattr(error, 'retry_after', None) is not None:
        headers['Retry-After'] = str(max(1, round(error.retry_after)))
    return json_response({'error': error.to_dict()},
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


# The status counted for a request whose client hung up before the
# answer (nginx's "client closed request"); nothing is sent.
CLIENT_GONE = 499


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
        response = json_response(
            {'error': {'code': code, 'message': exc.reason}},
            status=exc.status)
        if 'Allow' in exc.headers:  # a 405 says which methods are
            response.headers['Allow'] = exc.headers['Allow']
        return response
    except ConnectionResetError:
        # The client went away mid-request (aiohttp's "Connection lost"):
        # nobody to answer, not a fault of ours. An answer nobody reads,
        # counted as nginx counts it; re-raised, aiohttp would log a
        # traceback per hang-up.
        log.debug('HTTP %s %s: the client went away', request.method,
                  route_name(request))
        return web.Response(status=CLIENT_GONE)
    except Exception:
        log.exception('HTTP %s %s failed', request.method, route_name(request))
        return json_response(
            {'error': {'code': 'internal', 'message': 'internal error'}},
            status=500)


async def json_body(request) -> dict:
    """The request's JSON object. Invalid (400) when the body is not
    JSON, is nested deeper than ``json_max_depth`` (too deep for the
    parser, RecursionError, included) or is not an object."""
    seconds = request.app[CTX].config.attachment_upload_idle_seconds
    try:
        async with asyncio.timeout(seconds):
            raw = await request.read()
    except TimeoutError:
        raise TooSlow(f'the request body did not come within {seconds:g} s') \
            from None
    try:  # JSON is UTF-8, whatever charset the Content-Type names
        data = fastjson.loads(raw)
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


# More digits than any 64-bit integer has (int() refuses past 4,300).
MAX_DIGITS = 19


def _decimal(text):
    """``text`` as an int if it is written as one in ASCII digits (an
    optional minus first), else None. Python's int() also takes "1_0",
    " 1", "+1" and other scripts' digits ("１"): one id, many URLs."""
    digits = text[1:] if text[:1] == '-' else text
    if not (digits.isascii() and digits.isdigit()) or \
            len(digits) > MAX_DIGITS:
        return None
    return int(text)


def query_int(request, name):
    value = request.query.get(name)
    if value is None or value == '':
        return None
    number = _decimal(value)
    if number is None:
        raise Invalid(f'{name} must be an integer')
    return number


def path_int(request, name):
    value = _decimal(request.match_info[name])
    if value is None or not 0 < value < 2**63:
        raise NotFound('not found')  # ids are positive 64-bit integers
    return value


# Outermost first. Websocket handshakes skip both: see websockets_pass.
MIDDLEWARES = [websockets_pass(metrics_middleware),
               websockets_pass(errors_middleware)]
