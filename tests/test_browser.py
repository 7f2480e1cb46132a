"""The demo page in a real Chromium (driven by Playwright) against a real
server: two browser contexts are two people messaging each other."""
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import expect

from tests.browser_kit import (  # noqa: F401 (browser, people: fixtures)
    ARTIFACTS, PASSWORD, WAIT_MS, browser, open_dm, pair, people, send, serve,
    shot, sign_up, sync_calls)
from tests.helpers import NO_RATE_LIMITS, unique_name

DOCS = Path(__file__).resolve().parent.parent / 'docs'
# docs/screenshot.png (the README's picture) is tracked: it is refreshed from
# the showcase shot only when POSTBOX_UPDATE_SCREENSHOT=1 is set, e.g.
# POSTBOX_UPDATE_SCREENSHOT=1 python -m pytest tests/test_browser.py -k product
UPDATE_SCREENSHOT = os.environ.get('POSTBOX_UPDATE_SCREENSHOT') == '1'


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    # No per-user rate limits: the history test sends many messages fast.
    yield from serve(tmp_path_factory, 'browser', NO_RATE_LIMITS)


def bubbles(page):
    return page.locator('#message-list .msg .body')


def message(page, text):
    """The message whose own body is ``text`` (not a reply quoting it)."""
    return page.locator('#message-list .msg').filter(
        has=page.locator('.body', has_text=re.compile(f'^{re.escape(text)}$')))


def message_action(page, text, action):
    """Hovers the message and clicks one of its actions (react-open, reply,
    edit, delete)."""
    msg = message(page, text)
    msg.hover()
    msg.locator(f'.actions button.{action}').click()
    return msg


def seed(page, room_id, texts):
    """Sends messages through the HTTP API from the page, with its token."""
    page.evaluate("""async ([roomId, texts]) => {
        const token = localStorage.getItem('postbox.token');
        for (const [i, body] of texts.entries()) {
            const res = await fetch(`/api/rooms/${roomId}/messages`, {
                method: 'POST',
                headers: {'Authorization': `Bearer ${token}`,
                          'Content-Type': 'application/json'},
                body: JSON.stringify({body, client_msg_id: `seed-${roomId}-${i}`})});
            if (res.status !== 201) throw new Error(await res.text());
        }
    }""", [room_id, texts])


def png_bytes(width=300, height=190):
    """A small sunset picture."""
    image = Image.new('RGB', (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(255 - 60 * t),
                                               int(150 - 90 * t),
                                               int(90 + 80 * t)))
    draw.ellipse([width * .55, height * .35, width * .55 + 70,
                  height * .35 + 70], fill=(255, 226, 120))
    draw.polygon([(0, height), (0, height * .7), (width * .3, height * .55),
                  (width * .6, height * .75), (width, height * .6),
                  (width, height)], fill=(60, 40, 90))
    out = io.BytesIO()
    image.save(out, 'PNG')
    return out.getvalue()


