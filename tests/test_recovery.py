"""Connection state recovery (PROTOCOL v2) with the official JS client, run
by Node: tests/js/recovery_test.js holds the scenarios, this runs them
against a real server (and restarts it with SIGTERM for one of them); a
Python client checks that sockets that did not opt in see no change."""
import os
import random
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.kit import (FAST_REDIS_ENV, NO_RATE_LIMITS, Client,
                       ServerProcess, pair, start_servers, stop_servers)
from tests.test_js_client import JS_DIR, node_modules  # noqa: F401 fixture

SCRIPT = JS_DIR / 'recovery_test.js'
# Small, so that the tests can go past it.
ENV = {'POSTBOX_RECOVERY_MAX_EVENTS': '6'}


@pytest.fixture
def recovery_server(tmp_path):
    proc = ServerProcess(tmp_path, env=ENV)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


def _node(url, scenario, *more, env=None):
    return subprocess.Popen(['node', str(SCRIPT), url, scenario, *more],
                            cwd=JS_DIR, env={**os.environ, **(env or {})},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(node, server, timeout=150):
    try:
        output, _ = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        node.kill()
        output, _ = node.communicate()
    return output


def test_js_client_recovers_missed_events_before_connect(
        node_modules, recovery_server):  # noqa: F811
    """Drops, two recoveries in a row, a drop before any event, joined
    rooms restored; unknown, too old or too many: recovered false and sync
    has the gap; a revoked token is refused; a plain socket gets no
    offsets."""
    node = _node(recovery_server.url, 'basic')
    output = _finish(node, recovery_server)
    assert node.returncode == 0 and 'PASS' in output, (
        f'recovery_test.js failed:\n{output}\n'
        f'server log:\n{recovery_server.read_log()}')
    # The metrics count them, fallbacks by reason.
    with urllib.request.urlopen(recovery_server.url + '/metrics') as resp:
        text = resp.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith('postbox_recoveries_total{'):
            labels, value = line.rsplit(' ', 1)
            counts[labels] = float(value)
    assert counts['postbox_recoveries_total{outcome="attempted",reason=""}'] \
        == 9, counts
    assert counts['postbox_recoveries_total{outcome="succeeded",reason=""}'] \
        == 6, counts
    for reason in ('unknown_offset', 'too_many', 'too_old'):
        assert counts['postbox_recoveries_total{outcome="fallback",'
                      f'reason="{reason}"}}'] == 1, counts


def test_js_client_recovers_across_a_sigterm_restart(
        node_modules, tmp_path):  # noqa: F811
    server = ServerProcess(tmp_path, env=ENV).start()
    node = _node(server.url, 'restart')
    try:
        lines = []
        for line in node.stdout:
            lines.append(line)
            if line.startswith('RESTART NOW'):
                break
        else:
            pytest.fail('recovery_test.js ended early:\n' + ''.join(lines))
        assert server.stop() == 0, server.read_log()
        server.start()
        node.stdin.write('go\n')
        node.stdin.flush()
        output = ''.join(lines) + _finish(node, server)
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\n'
            f'server log:\n{server.read_log()}')
    finally:
        if node.poll() is None:
            node.kill()
        assert server.stop() == 0, server.read_log()


def test_js_client_recovers_on_another_process(
        node_modules, tmp_path, redis):  # noqa: F811
    """Two processes, one database, one Redis: a socket dropped on one
    recovers on the other (and back), joined room included."""
    servers = start_servers(tmp_path, 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV, **ENV})
    try:
        node = subprocess.Popen(
            ['node', str(SCRIPT), servers[0].url, 'other', servers[1].url],
            cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        output = _finish(node, servers[0])
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\nserver logs:\n' +
            '\n'.join(s.read_log() for s in servers))
    finally:
        assert stop_servers(servers) == [0, 0], \
            [s.read_log() for s in servers]


def test_js_client_chaos_of_drops_misses_nothing_and_gets_nothing_twice(
        node_modules, tmp_path):  # noqa: F811
    """30 s of random drops and reconnects to one process (sessions kept
    in the process) while messages and edits flow: every seq of the room
    arrives, and no event twice."""
    server = ServerProcess(tmp_path, env={
        **NO_RATE_LIMITS, 'POSTBOX_RECOVERY_MAX_EVENTS': '200'}).start()
    try:
        node = _node(server.url, 'chaos', env={'CHAOS_SECONDS': '30'})
        output = _finish(node, server, timeout=240)
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\n'
            f'server log:\n{server.read_log()}')
    finally:
        assert server.stop() == 0, server.read_log()


def test_js_client_chaos_of_drops_restarts_and_switches_across_processes(
        node_modules, tmp_path, redis):  # noqa: F811
    """60 s, two processes with Redis: the receiver's transport drops at
    random and it reconnects to either process, while the test restarts
    the processes with SIGTERM in turn and a partner sends and edits (and
    resends across its own server's restarts). In the end the receiver
    holds every seq of the room once, whether each reconnect recovered or
    fell back to sync."""
    seconds = 60
    servers = start_servers(tmp_path, 2, {
        'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV, **NO_RATE_LIMITS,
        'POSTBOX_RECOVERY_MAX_EVENTS': '200'})
    restarts, failures = [], []
    done = threading.Event()

    def restart_at_random():
        started, turn = time.monotonic(), 0
        while not done.wait(random.uniform(4, 9)) and \
                time.monotonic() - started < seconds - 10:
            server = servers[turn % 2]
            turn += 1
            code = server.stop()
            if code != 0:
                failures.append((server.url, code, server.read_log()))
            server.start()
            restarts.append(server.url)

    restarter = threading.Thread(target=restart_at_random)
    try:
        node = _node(servers[0].url, 'chaos', servers[1].url,
                     env={'CHAOS_SECONDS': str(seconds)})
        restarter.start()
        output = _finish(node, servers[0], timeout=300)
        done.set()
        restarter.join()
        assert node.returncode == 0 and 'PASS' in output, (
            f'recovery_test.js failed:\n{output}\nserver logs:\n' +
            '\n'.join(s.read_log() for s in servers))
        print(output.strip().splitlines()[-2])
        assert not failures, failures
        assert len(restarts) >= 2, restarts
    finally:
        done.set()
        if restarter.is_alive():
            restarter.join()
        assert stop_servers(servers) == [0, 0], \
            [s.read_log() for s in servers]


async def test_offsets_only_for_sockets_that_opt_in(base):
    """An opted-in socket gets each message with a string offset after it
    (and the offset event at connect); a socket that did not opt in gets
    the message alone, so a handler taking one argument keeps working."""
    alice, bob, a, b, room = await pair(base)
    opted = Client(base, b.token)
    await opted.sio.connect(base, auth={'token': b.token, 'recover': True},
                            transports=['websocket'], wait_timeout=10)
    try:
        assert await opted.next('offset', timeout=10) == '0'
        ack = await a.call('send_dm', {'room_id': room['id'], 'body': 'hi',
                                       'client_msg_id': 'r1'})
        assert ack['ok'], ack
        plain = await b.next('message', timeout=10)
        assert plain['body'] == 'hi'
        message, offset = await opted.next('message', timeout=10)
        assert message == plain and offset == '1'
    finally:
        await opted.close()
        await a.close()
        await b.close()
