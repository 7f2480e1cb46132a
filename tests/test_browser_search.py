"""Message search on the demo page in a real Chromium (Playwright) against a
real server: the search box finds a message by a folded word, highlights
the match as text (never as HTML), and a click opens the conversation at
that message, paging back through history to reach it."""
import re
import uuid

import pytest
from playwright.sync_api import expect

from tests.browser_kit import (  # noqa: F401 (browser, people: fixtures)
    PASSWORD, api, browser, open_dm, open_room_id, people, serve, shot,
    sign_up)
from tests.helpers import NO_RATE_LIMITS, unique_name


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, 'browser-search', NO_RATE_LIMITS)


def test_search_highlights_and_jumps_to_the_message(people, server):
    bob = api(server, 'POST', '/api/register', body={
        'username': unique_name('bob'), 'password': PASSWORD,
        'display_name': 'Bob Search'})
    page = people()
    sign_up(page, unique_name('alice'), 'Alice')
    open_dm(page, bob['user']['username'], 'Bob Search')
    room_id = open_room_id(page)

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
    shot(page, 'search.png')

    results.nth(1).click()
    target = page.locator('#message-list .msg').filter(
        has=page.locator('.body', has_text='Viele Grüße aus Köln'))
    expect(target).to_be_in_viewport()
    expect(target).to_have_class(re.compile(r'\bflash\b'))
    shot(page, 'search-jump.png')

    # No match, and a too-short query, say so.
    page.fill('#search-input', 'nothing like this')
    page.press('#search-input', 'Enter')
    expect(page.locator('#search-status')).to_have_text(
        'No messages found.')
    expect(results).to_have_count(0)
    assert page.errors == [] and page.console_errors == []