def test_live_dm_typing_seen_and_reload(people):
    alice, bob, a_name, b_name = pair(people)
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(alice.locator('#room-status')).to_contain_text('Online')

    send(alice, 'Hi Bob! Are we still on for lunch?')
    # Bob has not opened the conversation: it shows up in his inbox, unread.
    item = bob.locator('.inbox-item', has_text='Alice Martin')
    expect(item.locator('.badge')).to_have_text('1')
    expect(item.locator('.inbox-preview')).to_have_text(
        'Hi Bob! Are we still on for lunch?')
    expect(item.locator('.dot')).to_have_class('dot online')
    shot(bob, 'inbox-unread.png')

    item.click()
    expect(bubbles(bob)).to_have_text(['Hi Bob! Are we still on for lunch?'])
    expect(item.locator('.badge')).to_have_count(0)
    # Bob saw it: Alice gets the read receipt under her message.
    expect(alice.locator('.msg.mine .seen')).to_have_text('Seen')

    # Bob types: Alice sees the indicator, which goes when he sends.
    bob.locator('#composer-input').press_sequentially('Sure, 12:30')
    expect(alice.locator('#typing')).to_have_text('Bob Chen is typing…')
    bob.press('#composer-input', 'Enter')
    expect(alice.locator('#typing')).to_have_text('')
    expect(bubbles(alice)).to_have_text(
        ['Hi Bob! Are we still on for lunch?', 'Sure, 12:30'])
    # The sender's own copy arrives twice (ack and event): shown once.
    expect(bubbles(bob)).to_have_text(
        ['Hi Bob! Are we still on for lunch?', 'Sure, 12:30'])

    # Typing stops when Bob leaves the box without sending.
    bob.locator('#composer-input').press_sequentially('hmm')
    expect(alice.locator('#typing')).to_have_text('Bob Chen is typing…')
    bob.locator('#composer-input').blur()
    expect(alice.locator('#typing')).to_have_text('')
    bob.fill('#composer-input', '')

    # Markup in a message is text, never HTML.
    evil = '<img src=x onerror=alert(1)> <b>bold?</b>'
    send(alice, evil)
    expect(bubbles(bob).last).to_have_text(evil)
    assert bob.locator('#message-list .body img, #message-list .body b') \
        .count() == 0
    send(bob, 'See you there!')
    expect(bubbles(alice).last).to_have_text('See you there!')
    expect(bob.locator('.msg.mine .seen')).to_have_text('Seen')
    shot(alice, 'conversation.png')

    # Reload: the history is still there, the conversation still open.
    alice.reload()
    expect(bubbles(alice)).to_have_text(
        ['Hi Bob! Are we still on for lunch?', 'Sure, 12:30', evil,
         'See you there!'])
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []


def test_edit_and_delete_own_messages(people):
    alice, bob, a_name, b_name = pair(people)
    send(alice, 'Meeting at 3')
    send(alice, 'Bring the slides')
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob)).to_have_text(['Meeting at 3', 'Bring the slides'])

    first = alice.locator('.msg.mine', has_text='Meeting at 3')
    first.hover()
    first.locator('button.edit').click()
    expect(alice.locator('#editing')).to_be_visible()
    alice.fill('#composer-input', 'Meeting at 4')
    alice.press('#composer-input', 'Enter')
    expect(bubbles(bob).first).to_have_text('Meeting at 4')
    expect(bob.locator('.msg').first.locator('.meta')).to_contain_text(
        'edited')

    second = alice.locator('.msg.mine', has_text='Bring the slides')
    second.hover()
    # It asks first (the kit records the dialog: taken out below).
    asked = []
    alice.once('dialog', lambda d: asked.append(d.message) or d.accept())
    second.locator('button.delete').click()
    expect(bubbles(bob).last).to_have_text('This message was deleted')
    expect(bob.locator('.msg.deleted')).to_have_count(1)
    assert asked == ['Delete this message for everyone?']
    alice.errors.remove(f'dialog: {asked[0]}')
    # Only one's own messages can be changed.
    expect(bob.locator('.msg button.edit')).to_have_count(0)
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []

    # Bob closes his browser: within the grace period Alice sees him go.
    expect(alice.locator('#room-dot')).to_have_class('dot online')
    bob.context.close()
    expect(alice.locator('#room-dot')).to_have_class('dot', timeout=30000)
    expect(alice.locator('#room-status')).to_contain_text('Last seen')
    expect(alice.locator('.inbox-item .dot')).to_have_class('dot')


def test_picture_and_file_attachments(people, tmp_path):
    alice, bob, a_name, b_name = pair(people)
    picture = tmp_path / 'sunset.png'
    picture.write_bytes(png_bytes())
    alice.set_input_files('#file-input', str(picture))
    expect(alice.locator('#pending-files li.ready')).to_have_text('sunset.png×')
    alice.fill('#composer-input', 'Look at this')
    alice.press('#composer-input', 'Enter')

    # Bob opens the dm and sees the picture inline (fetched with his token).
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    image = bob.locator('#message-list img.att-image')
    expect(image).to_have_attribute('src', re.compile(r'^blob:'))
    bob.wait_for_function(
        "() => { const i = document.querySelector('#message-list img.att-image');"
        " return i && i.complete && i.naturalWidth > 0; }", timeout=WAIT_MS)
    expect(bubbles(bob).last).to_have_text('Look at this')

    # Any other file is a download link.
    notes = tmp_path / 'notes.txt'
    notes.write_text('agenda: 1. lunch 2. slides\n')
    alice.set_input_files('#file-input', str(notes))
    expect(alice.locator('#pending-files li.ready')).to_have_count(1)
    alice.click('#send')
    link = bob.locator('#message-list a.att-file')
    expect(link.locator('.att-name')).to_have_text('notes.txt')
    with bob.expect_download() as download:
        link.click()
    path = download.value.path()
    assert Path(path).read_text() == 'agenda: 1. lunch 2. slides\n'
    assert download.value.suggested_filename == 'notes.txt'
    shot(bob, 'attachments.png')
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []


