"""docs/openapi.yaml: served by the app, a valid OpenAPI 3.1 document,
listing exactly the routes the app serves, and answers that match it;
docs/protocol.md: a section for every Socket.IO event the app handles."""
import re
import uuid

import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from server.app import SIO, create_app
from server.config import load_config
from tests.kit import ROOT, http, pair, register

METHODS = {'get', 'put', 'post', 'delete', 'patch', 'options', 'head',
           'trace'}
# Served by the app but not part of the HTTP API: the Socket.IO endpoint
# (docs/protocol.md) and the demo page's files.
UNDOCUMENTED = {'/socket.io/'}


async def fetch_document(base) -> dict:
    status, text = await http(base, 'GET', '/api/openapi.yaml')
    assert status == 200, text
    return yaml.safe_load(text)


def documented(document) -> set:
    return {(method.upper(), path)
            for path, item in document['paths'].items()
            for method in item if method in METHODS}


def build_app(tmp_path):
    """The app as the server builds it (nothing started)."""
    return create_app(load_config(env={}, data_dir=str(tmp_path / 'data'),
                                  secret='s' * 40))


def served(tmp_path) -> set:
    """(method, path) of every route of an app built as the server builds
    it. HEAD routes that aiohttp adds beside each GET are left out (the
    document says every GET answers HEAD), as are the demo's static files
    and UNDOCUMENTED."""
    app = build_app(tmp_path)
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info()
        if 'directory' in info:  # add_static: the demo's files
            continue
        path = route.resource.canonical
        if path not in UNDOCUMENTED:
            routes.add((route.method, path))
    return {(m, p) for m, p in routes
            if not (m == 'HEAD' and ('GET', p) in routes)}


def check(document, path, method, status, body):
    """Assert that ``body`` has the shape the document gives the
    ``status`` answer of ``method path``."""
    responses = document['paths'][path][method]['responses']
    assert str(status) in responses, (path, method, status, body)
    answer = responses[str(status)]
    if '$ref' in answer:
        answer = document['components']['responses'][
            answer['$ref'].rsplit('/', 1)[1]]
    schema = answer['content']['application/json']['schema']
    # Resolve '#/components/...' inside a schema that carries them.
    OAS31Validator({**schema, 'components': document['components']}
                   ).validate(body)


async def test_document_is_served_and_valid(base):
    status, text = await http(base, 'GET', '/api/openapi.yaml')
    assert status == 200  # no token needed
    document = yaml.safe_load(text)
    validate_spec(document)  # raises on any structural error
    assert document['openapi'].startswith('3.1')
    assert document == yaml.safe_load(
        (ROOT / 'docs' / 'openapi.yaml').read_text())


async def test_documented_routes_are_the_routes_served(base, tmp_path):
    document = await fetch_document(base)
    routes = served(tmp_path)
    assert ('GET', '/api/openapi.yaml') in routes
    undocumented = routes - documented(document)
    assert not undocumented, f'routes not in docs/openapi.yaml: ' \
        f'{sorted(undocumented)}'
    unserved = documented(document) - routes
    assert not unserved, f'documented routes the app lacks: {sorted(unserved)}'
    # And the running server answers each of them (without a token: a
    # handler's own answer, never aiohttp's 404 or 405 for no route).
    for method, path in sorted(documented(document)):
        url = path.replace('{room_id}', '1').replace(
            '{attachment_id}', '1').replace('{subscription_id}', '1').replace(
            '{username}', 'nobody')
        status, body = await http(base, method, url)
        assert status != 405, (method, path, body)
        if status == 404:
            assert body['error']['message'] != 'Not Found', (method, path)


async def test_answers_have_the_documented_shapes(base):
    document = await fetch_document(base)
    alice, bob, a, b, room = await pair(base)
    try:
        _, token = await register(base)
        status, body = await http(base, 'POST', '/api/login', json={
            'username': alice['username'], 'password': 'correct horse'})
        check(document, '/api/login', 'post', status, body)
        ta = body['token']
        status, body = await http(base, 'GET', '/api/me', token=ta)
        check(document, '/api/me', 'get', status, body)
        status, body = await http(
            base, 'POST', f'/api/rooms/{room["id"]}/messages', token=ta,
            json={'body': 'hello', 'client_msg_id': str(uuid.uuid4())})
        check(document, '/api/rooms/{room_id}/messages', 'post', status,
              body)
        assert status == 201
        status, body = await http(
            base, 'POST', '/api/messages', token=ta,
            json={'to': bob['username'], 'body': 'by name',
                  'client_msg_id': str(uuid.uuid4())})
        check(document, '/api/messages', 'post', status, body)
        assert status == 201 and body['message']['room_id'] == room['id']
        status, body = await http(base, 'GET', '/api/rooms', token=ta)
        check(document, '/api/rooms', 'get', status, body)
        assert body['rooms'][0]['last_message']['body'] == 'by name'
        status, body = await http(base, 'GET', '/api/rooms?limit=1',
                                  token=ta)
        check(document, '/api/rooms', 'get', status, body)
        status, body = await http(
            base, 'GET', f'/api/rooms/{room["id"]}/messages?limit=10',
            token=ta)
        check(document, '/api/rooms/{room_id}/messages', 'get', status,
              body)
        status, body = await http(base, 'GET', '/api/search?q=hello',
                                  token=ta)
        check(document, '/api/search', 'get', status, body)
        status, body = await http(base, 'GET', '/api/blocks', token=ta)
        check(document, '/api/blocks', 'get', status, body)
        # The other room's member: forbidden, as documented.
        status, body = await http(
            base, 'GET', f'/api/rooms/{room["id"]}/messages', token=token)
        assert status == 403
        check(document, '/api/rooms/{room_id}/messages', 'get', status,
              body)
        status, body = await http(base, 'GET', '/api/me')
        assert status == 401
        check(document, '/api/me', 'get', status, body)
        status, body = await http(base, 'POST', '/api/register',
                                  json={'username': 'x'})
        assert status == 400
        check(document, '/api/register', 'post', status, body)
        for path in ('/healthz', '/readyz'):
            status, body = await http(base, 'GET', path)
            check(document, path, 'get', status, body)
    finally:
        await a.close()
        await b.close()


def test_protocol_documents_every_event(tmp_path):
    """docs/protocol.md has a ``### `event` `` section for every event
    the Socket.IO server handles (connect, disconnect and the catch-all
    for unknown events aside)."""
    handled = set(build_app(tmp_path)[SIO].handlers['/']) - {
        'connect', 'disconnect', '*'}
    text = (ROOT / 'docs' / 'protocol.md').read_text()
    sections = set()
    for heading in re.findall(r'^### (.+)$', text, re.M):
        sections.update(re.findall(r'`([a-z_]+)`', heading))
    assert 'send_dm' in handled and 'add_members' in handled
    missing = handled - sections
    assert not missing, f'events without a section in docs/protocol.md: ' \
        f'{sorted(missing)}'
