"""The official JavaScript client (socket.io-client 4.x, run by Node) against
a real server: tokens, dm, acks, live messages, a dropped receiver catching up
with paged ``sync``, and a long-polling-only client. The scenario itself is
tests/js/client_test.js; this runs it and shows its output on failure."""
import os
import re
import shutil
import subprocess

import pytest

from tests.kit import ROOT, ServerProcess

JS_DIR = ROOT / 'tests' / 'js'


@pytest.fixture(scope='module')
def node_modules():
    """Install tests/js's packages (socket.io-client) when they are missing,
    as tests/run.sh does."""
    assert shutil.which('node'), 'node is required (tests/run.sh installs it)'
    if not (JS_DIR / 'node_modules' / 'socket.io-client').is_dir():
        npm = shutil.which('npm')
        assert npm, 'npm is required (tests/run.sh installs it)'
        done = subprocess.run([npm, 'install', '--no-audit', '--no-fund'],
                              cwd=JS_DIR, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return JS_DIR / 'node_modules'


@pytest.fixture(scope='module')
def small_pages_server(tmp_path_factory):
    """A server whose ``sync`` pages hold 5 events, so catching up 13 missed
    events must page while has_more."""
    proc = ServerProcess(tmp_path_factory.mktemp('postbox-js'), env={
        'POSTBOX_SYNC_PAGE_SIZE': '5'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


def run_client_test(url, env=None, timeout=120):
    done = subprocess.run(['node', str(JS_DIR / 'client_test.js'), url],
                          cwd=JS_DIR, capture_output=True, text=True,
                          timeout=timeout, env=env)
    return done.returncode, done.stdout + done.stderr


def test_official_js_client(node_modules, small_pages_server):
    env = dict(os.environ, MISSED='12', MIN_SYNC_PAGES='3')
    code, output = run_client_test(small_pages_server.url, env)
    assert code == 0, (f'client_test.js failed:\n{output}\n'
                       f'server log:\n{small_pages_server.read_log()}')
    assert 'PASS' in output
    assert 'caught up 13 events in 3 sync page(s)' in output, output


def test_demo_page_connection_under_node(node_modules, small_pages_server):
    """client_demo/static/connection.js and store.js (the page's own code)
    under Node: live messages, a drop, missed messages and edits, a send
    queued offline; the page's state ends with exactly the server's
    messages, caught up by paged ``sync`` and by recovery."""
    done = subprocess.run(['node', str(JS_DIR / 'connection_test.mjs'),
                           small_pages_server.url],
                          cwd=JS_DIR, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, MISSED='12'))
    output = done.stdout + done.stderr
    assert done.returncode == 0, (f'connection_test.mjs failed:\n{output}\n'
                                  f'server log:\n{small_pages_server.read_log()}')
    assert 'PASS' in output


def test_demo_page_store_reducers():
    """client_demo/static/store.js alone under Node (node:test, no server):
    unread counting, newest versions, inbox paging, mutes, rooms left."""
    assert shutil.which('node'), 'node is required (tests/run.sh installs it)'
    done = subprocess.run(['node', '--test', 'store_test.mjs'], cwd=JS_DIR,
                          capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Every test of the file ran and passed (none skipped or left out).
    tests = re.search(r'^# tests (\d+)$', output, re.M)
    assert tests and int(tests.group(1)) >= 7, output
    assert f'# pass {tests.group(1)}' in output and '# fail 0' in output, \
        output