def test_offline_then_catch_up(people, server):
    alice, bob, a_name, b_name = pair(people)
    send(alice, 'before the outage')
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob)).to_have_text(['before the outage'])

    # Bob's network goes away; the server restarts meanwhile, so his old
    # connection is certainly gone and he can only catch up through sync.
    bob.context.set_offline(True)
    server.stop()
    server.start()
    expect(bob.locator('#banner')).to_be_visible()
    expect(bob.locator('#banner')).to_have_text('Offline, reconnecting…')
    expect(alice.locator('#banner')).to_be_hidden(timeout=30000)
    send(alice, 'sent while you were away')
    send(alice, 'and one more')
    expect(alice.locator('.msg.mine .meta').last).not_to_have_text('Sending…')
    shot(bob, 'offline.png')
    assert bob.locator('#banner').is_visible()
    expect(bubbles(bob)).to_have_text(['before the outage'])

    # Bob writes while offline: queued, sent once he is back.
    send(bob, 'typed on the train')
    expect(bob.locator('.msg.pending .meta')).to_have_text('Sending…')

    bob.context.set_offline(False)
    expect(bob.locator('#banner')).to_be_hidden(timeout=30000)
    expect(bubbles(bob)).to_have_text(
        ['before the outage', 'sent while you were away', 'and one more',
         'typed on the train'])
    expect(bubbles(alice)).to_have_text(
        ['before the outage', 'sent while you were away', 'and one more',
         'typed on the train'])
    expect(bob.locator('.msg.pending')).to_have_count(0)
    # Live again after the catch-up.
    send(alice, 'welcome back')
    expect(bubbles(bob).last).to_have_text('welcome back')
    expect(alice.locator('.msg.mine .seen')).to_have_text('Seen')
    # The outage logs failed requests; nothing else may go wrong.
    assert bob.errors == [] and alice.errors == []
    for page in (alice, bob):
        assert not [e for e in page.console_errors if 'Security Policy' in e]


def test_history_loads_older_pages_on_scroll_up(people):
    alice, bob, a_name, b_name = pair(people)
    room_id = int(alice.evaluate('location.hash').split('=')[1])
    # 120 messages through the HTTP API, from Alice's page with her token.
    alice.evaluate("""async (roomId) => {
        const token = localStorage.getItem('postbox.token');
        for (let i = 1; i <= 120; i++) {
            const res = await fetch(`/api/rooms/${roomId}/messages`, {
                method: 'POST',
                headers: {'Authorization': `Bearer ${token}`,
                          'Content-Type': 'application/json'},
                body: JSON.stringify({body: `message ${i}`,
                                      client_msg_id: `seed-${i}`})});
            if (res.status !== 201) throw new Error(await res.text());
        }
    }""", room_id)
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    messages = bob.locator('#message-list .msg')
    expect(messages).to_have_count(50)
    expect(bubbles(bob).last).to_have_text('message 120')
    for count in (100, 120):
        bob.locator('#messages').evaluate('box => { box.scrollTop = 0; }')
        expect(messages).to_have_count(count)
    expect(bubbles(bob).first).to_have_text('message 1')
    expect(bob.locator('#history-status')).to_have_text(
        'This is the start of the conversation.')
    texts = bubbles(bob).all_text_contents()
    assert texts == [f'message {i}' for i in range(1, 121)]


