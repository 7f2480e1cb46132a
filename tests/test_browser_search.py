"""Message search on the demo page in a real Chromium (Playwright) against a
real server: the search box finds a message by a folded word, highlights
the match as text (never as HTML), and a click opens the conversation at
that message, paging back through history to reach it."""
import json
import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.helpers import NO_RATE_LIMITS, ServerProcess, unique_name

ARTIFACTS = Path(__file__).resolve().parent / 'artifacts'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic',
                 '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']
WAIT_MS = 15000
PASSWORD = 'correct horse battery'
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp('browser-search'),
                         env=NO_RATE_LIMITS)
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


def api(server, method, path, token=None, body=None):
    request = urllib.request.Request(
        server.url + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={'Content-Type': 'application/json',
                 **({'Authorization': f'Bearer {token}'} if token else {})})
    with urllib.request.urlopen(request, timeout=15) as resp:
        return json.loads(resp.read())


def test_search_highlights_and_jumps_to_the_message(browser, server):
    bob = api(server, 'POST', '/api/register', body={
        'username': unique_name('bob'), 'password': PASSWORD,
        'display_name': 'Bob Search'})
    context = browser.new_context(viewport={'width': 1100, 'height': 720})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors = []
        page.on('pageerror', lambda exc: errors.append(str(exc)))
        page.on('dialog', lambda d: errors.append(f'dialog: {d.message}'))
        page.on('console', lambda msg: errors.append(msg.text)
                if msg.type == 'error' else None)
        page.goto(server.url + '/')
        page.click('#tab-register')
        page.fill('#auth-username', unique_name('alice'))
        page.fill('#auth-display-name', 'Alice')
        page.fill('#auth-password', PASSWORD)
        page.click('#auth-submit')
        expect(page.locator('#app')).to_be_visible()
        page.fill('#new-dm-username', bob['user']['username'])
        page.click('#new-dm-submit')
        expect(page.locator('#room-title')).to_have_text('Bob Search')
        room_id = int(page.evaluate('location.hash').split('=')[1])

        def say(body):
            api(server, 'POST', f'/api/rooms/{room_id}/messages',
                bob['token'], {'body': body,
                               'client_msg_id': uuid.uuid4().hex})
        say('Viele Grüße aus Köln')
        for i in range(70):  # more than a page of history after it
            say(f'filler {i}')
        say('<img src=x onerror=alert(1)> grüsse <b>bold</b>')
        expect(page.locator('#message-list .msg .body').last).to_have_text(
            '<img src=x onerror=alert(1)> grüsse <b>bold</b>')

        page.fill('#search-input', 'GRUSSE')
        page.press('#search-input', 'Enter')
        results = page.locator('#search-results .search-result')
        expect(results).to_have_count(2)
        expect(page.locator('#search-status')).to_have_text('2 found')
        # Newest first; the markup is text, the match is marked.
        expect(results.nth(0).locator('.search-body')).to_have_text(
            '<img src=x onerror=alert(1)> grüsse <b>bold</b>')
        assert results.nth(0).locator('img, b').count() == 0
        expect(results.nth(0).locator('mark')).to_have_text(['grüsse'])
        expect(results.nth(1).locator('mark')).to_have_text(['Grüße'])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / 'search.png'))

        results.nth(1).click()
        target = page.locator('#message-list .msg').filter(
            has=page.locator('.body', has_text='Viele Grüße aus Köln'))
        expect(target).to_be_in_viewport()
        expect(target).to_have_class(re.compile(r'\bflash\b'))
        page.screenshot(path=str(ARTIFACTS / 'search-jump.png'))

        # No match, and a too-short query, say so.
        page.fill('#search-input', 'nothing like this')
        page.press('#search-input', 'Enter')
        expect(page.locator('#search-status')).to_have_text(
            'No messages found.')
        expect(results).to_have_count(0)
        assert errors == []
    finally:
        context.close()
