"""What an operator sees: Prometheus metrics at /metrics, security headers on
every HTTP response, and structured logs without secrets."""
import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit import ServerProcess, connect, http, register, unique_name


async def scrape(base) -> dict:
    """{(sample name, frozenset(labels)): value} from GET /metrics."""
    async with aiohttp.ClientSession() as session:
        async with session.get(base + '/metrics') as resp:
            assert resp.status == 200
            assert resp.content_type == 'text/plain'
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = \
                sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


async def test_metrics_count_sockets_events_store_fanout_and_http(base):
    before = await scrape(base)
    alice, a_token = await register(base)
    bob, b_token = await register(base)
    a = await connect(base, a_token)
    b = await connect(base, b_token)
    room = (await a.call('open_dm', {'username': bob['username']}))['room']
    ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'hi',
                                   'client_msg_id': 'm1'})
    assert ack['ok']
    bad = await a.call('send_dm', {'room_id': room['id'], 'body': 5,
                                   'client_msg_id': 'm2'})
    assert bad['error']['code'] == 'invalid'
    await b.next('message')

    during = await scrape(base)
    assert value(during, 'postbox_connected_sockets') >= 2
    assert value(during, 'postbox_events_total', event='send_dm',
                 outcome='ok') >= value(before, 'postbox_events_total',
                                        event='send_dm', outcome='ok') + 1
    assert value(during, 'postbox_events_total', event='send_dm',
                 outcome='invalid') >= 1
    assert value(during, 'postbox_event_seconds_count', event='send_dm') >= 2
    assert value(during, 'postbox_store_batch_size_count') > \
        value(before, 'postbox_store_batch_size_count')
    assert value(during, 'postbox_store_batch_seconds_count') > 0
    # A dm message goes to its two members.
    assert value(during, 'postbox_message_recipients_sum') >= \
        value(before, 'postbox_message_recipients_sum') + 2
    assert value(during, 'postbox_http_requests_total', method='POST',
                 route='/api/register', status='201') >= 2
    assert value(during, 'postbox_connections_total', outcome='ok') >= 2

    await a.close()
    await b.close()


async def test_metrics_need_no_token_and_count_refusals(base):
    await http(base, 'GET', '/api/me')
    samples = await scrape(base)
    assert value(samples, 'postbox_http_requests_total', method='GET',
                 route='/api/me', status='401') >= 1


@pytest.mark.parametrize('path', ['/healthz', '/api/me', '/metrics',
                                  '/no/such/page', '/'])
async def test_security_headers_on_every_response(base, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path) as resp:
            headers = resp.headers
    assert headers['X-Content-Type-Options'] == 'nosniff'
    assert headers['X-Frame-Options'] == 'DENY'
    assert headers['Referrer-Policy'] == 'no-referrer'
    assert "frame-ancestors 'none'" in headers['Content-Security-Policy']
    assert headers['X-Request-Id']


async def test_demo_page_csp_allows_its_own_scripts_and_websockets(base):
    async with aiohttp.ClientSession() as session:
        async with session.get(base + '/') as resp:
            csp = resp.headers['Content-Security-Policy']
    assert "script-src 'self'" in csp
    assert "connect-src 'self' ws: wss:" in csp
    assert "img-src 'self' blob: data:" in csp


async def test_json_logs_have_connections_and_errors_but_no_secrets(
        tmp_path):
    server = ServerProcess(tmp_path, env={'POSTBOX_LOG_JSON': '1',
                                          'POSTBOX_LOG_LEVEL': 'INFO'})
    server.start()
    base = server.url
    password = 'my secret password 123'
    try:
        alice, a_token = await register(base, password=password)
        bob, _ = await register(base)
        status, login = await http(base, 'POST', '/api/login', json={
            'username': alice['username'], 'password': password})
        assert status == 200
        status, _ = await http(base, 'POST', '/api/login', json={
            'username': alice['username'], 'password': 'wrong ' + password})
        assert status == 401
        a = await connect(base, login['token'])
        body = 'a body that must never be logged ' + unique_name()
        ack = await a.call('send_dm', {'to': bob['username'], 'body': body,
                                       'client_msg_id': 'x'})
        assert ack['ok']
        ack = await a.call('send_dm', {'to': bob['username'], 'body': 7,
                                       'client_msg_id': 'y'})
        assert ack['error']['code'] == 'invalid'
        await a.close()
    finally:
        assert server.stop() == 0
    lines = server.read_log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    connects = [r for r in records if r['message'] == 'connect']
    assert connects and connects[0]['user_id'] == alice['id']
    assert connects[0]['sid'] and connects[0]['ip'] == '127.0.0.1'
    assert any(r['message'] == 'disconnect' and r['user_id'] == alice['id']
               for r in records)
    errors = [r for r in records if 'refused: invalid' in r['message']]
    assert errors and errors[0]['user_id'] == alice['id']
    assert errors[0]['request_id']
    text = server.read_log()
    for secret in (password, a_token, login['token'], body):
        assert secret not in text


async def test_redis_publish_and_listen_failures_are_exported(tmp_path):
    from tests.kit import FAST_REDIS_ENV, RedisProcess
    redis = RedisProcess(tmp_path / 'redis').start()
    server = ServerProcess(tmp_path / 'server', env={
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV})
    server.start()
    base = server.url
    try:
        alice, a_token = await register(base)
        bob, _ = await register(base)
        a = await connect(base, a_token)
        samples = await scrape(base)
        assert ('postbox_redis_publish_failures_total', frozenset()) \
            in samples
        assert value(samples, 'postbox_redis_listen_failures_total') == 0
        redis.stop()
        # Sends still succeed (they are stored); what could not reach
        # Redis is counted.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        failures = 0
        n = 0
        while failures == 0 and loop.time() < deadline:
            n += 1
            ack = await a.call('send_dm', {'to': bob['username'], 'body': 'x',
                                           'client_msg_id': f'r{n}'})
            assert ack['ok'], ack
            samples = await scrape(base)
            failures = (value(samples, 'postbox_redis_publish_failures_total')
                        + value(samples,
                                'postbox_redis_listen_failures_total'))
            if failures == 0:
                await asyncio.sleep(0.1)  # poll interval of the counter
        assert failures > 0
        await a.close()
    finally:
        server.stop()
        redis.stop()