def test_group_and_product_screenshot(people, tmp_path):
    """Three people, a group and two dms; ends with the screenshot used in
    the README."""
    alice, bob, carol = people(), people(), people()
    names = {p: unique_name(n) for p, n in
             ((alice, 'alice'), (bob, 'bob'), (carol, 'carol'))}
    sign_up(alice, names[alice], 'Alice Martin')
    sign_up(bob, names[bob], 'Bob Chen')
    sign_up(carol, names[carol], 'Carol Diaz')

    alice.click('#new-group-toggle')
    alice.fill('#new-group-name', 'Weekend trip')
    alice.fill('#new-group-members', f'{names[bob]}, {names[carol]}')
    alice.click('#new-group button[type=submit]')
    expect(alice.locator('#room-title')).to_have_text('Weekend trip')
    expect(alice.locator('#room-status')).to_contain_text('3 members')
    send(alice, "Who's in for Saturday?")
    for person in (bob, carol):
        person.locator('.inbox-item', has_text='Weekend trip').click()
        expect(bubbles(person)).to_have_text(["Who's in for Saturday?"])
    send(bob, 'Count me in!')
    expect(alice.locator('.msg-sender')).to_have_text(['Bob Chen'])
    expect(alice.locator('.msg.mine .seen')).to_have_text('Seen by everyone')

    open_dm(carol, names[alice], 'Alice Martin')
    send(carol, 'Did you book the cabin?')
    send(carol, 'The one by the lake')
    carol_item = alice.locator('.inbox-item', has_text='Carol Diaz')
    expect(carol_item.locator('.badge')).to_have_text('2')

    open_dm(alice, names[bob], 'Bob Chen')
    send(alice, 'Photos from last weekend')
    picture = tmp_path / 'lake.png'
    picture.write_bytes(png_bytes())
    alice.set_input_files('#file-input', str(picture))
    expect(alice.locator('#pending-files li.ready')).to_have_count(1)
    alice.click('#send')
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bob.locator('img.att-image')).to_have_attribute(
        'src', re.compile(r'^blob:'))
    # Bob loves the photo and answers it.
    photo = bob.locator('#message-list .msg').filter(
        has=bob.locator('img.att-image'))
    photo.hover()
    photo.locator('button.react-open').click()
    photo.get_by_role('button', name='React with ❤️').click()
    photo.hover()
    photo.locator('button.reply').click()
    send(bob, 'Wow, that sunset!')
    expect(alice.locator('.msg.mine .reaction')).to_have_text(['❤️ 1'])
    reply = message(alice, 'Wow, that sunset!')
    expect(reply.locator('.quote-sender')).to_have_text('You')
    expect(reply.locator('.quote-text')).to_have_text('Photo')
    expect(alice.locator('.msg.mine .seen')).to_have_text('Seen')
    bob.locator('#composer-input').press_sequentially('Send me the rest')
    expect(alice.locator('#typing')).to_have_text('Bob Chen is typing…')
    alice.wait_for_function(
        "() => [...document.querySelectorAll('img.att-image')]"
        ".every(i => i.complete && i.naturalWidth > 0)")
    # The inbox: latest activity first, Carol's two messages unread.
    expect(alice.locator('.inbox-name')).to_have_text(
        ['Bob Chen', 'Carol Diaz', 'Weekend trip'])
    shot(alice, 'showcase.png')
    if UPDATE_SCREENSHOT:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / 'showcase.png', DOCS / 'screenshot.png')

    # A phone-sized window shows one pane at a time.
    alice.set_viewport_size({'width': 390, 'height': 760})
    expect(alice.locator('#back')).to_be_visible()
    expect(alice.locator('.sidebar')).to_be_hidden()
    shot(alice, 'mobile-conversation.png')
    alice.click('#back')
    expect(alice.locator('.sidebar')).to_be_visible()
    expect(alice.locator('#room')).to_be_hidden()
    shot(alice, 'mobile-inbox.png')
    for person in (alice, bob, carol):
        assert person.errors == [] and person.console_errors == []


