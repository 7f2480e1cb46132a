"""What the browser tests share: a headless Chromium driven by Playwright,
pages that record their errors, and the steps a person takes on the demo
page (sign up, open a dm, send). The test modules import the ``browser``
and ``people`` fixtures from here and define their own ``server``."""
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.helpers import ServerProcess, unique_name

# Every run writes its screenshots here; *.png in it is gitignored, so a
# test run leaves the work tree clean.
ARTIFACTS = Path(__file__).resolve().parent / 'artifacts'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic',
                 '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
WAIT_MS = 15000
PASSWORD = 'correct horse battery'
VIEWPORT = {'width': 1100, 'height': 720}
# The machine may be busy with other tests: be patient, never sleep.
expect.set_options(timeout=WAIT_MS)


def serve(tmp_path_factory, name, env):
    """A server for one test module (use from a module-scoped fixture)."""
    proc = ServerProcess(tmp_path_factory.mktemp(name), env=env)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


@pytest.fixture(scope='module')
def browser():
    executable = shutil.which('chromium')
    assert executable, 'chromium is installed by tests/run.sh'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(context, url):
    """A page of ``context`` at ``url`` that records page errors, dialogs
    (``page.errors``) and console errors (``page.console_errors``: a CSP
    violation or a missing file shows up there)."""
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.errors = []
    page.console_errors = []
    page.on('pageerror', lambda exc: page.errors.append(str(exc)))
    page.on('dialog', lambda d: page.errors.append(f'dialog: {d.message}'))
    page.on('console', lambda msg: page.console_errors.append(msg.text)
            if msg.type == 'error' else None)
    page.goto(url + '/')
    return page


@pytest.fixture
def people(browser, server):
    """Returns a function making a new person: their own browser context
    (own storage) with the page open at the server. Keyword arguments go
    to the context; ``init_script`` is run in every page before its own."""
    contexts = []

    def person(init_script=None, **options):
        context = browser.new_context(viewport=VIEWPORT, **options)
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        return open_page(context, server.url)

    yield person
    for context in contexts:
        context.close()


def sign_up(page, username, display_name):
    page.click('#tab-register')
    page.fill('#auth-username', username)
    page.fill('#auth-display-name', display_name)
    page.fill('#auth-password', PASSWORD)
    page.click('#auth-submit')
    expect(page.locator('#app')).to_be_visible()
    expect(page.locator('#me-name')).to_have_text(display_name)
    expect(page.locator('#banner')).to_be_hidden()


def open_dm(page, username, title):
    page.fill('#new-dm-username', username)
    page.click('#new-dm-submit')
    expect(page.locator('#room-title')).to_have_text(title)


def open_room_id(page):
    """The id of the room on screen (from the page's #room=<id>)."""
    return int(re.fullmatch(r'#room=(\d+)', page.evaluate('location.hash'))[1])


def send(page, text):
    page.fill('#composer-input', text)
    page.press('#composer-input', 'Enter')


def pair(people):
    """Two signed-up people, Alice with the dm to Bob open."""
    alice, bob = people(), people()
    a_name, b_name = unique_name('alice'), unique_name('bob')
    sign_up(alice, a_name, 'Alice Martin')
    sign_up(bob, b_name, 'Bob Chen')
    open_dm(alice, b_name, 'Bob Chen')
    return alice, bob, a_name, b_name


def sync_calls(page):
    """How many `sync` calls the page's connection made (its modules are
    the page's own instances: an import from the page shares them)."""
    return page.evaluate("""async () => {
        const {page} = await import('/static/page.js');
        return page.conn.syncPages;
    }""")


def api(server, method, path, token=None, body=None):
    """One HTTP API call from the test itself; returns the JSON answer."""
    request = urllib.request.Request(
        server.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={'Content-Type': 'application/json',
                 **({'Authorization': f'Bearer {token}'} if token else {})})
    with urllib.request.urlopen(request, timeout=15) as resp:
        data = resp.read()
        return json.loads(data) if data else None


def poll(page, expression, until, timeout_ms=WAIT_MS):
    """Evaluates the (possibly async) ``expression`` in ``page`` every
    50 ms until ``until(value)`` holds; returns that value. Playwright's
    wait_for_function cannot wait on a Promise: it takes the Promise
    itself as truthy and returns at once."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        value = page.evaluate(expression)
        if until(value):
            return value
        assert time.monotonic() < deadline, (
            f'still {value!r} after {timeout_ms} ms: {expression}')
        page.wait_for_timeout(50)


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))