def test_sign_in_errors_and_ended_session(people):
    page = people()
    name = unique_name('dana')
    sign_up(page, name, 'Dana Fox')
    page.click('#logout')
    expect(page.locator('#auth')).to_be_visible()

    page.fill('#auth-username', name)
    page.fill('#auth-password', 'not the password')
    page.click('#auth-submit')
    expect(page.locator('#auth-error')).to_have_text(
        'Wrong username or password.')
    page.click('#tab-register')
    page.fill('#auth-username', name)
    page.fill('#auth-password', PASSWORD)
    page.click('#auth-submit')
    expect(page.locator('#auth-error')).to_have_text(
        'That username is taken.')

    page.click('#tab-login')
    page.fill('#auth-username', name.upper())
    page.fill('#auth-password', PASSWORD)
    page.click('#auth-submit')
    expect(page.locator('#app')).to_be_visible()
    expect(page.locator('#me-name')).to_have_text('Dana Fox')
    expect(page.locator('#banner')).to_be_hidden()

    # "Sign out everywhere" from elsewhere revokes this page's token: the
    # server closes the socket, the reconnect is refused, the page asks
    # to sign in again.
    page.evaluate("""() => fetch('/api/logout', {method: 'POST',
        headers: {'Authorization': 'Bearer ' + localStorage.getItem('postbox.token'),
                  'Content-Type': 'application/json'},
        body: JSON.stringify({all: true})})""")
    expect(page.locator('#auth')).to_be_visible()
    expect(page.locator('#auth-error')).to_have_text(
        'Your session has ended. Please sign in again.')
    assert page.evaluate("localStorage.getItem('postbox.token')") is None
    assert page.errors == []


def test_reactions_show_live_and_toggle(people):
    alice, bob, a_name, b_name = pair(people)
    send(alice, 'Lunch at 12:30?')
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob)).to_have_text(['Lunch at 12:30?'])
    send(bob, 'Yes, the usual place')

    # Alice picks 👍 from the picker under Bob's message.
    mine = message_action(alice, 'Yes, the usual place', 'react-open')
    picker = mine.locator('.picker')
    expect(picker.locator('button.pick')).to_have_count(5)
    picker.get_by_role('button', name='React with 👍').click()
    expect(picker).to_have_count(0)
    expect(mine.locator('.reaction')).to_have_text(['👍 1'])
    expect(mine.locator('.reaction')).to_have_class('reaction mine')
    # Bob sees it live, not highlighted: it is not his.
    theirs = message(bob, 'Yes, the usual place').locator('.reaction')
    expect(theirs).to_have_text(['👍 1'])
    expect(theirs).to_have_class('reaction')
    expect(theirs).to_have_attribute('aria-pressed', 'false')

    # Bob clicks the chip to add his own: two, highlighted for him.
    theirs.click()
    expect(theirs).to_have_text(['👍 2'])
    expect(theirs).to_have_class('reaction mine')
    expect(mine.locator('.reaction')).to_have_text(['👍 2'])
    # A second emoji from Bob's picker, on Alice's message this time.
    bobs_view = message_action(bob, 'Lunch at 12:30?', 'react-open')
    bobs_view.get_by_role('button', name='React with 😂').click()
    expect(message(alice, 'Lunch at 12:30?').locator('.reaction')) \
        .to_have_text(['😂 1'])
    shot(bob, 'reactions.png')

    # Alice takes hers back; Bob's count follows.
    mine.locator('.reaction').click()
    expect(theirs).to_have_text(['👍 1'])
    expect(mine.locator('.reaction')).to_have_class('reaction')
    # Stored: a reload shows the same.
    bob.reload()
    expect(message(bob, 'Yes, the usual place').locator('.reaction.mine')) \
        .to_have_text('👍 1')
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []


def test_reply_quotes_the_original(people):
    alice, bob, a_name, b_name = pair(people)
    room_id = int(alice.evaluate('location.hash').split('=')[1])
    send(alice, 'Can you send me the slides?')
    expect(alice.locator('.msg.mine .meta').last).not_to_have_text('Sending…')
    # Enough messages after it that the first page (50) leaves it out.
    seed(alice, room_id, [f'note {i}' for i in range(1, 56)])
    expect(bubbles(alice).last).to_have_text('note 55')

    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob).last).to_have_text('note 55')
    bob.locator('#messages').evaluate('box => { box.scrollTop = 0; }')
    expect(bubbles(bob).first).to_have_text('Can you send me the slides?')

    # Reply, cancel, reply again.
    message_action(bob, 'Can you send me the slides?', 'reply')
    expect(bob.locator('#replying')).to_be_visible()
    expect(bob.locator('#replying-to')).to_have_text('Replying to Alice Martin')
    expect(bob.locator('#replying-snippet')).to_have_text(
        'Can you send me the slides?')
    bob.click('#reply-cancel')
    expect(bob.locator('#replying')).to_be_hidden()
    message_action(bob, 'Can you send me the slides?', 'reply')
    expect(bob.locator('#replying')).to_be_visible()
    send(bob, 'Sent them by email')
    expect(bob.locator('#replying')).to_be_hidden()
    mine = message(bob, 'Sent them by email')
    expect(mine.locator('.quote-sender')).to_have_text('Alice Martin')

    # Alice sees the quote; clicking it brings the original into view.
    reply = message(alice, 'Sent them by email')
    expect(reply.locator('.quote-sender')).to_have_text('You')
    expect(reply.locator('.quote-text')).to_have_text(
        'Can you send me the slides?')
    original = bubbles(alice).filter(has_text='Can you send me the slides?')
    expect(original).not_to_be_in_viewport()
    reply.locator('button.quote').click()
    expect(original).to_be_in_viewport()
    shot(alice, 'reply.png')

    # After a reload only the latest page is loaded: the quote says so,
    # until the older page comes in.
    alice.reload()
    reply = message(alice, 'Sent them by email')
    expect(reply.locator('.quote')).to_have_text('Reply to an earlier message')
    alice.locator('#messages').evaluate('box => { box.scrollTop = 0; }')
    expect(reply.locator('.quote-text')).to_have_text(
        'Can you send me the slides?')
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []


def test_block_refuses_messages_until_unblocked(people):
    alice, bob, a_name, b_name = pair(people)
    send(alice, 'Hey, got a minute?')
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob)).to_have_text(['Hey, got a minute?'])
    expect(bob.locator('#block-toggle')).to_have_text('Block')
    expect(bob.locator('#block-notice')).to_be_hidden()

    bob.click('#block-toggle')
    expect(bob.locator('#block-toggle')).to_have_text('Unblock')
    expect(bob.locator('#block-notice')).to_contain_text(
        'You blocked Alice Martin.')
    # Alice's next message is refused, and she is told why.
    send(alice, 'Hello?')
    refused = alice.locator('.msg.failed')
    expect(refused.locator('.failure-text')).to_have_text(
        "Not sent: Bob Chen isn't accepting messages from you.")
    # A block can be lifted: Retry, or Discard.
    expect(refused.locator('.failure button')).to_have_text(
        ['Retry', 'Discard'])
    shot(alice, 'blocked.png')
    # The blocker can still write; the state survives a reload.
    send(bob, 'Busy, later')
    expect(bubbles(alice).filter(has_text='Busy, later')).to_have_count(1)
    bob.reload()
    expect(bob.locator('#block-toggle')).to_have_text('Unblock')
    expect(bubbles(bob)).to_have_text(['Hey, got a minute?', 'Busy, later'])
    # Bob on a second device (a fresh context: nothing in its storage)
    # sees the block too: the list comes from the server.
    phone = people()
    phone.fill('#auth-username', b_name)
    phone.fill('#auth-password', PASSWORD)
    phone.click('#auth-submit')
    expect(phone.locator('#me-name')).to_have_text('Bob Chen')
    phone.locator('.inbox-item', has_text='Alice Martin').click()
    expect(phone.locator('#block-toggle')).to_have_text('Unblock')
    expect(phone.locator('#block-notice')).to_contain_text(
        'You blocked Alice Martin.')

    # Unblocked, Alice's retry goes through.
    bob.click('#block-notice-undo')
    expect(bob.locator('#block-notice')).to_be_hidden()
    expect(bob.locator('#block-toggle')).to_have_text('Block')
    refused.locator('.retry').click()
    expect(bubbles(bob)).to_have_text(
        ['Hey, got a minute?', 'Busy, later', 'Hello?'])
    expect(alice.locator('.msg.failed')).to_have_count(0)
    # The second device learns of the unblock when it loads again.
    phone.reload()
    expect(phone.locator('#block-toggle')).to_have_text('Block')
    expect(phone.locator('#block-notice')).to_be_hidden()
    for page in (alice, bob, phone):
        assert page.errors == [] and page.console_errors == []


def test_sign_out_everywhere_ends_other_sessions(people):
    laptop, phone = people(), people()
    phone.set_viewport_size({'width': 390, 'height': 760})
    name = unique_name('erin')
    sign_up(laptop, name, 'Erin Park')
    phone.fill('#auth-username', name)
    phone.fill('#auth-password', PASSWORD)
    phone.click('#auth-submit')
    expect(phone.locator('#me-name')).to_have_text('Erin Park')
    expect(phone.locator('#banner')).to_be_hidden()
    expect(phone.locator('#logout-all')).to_be_visible()
    token = laptop.evaluate("localStorage.getItem('postbox.token')")

    # It asks first: it signs out the account's bots too. Cancelled,
    # nothing ends.
    asked = []
    laptop.once('dialog', lambda d: asked.append(d.message) or d.dismiss())
    laptop.click('#logout-all')
    expect(laptop.locator('#logout-all')).to_be_enabled()
    assert len(asked) == 1 and 'Bots you own are signed out too' in asked[0]
    assert laptop.evaluate("localStorage.getItem('postbox.token')") == token
    expect(laptop.locator('#app')).to_be_visible()
    expect(phone.locator('#app')).to_be_visible()

    laptop.once('dialog', lambda d: d.accept())
    laptop.click('#logout-all')
    expect(laptop.locator('#auth')).to_be_visible()
    expect(laptop.locator('#auth-error')).to_have_text(
        'You were signed out everywhere.')
    # The other device is signed out too, and told why.
    expect(phone.locator('#auth')).to_be_visible()
    expect(phone.locator('#auth-error')).to_have_text(
        'Your session has ended. Please sign in again.')
    for page in (laptop, phone):
        assert page.evaluate("localStorage.getItem('postbox.token')") is None
    # The old token is dead; the password still signs in.
    assert laptop.evaluate("""t => fetch('/api/me', {headers:
        {Authorization: 'Bearer ' + t}}).then(r => r.status)""", token) == 401
    laptop.fill('#auth-username', name)
    laptop.fill('#auth-password', PASSWORD)
    laptop.click('#auth-submit')
    expect(laptop.locator('#me-name')).to_have_text('Erin Park')
    # The two confirmations were the only dialogs (the kit records each).
    dialogs = [e for e in laptop.errors if e.startswith('dialog: ')]
    assert dialogs == [f'dialog: {asked[0]}'] * 2
    laptop.errors = [e for e in laptop.errors if e not in dialogs]
    for page in (laptop, phone):
        assert page.errors == []


def test_group_members_panel(people):
    """A group's members panel: the owner marked, adding people, renaming
    and removing (owner only), leaving; every change shows live on the
    others' pages, and a removed person's page drops the group."""
    alice, bob, carol, dan = people(), people(), people(), people()
    names = {p: unique_name(n) for p, n in ((alice, 'alice'), (bob, 'bob'),
                                            (carol, 'carol'), (dan, 'dan'))}
    for page, display in ((alice, 'Alice Martin'), (bob, 'Bob Chen'),
                          (carol, 'Carol Diaz'), (dan, 'Dan Okafor')):
        sign_up(page, names[page], display)
    alice.click('#new-group-toggle')
    alice.fill('#new-group-name', 'Book club')
    alice.fill('#new-group-members', names[bob])
    alice.click('#new-group button[type=submit]')
    expect(alice.locator('#room-title')).to_have_text('Book club')
    send(alice, 'First book: Dune')
    bob.locator('.inbox-item', has_text='Book club').click()
    expect(bubbles(bob)).to_have_text(['First book: Dune'])

    # Bob is not the owner: he can add people, not rename or remove.
    bob.click('#members-toggle')
    panel = bob.locator('#members-panel')
    expect(panel).to_be_visible()
    expect(panel.locator('.member-name')).to_have_text(
        ['Alice Martinowner', 'Bob Chen (you)'])
    expect(panel.locator('.owner-badge')).to_have_count(1)
    expect(bob.locator('#rename-form')).to_be_hidden()
    expect(panel.locator('.member-remove')).to_have_count(0)
    bob.fill('#add-input', f'{names[carol]}, {names[dan]}')
    bob.click('#add-submit')
    expect(panel.locator('.member-name')).to_have_count(4)
    expect(bob.locator('#members-toggle')).to_have_text('Members (4)')
    # Carol and Dan get the group live, with what was said before.
    for page in (carol, dan):
        page.locator('.inbox-item', has_text='Book club').click()
        expect(bubbles(page)).to_have_text(['First book: Dune'])
    expect(alice.locator('#room-status')).to_contain_text('4 members')

    # The owner renames and removes Dan.
    alice.click('#members-toggle')
    apanel = alice.locator('#members-panel')
    expect(apanel.locator('.member-remove')).to_have_count(3)
    alice.fill('#rename-input', 'Sci-fi club')
    alice.click('#rename-submit')
    for page in (alice, bob, carol, dan):
        expect(page.locator('#room-title')).to_have_text('Sci-fi club')
    shot(alice, 'group-members.png')
    # Removing asks first (the kit records the dialog: taken out below).
    alice.once('dialog', lambda d: d.accept())
    apanel.locator('.member', has_text=names[dan]).locator(
        '.member-remove').click()
    expect(apanel.locator('.member-name')).to_have_count(3)
    expect(panel.locator('.member-name')).to_have_count(3)
    # Dan's page drops the group at once and says so.
    expect(dan.locator('.inbox-item', has_text='Sci-fi club')).to_have_count(0)
    expect(dan.locator('#room')).to_be_hidden()
    expect(dan.locator('#sidebar-note')).to_have_text(
        'You are no longer in “Sci-fi club”.')
    send(alice, 'Dan moved to the poetry group')
    expect(bubbles(carol)).to_have_text(
        ['First book: Dune', 'Dan moved to the poetry group'])

    # The owner leaves: Bob, the longest-standing member, owns it now.
    alice.click('#leave-group')
    expect(alice.locator('.inbox-item', has_text='Sci-fi club')).to_have_count(0)
    # Leaving on purpose is no news.
    expect(alice.locator('#sidebar-error')).to_be_hidden()
    expect(panel.locator('.owner-badge')).to_have_count(1)
    expect(panel.locator('.member', has=bob.locator('.owner-badge'))).to_contain_text(
        'Bob Chen (you)')
    expect(bob.locator('#rename-form')).to_be_visible()
    shot(bob, 'group-new-owner.png')
    # A reload of Dan's page keeps the group gone.
    dan.reload()
    expect(dan.locator('#me-name')).to_have_text('Dan Okafor')
    expect(dan.locator('.inbox-item', has_text='Sci-fi club')).to_have_count(0)
    alice.errors = [e for e in alice.errors if not e.startswith(
        'dialog: Remove Dan Okafor')]
    for page in (alice, bob, carol, dan):
        assert page.errors == [] and page.console_errors == [], (
            page.errors, page.console_errors)
    # Every live event came in seq order: none was taken for a sign of
    # missed ones (which makes the page call `sync`).
    for page in (alice, bob, carol):
        assert sync_calls(page) == 0


def test_inbox_loads_in_pages(people):
    """The inbox asks for 30 conversations at a time (`rooms` with
    {limit, before}); "More conversations" loads the rest."""
    page = people()
    sign_up(page, unique_name('gail'), 'Gail Park')
    # 35 groups made from a second socket of Gail's (the page's global io).
    page.evaluate("""async (count) => {
        const socket = io({auth: {token: localStorage.getItem('postbox.token')},
                           forceNew: true});
        await new Promise((resolve) => socket.on('connect', resolve));
        for (let i = 0; i < count; i++) {
            const ack = await socket.timeout(15000).emitWithAck(
                'create_group', {name: `Group ${String(i).padStart(2, '0')}`, members: []});
            if (!ack.ok) throw new Error(JSON.stringify(ack));
        }
        socket.disconnect();
    }""", 35)
    items = page.locator('.inbox-item')
    expect(items).to_have_count(35)  # live, as each was made
    page.reload()
    expect(page.locator('#app')).to_be_visible()
    expect(items).to_have_count(30)
    more = page.locator('#inbox-more')
    expect(more).to_be_visible()
    more.click()
    expect(items).to_have_count(35)
    expect(more).to_be_hidden()
    names = items.locator('.inbox-name').all_inner_texts()
    assert sorted(names) == [f'Group {i:02d}' for i in range(35)]
    assert page.errors == [] and page.console_errors == []
