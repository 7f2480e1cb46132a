"""The demo page's fixes from a tester's report, in a real Chromium
(Playwright) against a real server: each test drives the page as a person
would and checks what they see (each failed before its fix)."""
import re
import uuid

import pytest
from playwright.sync_api import expect

from tests.browser_kit import (  # noqa: F401 (browser, people: fixtures)
    PASSWORD, api, browser, open_dm, open_page, open_room_id, pair, people,
    poll, send, serve, shot, sign_up)
from tests.helpers import NO_RATE_LIMITS, unique_name

PHONE = {'width': 393, 'height': 851}  # a Pixel 5


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, 'browser-demo', NO_RATE_LIMITS)


def register(server, prefix, display_name):
    """A person with no page: {user, token}."""
    return api(server, 'POST', '/api/register', body={
        'username': unique_name(prefix), 'password': PASSWORD,
        'display_name': display_name})


def say(server, who, body, to=None, room_id=None):
    """``who`` sends ``body`` over HTTP, to a username (opening the dm) or
    into a room; returns the message."""
    target = {'to': to} if to else {'room_id': room_id}
    return api(server, 'POST', '/api/messages', who['token'], {
        **target, 'body': body, 'client_msg_id': uuid.uuid4().hex})['message']


def bubbles(page):
    return page.locator('#message-list .msg .body')


def message(page, text):
    return page.locator('#message-list .msg').filter(
        has=page.locator('.body', has_text=re.compile(f'^{re.escape(text)}$')))


def inbox_item(page, title):
    return page.locator('.inbox-item').filter(
        has=page.locator('.inbox-name', has_text=title))


def accept_dialogs(page):
    """Accepts the page's confirmations from now on; returns the list
    their messages go to (the kit records them as errors: taken out)."""
    asked = []

    def accept(dialog):
        asked.append(dialog.message)
        dialog.accept()
    page.on('dialog', accept)
    return asked


def clean(page):
    """The page's errors, but for the dialogs it was expected to show."""
    return [e for e in page.errors if not e.startswith('dialog: ')]


# Whether an element's text fits in its box, or is cut there (an
# ellipsis): it never spills over its neighbours.
CLIPPED_OR_FITS = """node => node.scrollWidth <= node.clientWidth
    || getComputedStyle(node).overflowX !== 'visible'"""


def second_tab(page, server):
    """Another tab of the same browser (same storage) at the page."""
    tab = open_page(page.context, server.url)
    expect(tab.locator('#app')).to_be_visible()
    expect(tab.locator('#banner')).to_be_hidden()
    return tab


def group_with_a_message(page, name, member, body):
    """``page``'s user makes the group ``name`` with ``member`` and says
    ``body`` in it (stored: no longer "Sending…")."""
    page.click('#new-group-toggle')
    page.fill('#new-group-name', name)
    page.fill('#new-group-members', member)
    page.click('#new-group button[type=submit]')
    expect(page.locator('#room-title')).to_have_text(name)
    send(page, body)
    expect(page.locator('.msg.mine .meta').last).not_to_have_text('Sending…')

def test_search_uses_this_tabs_session(people, server):
    """Another tab signed in as someone else (here: the token in
    storage replaced behind this tab's back) does not change whose
    messages this tab's search finds."""
    bob = register(server, 'bob', 'Bob Chen')
    carol = register(server, 'carol', 'Carol Diaz')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    open_dm(alice, bob['user']['username'], 'Bob Chen')
    send(alice, 'pineapple pizza on friday')
    expect(alice.locator('.msg.mine .meta').last).not_to_have_text('Sending…')
    say(server, carol, 'pineapple for carol only', to=bob['user']['username'])
    # What another tab's sign-in leaves in the storage (a tab gets no
    # storage event for its own change).
    alice.evaluate('t => localStorage.setItem("postbox.token", t)',
                   carol['token'])

    alice.fill('#search-input', 'pineapple')
    alice.press('#search-input', 'Enter')
    results = alice.locator('#search-results .search-result')
    expect(results.locator('.search-body')).to_have_text(
        ['pineapple pizza on friday'])
    # Each result says which conversation it is from.
    expect(results.locator('.search-room')).to_have_text(['Bob Chen'])
    assert clean(alice) == [] and alice.console_errors == []


def test_sign_out_in_one_tab_signs_out_the_others(people, server):
    """"Sign out" ends the session in every tab of the browser,
    and another account's sign-in in one tab ends this one's in the
    others."""
    tab = people()
    name = unique_name('dana')
    sign_up(tab, name, 'Dana Fox')
    other = second_tab(tab, server)
    expect(other.locator('#me-name')).to_have_text('Dana Fox')

    tab.click('#logout')
    expect(tab.locator('#auth')).to_be_visible()
    expect(other.locator('#auth')).to_be_visible()
    expect(other.locator('#app')).to_be_hidden()
    expect(other.locator('#auth-error')).to_have_text(
        'You signed out in another tab.')

    # The first tab signs in as Dana again, then the second (still at its
    # sign-in form) as Erin: the first is not left as Dana, whose session
    # is no longer the browser's.
    tab.fill('#auth-username', name)
    tab.fill('#auth-password', PASSWORD)
    tab.click('#auth-submit')
    expect(tab.locator('#me-name')).to_have_text('Dana Fox')
    expect(other.locator('#auth')).to_be_visible()
    sign_up(other, unique_name('erin'), 'Erin Park')
    expect(tab.locator('#auth')).to_be_visible()
    expect(tab.locator('#auth-error')).to_have_text(
        'You signed in as someone else in another tab.')
    expect(other.locator('#me-name')).to_have_text('Erin Park')
    for page in (tab, other):
        assert page.errors == [] and page.console_errors == []


def test_phone_layout_keeps_to_the_screen(people, server):
    """On a phone a long preview does not widen the sidebar past
    the screen, and a message's actions (shown on a tap: no hover) do not
    squeeze its bubble."""
    bob = register(server, 'bob', 'Bob Chen')
    phone = people(is_mobile=True, has_touch=True)
    phone.set_viewport_size(PHONE)
    sign_up(phone, unique_name('fay'), 'Fay Lin')
    long_word = 'Supercalifragilistic' * 12
    say(server, bob, long_word, to=phone.evaluate(
        "JSON.parse(localStorage.getItem('postbox.user')).username"))
    item = inbox_item(phone, 'Bob Chen')
    expect(item.locator('.inbox-preview')).to_have_text(long_word)
    assert phone.locator('.sidebar').bounding_box()['width'] <= PHONE['width']
    assert phone.evaluate('document.documentElement.scrollWidth') \
        <= PHONE['width']
    box = item.locator('.inbox-time').bounding_box()
    assert box['x'] + box['width'] <= PHONE['width']

    item.click()
    send(phone, 'Sure, see you at the station at half past six tonight!')
    bubble = phone.locator('#message-list .msg.mine .bubble')
    expect(bubble).to_have_count(1)
    expect(phone.locator('.msg.mine .actions')).to_be_hidden()
    bubble.tap()
    expect(phone.locator('.msg.mine .actions button.edit')).to_be_visible()
    shot(phone, 'phone-actions.png')
    # The bubble keeps most of the screen's width with its actions shown.
    assert bubble.bounding_box()['width'] > 0.6 * PHONE['width']
    assert phone.evaluate('document.documentElement.scrollWidth') \
        <= PHONE['width']
    bubble.tap()  # again: they go
    expect(phone.locator('.msg.mine .actions')).to_be_hidden()
    assert phone.errors == [] and phone.console_errors == []


def test_group_header_and_long_names(people, server):
    """A big group's header takes one line and counts
    the members; long names are cut short without hiding "Sign out",
    "(you)" or the owner badge; initials keep whole emoji; "1 member"."""
    others = [register(server, 'm', f'Member number {i} of the big group')
              for i in range(12)]
    page = people()
    # No place to break the line: it can only be cut short.
    display = '🇫🇷 Wolfeschlegelsteinhausenbergerdorffvoralternwarengewissen'
    sign_up(page, unique_name('alex'), display)
    expect(page.locator('#me-avatar')).to_have_text('🇫🇷W')
    assert page.locator('#me-name').evaluate(CLIPPED_OR_FITS)

    page.click('#new-group-toggle')
    page.fill('#new-group-name', 'Just me')
    page.click('#new-group button[type=submit]')
    expect(page.locator('#room-status')).to_have_text(f'1 member: {display}')

    page.click('#new-group-toggle')
    page.fill('#new-group-name', 'Big group')
    page.fill('#new-group-members',
              ', '.join(u['user']['username'] for u in others))
    page.click('#new-group button[type=submit]')
    expect(page.locator('#room-title')).to_have_text('Big group')
    expect(page.locator('#room-status')).to_have_text(re.compile(
        r'^13 members: 🇫🇷 Wolfe.*, Member number 2 of the big group '
        r'and 9 more$'))
    assert page.locator('.room-header').bounding_box()['height'] < 80

    page.click('#members-toggle')
    me = page.locator('#members-list .member').first
    panel = page.locator('#members-panel').bounding_box()
    for part in ('.member-you', '.owner-badge'):
        box = me.locator(part).bounding_box()
        assert box['width'] > 0 and box['x'] + box['width'] <= \
            panel['x'] + panel['width'], part
    expect(me.locator('.member-name')).to_have_text(f'{display} (you)owner')
    shot(page, 'big-group.png')
    assert page.errors == [] and page.console_errors == []


def test_refused_reaction_is_shown_by_the_composer(people):
    """A refused reaction says so where the user looks, and the
    next render does not wipe it. With it, the server contract's
    presence on block: the blocked user sees the blocker offline with no
    "last seen"; back online at the unblock."""
    alice, bob, a_name, b_name = pair(people)
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    send(bob, 'Did you get my letter?')
    expect(bubbles(alice)).to_have_text(['Did you get my letter?'])
    expect(alice.locator('#room-status')).to_have_text(f'Online · @{b_name}')
    bob.click('#block-toggle')
    expect(bob.locator('#block-toggle')).to_have_text('Unblock')
    expect(alice.locator('#room-status')).to_have_text(f'Offline · @{b_name}')

    msg = message(alice, 'Did you get my letter?')
    msg.hover()
    msg.locator('.actions button.react-open').click()
    msg.get_by_role('button', name='React with 👍').click()
    notice = alice.locator('#notice')
    expect(notice).to_be_visible()
    expect(notice).to_contain_text('Could not add the reaction.')
    expect(notice).to_be_in_viewport()
    # Bob writes again (the blocker still can): the render keeps it.
    send(bob, 'Hello?')
    expect(bubbles(alice).last).to_have_text('Hello?')
    expect(notice).to_be_visible()
    shot(alice, 'refused-reaction.png')
    alice.click('#notice-close')
    expect(notice).to_be_hidden()

    bob.click('#block-toggle')
    expect(alice.locator('#room-status')).to_have_text(f'Online · @{b_name}')
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []


def test_unread_drops_when_the_sender_deletes(people):
    """An unread message deleted by its sender no longer counts
    (the badge and the title). Delete asks first."""
    alice, bob, a_name, b_name = pair(people)
    send(alice, 'Coffee?')
    send(alice, 'Oops, wrong person')
    item = bob.locator('.inbox-item', has_text='Alice Martin')
    expect(item.locator('.badge')).to_have_text('2')
    expect(bob).to_have_title('(2) Postbox')

    asked = accept_dialogs(alice)
    msg = message(alice, 'Oops, wrong person')
    msg.hover()
    msg.locator('.actions button.delete').click()
    expect(item.locator('.badge')).to_have_text('1')
    expect(bob).to_have_title('(1) Postbox')
    assert asked == ['Delete this message for everyone?']
    assert clean(alice) == [] and bob.errors == []


def test_added_to_a_group_with_history_shows_its_latest_message(people,
                                                                server):
    """Someone added to a group with a history sees its
    latest message and time in the inbox (not "No messages yet"); a name
    typed with "@" is added."""
    bob = register(server, 'bob', 'Bob Chen')
    alice, carol = people(), people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    carol_name = unique_name('carol')
    sign_up(carol, carol_name, 'Carol Diaz')
    group_with_a_message(alice, 'Book club', bob['user']['username'],
                         'First book: Dune')

    alice.click('#members-toggle')
    alice.fill('#add-input', f'@{carol_name}')
    alice.click('#add-submit')
    expect(alice.locator('#members-panel .member')).to_have_count(3)
    item = inbox_item(carol, 'Book club')
    expect(item.locator('.inbox-preview')).to_have_text(
        'Alice Martin: First book: Dune')
    expect(item.locator('.inbox-time')).not_to_have_text('')
    for page in (alice, carol):
        assert page.errors == [] and page.console_errors == []


def test_start_a_dm_with_at_and_a_blank_group_name(people, server):
    """"@bob" opens the dm with bob; a right-to-left message reads right
    to left; a blank group name is refused in words, before asking the
    server."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    open_dm(alice, f"  @{bob['user']['username']} ", 'Bob Chen')
    expect(alice.locator('#sidebar-error')).to_be_hidden()
    send(alice, 'שלום, מה שלומך?')
    for text in (bubbles(alice), inbox_item(alice, 'Bob Chen').locator(
            '.inbox-preview bdi').last):
        expect(text).to_have_text('שלום, מה שלומך?')
        # Retried: the inbox may be drawn again meanwhile (a node read
        # once may be detached, its computed style empty).
        expect(text).to_have_css('direction', 'rtl')

    alice.click('#new-group-toggle')
    alice.fill('#new-group-name', '   ')
    alice.click('#new-group button[type=submit]')
    expect(alice.locator('#sidebar-error')).to_have_text(
        'Give the group a name.')
    assert alice.errors == [] and alice.console_errors == []


def test_drafts_survive_switching_rooms_and_editing(people, server):
    """What I was writing stays with its conversation, and an
    edit (cancelled or saved) gives it back."""
    bob = register(server, 'bob', 'Bob Chen')
    carol = register(server, 'carol', 'Carol Diaz')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    open_dm(alice, carol['user']['username'], 'Carol Diaz')
    open_dm(alice, bob['user']['username'], 'Bob Chen')
    send(alice, 'See you at 6')
    expect(alice.locator('.msg.mine .meta').last).not_to_have_text('Sending…')
    composer = alice.locator('#composer-input')
    alice.fill('#composer-input', 'Half a thought about')

    inbox_item(alice, 'Carol Diaz').click()
    expect(alice.locator('#room-title')).to_have_text('Carol Diaz')
    expect(composer).to_have_value('')
    alice.fill('#composer-input', 'For Carol')
    inbox_item(alice, 'Bob Chen').click()
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(composer).to_have_value('Half a thought about')
    expect(alice.locator('#send')).to_be_enabled()

    msg = message(alice, 'See you at 6')
    msg.hover()
    msg.locator('.actions button.edit').click()
    expect(composer).to_have_value('See you at 6')
    alice.click('#edit-cancel')
    expect(composer).to_have_value('Half a thought about')
    msg.hover()
    msg.locator('.actions button.edit').click()
    alice.fill('#composer-input', 'See you at 7')
    alice.press('#composer-input', 'Enter')
    expect(bubbles(alice)).to_have_text(['See you at 7'])
    expect(composer).to_have_value('Half a thought about')
    inbox_item(alice, 'Carol Diaz').click()
    expect(composer).to_have_value('For Carol')
    assert alice.errors == [] and alice.console_errors == []


def test_a_send_that_cannot_succeed_is_discarded(people, server):
    """A send the server refuses for good (too long) says it
    cannot be sent and offers Discard only."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    open_dm(alice, bob['user']['username'], 'Bob Chen')
    # Past the box's maxlength, as a script or a paste may put it.
    alice.locator('#composer-input').evaluate(
        "box => { box.value = 'x'.repeat(4001);"
        " box.dispatchEvent(new Event('input')); }")
    alice.press('#composer-input', 'Enter')
    failed = alice.locator('.msg.failed')
    expect(failed.locator('.failure-text')).to_have_text(
        "Not sent: A message can be at most 4000 characters. "
        "It can't be sent as it is.")
    expect(failed.locator('.retry')).to_have_count(0)
    failed.locator('.discard').click()
    expect(alice.locator('#message-list .msg')).to_have_count(0)
    assert alice.errors == [] and alice.console_errors == []


def test_refused_upload_says_why(people, server, tmp_path):
    """A refused file shows the server's reason."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    open_dm(alice, bob['user']['username'], 'Bob Chen')
    page_file = tmp_path / 'page.html'
    page_file.write_text('<!doctype html><p>hello</p>')
    alice.set_input_files('#file-input', str(page_file))
    expect(alice.locator('#pending-files li.failed')).to_have_text(
        'page.html · HTML, SVG and XML documents are not allowed×')
    # The browser logs the 415 itself.
    assert alice.errors == []


def test_paged_inbox_title_and_more_link(people, server):
    """With more inbox pages to load, the title's unread count
    says it may be more; "More conversations" sits under the last row."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    a_name = unique_name('alice')
    sign_up(alice, a_name, 'Alice Martin')
    # 31 groups of Bob's with Alice, a message in each (over a socket of
    # Bob's, from the page's global io).
    alice.evaluate("""async ([token, name]) => {
        const socket = io({auth: {token}, forceNew: true});
        await new Promise((resolve) => socket.on('connect', resolve));
        for (let i = 0; i < 31; i++) {
            const ack = await socket.timeout(15000).emitWithAck(
                'create_group', {name: `Club ${i}`, members: [name]});
            await socket.timeout(15000).emitWithAck('send_dm', {
                room_id: ack.room.id, body: 'hi', client_msg_id: `c${i}`});
        }
        socket.disconnect();
    }""", [bob['token'], a_name])
    expect(alice).to_have_title('(31) Postbox')
    alice.reload()
    expect(alice.locator('.inbox-item')).to_have_count(30)
    expect(alice).to_have_title('(30+) Postbox')
    # The link comes after the last row (in the list's own layout: a
    # scroll to the end would load the next page).
    more = alice.locator('#inbox-more')
    expect(more).to_be_visible()
    assert alice.evaluate('''() => {
        const rows = document.querySelectorAll('.inbox-item');
        const last = rows[rows.length - 1].getBoundingClientRect();
        const link = document.getElementById('inbox-more').getBoundingClientRect();
        return link.top >= last.bottom;
    }''')
    more.click()
    expect(alice.locator('.inbox-item')).to_have_count(31)
    expect(alice).to_have_title('(31) Postbox')
    assert alice.errors == [] and alice.console_errors == []


def test_reading_and_muting_in_one_tab_shows_in_the_other(people, server):
    """The server's `read` of mine reaches every socket of mine with my
    unread count, `muted` every socket: a second tab clears its badge and
    title when I read in the first, and shows the mute."""
    alice, bob, a_name, b_name = pair(people)
    bob2 = second_tab(bob, server)
    send(alice, 'Are you there?')
    for tab in (bob, bob2):
        expect(tab.locator('.inbox-item .badge')).to_have_text('1')
        expect(tab).to_have_title('(1) Postbox')

    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bubbles(bob)).to_have_text(['Are you there?'])
    expect(bob2.locator('.inbox-item .badge')).to_have_count(0)
    expect(bob2).to_have_title('Postbox')

    bob.click('#mute-toggle')
    expect(bob.locator('#mute-toggle')).to_have_text('Unmute')
    expect(bob2.locator('.inbox-item .muted-mark')).to_have_count(1)
    bob.click('#mute-toggle')
    expect(bob2.locator('.inbox-item .muted-mark')).to_have_count(0)
    for page in (alice, bob, bob2):
        assert page.errors == [] and page.console_errors == []


def test_leaving_a_group_is_no_error_and_remove_asks(people, server):
    """Leaving a group myself shows no error; removing someone
    asks first; the members panel leaves the newest messages in view."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    group_with_a_message(alice, 'Walkers', bob['user']['username'],
                         'Sunday walk?')
    alice.click('#members-toggle')
    newest = alice.locator('#message-list .msg .bubble').last
    expect(newest).to_be_in_viewport()
    panel = alice.locator('#members-panel').bounding_box()
    box = newest.bounding_box()
    assert box['x'] + box['width'] <= panel['x']

    # Cancelled, nobody is removed.
    asked = []
    alice.once('dialog', lambda d: asked.append(d.message) or d.dismiss())
    remove = alice.locator('#members-panel .member-remove')
    remove.click()
    expect(remove).to_be_enabled()
    assert asked == [f"Remove Bob Chen (@{bob['user']['username']}) "
                     'from the group?']
    expect(alice.locator('#members-panel .member')).to_have_count(2)

    alice.click('#leave-group')
    expect(inbox_item(alice, 'Walkers')).to_have_count(0)
    expect(alice.locator('#sidebar-error')).to_be_hidden()
    assert clean(alice) == [] and alice.console_errors == []


def test_a_group_left_elsewhere_goes_quietly(people, server):
    """A group I leave in another tab (or on another device) goes from
    this tab's list with no error; the conversation it had open closes
    with a neutral note, and a link to it afterwards (a reload of
    #room=<id>) does not leave a composer to write into."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    group_with_a_message(alice, 'Hikers', bob['user']['username'],
                         'Saturday?')
    room_id = open_room_id(alice)
    other = second_tab(alice, server)
    inbox_item(other, 'Hikers').click()
    expect(bubbles(other)).to_have_text(['Saturday?'])

    alice.click('#members-toggle')
    alice.click('#leave-group')
    expect(inbox_item(alice, 'Hikers')).to_have_count(0)
    expect(inbox_item(other, 'Hikers')).to_have_count(0)
    expect(other.locator('#room')).to_be_hidden()
    expect(other.locator('#composer-input')).to_be_hidden()
    expect(other.locator('#sidebar-error')).to_be_hidden()
    expect(other.locator('#sidebar-note')).to_have_text(
        'You are no longer in “Hikers”.')
    expect(alice.locator('#sidebar-note')).to_be_hidden()

    # A hash change alone is no reload.
    other.evaluate(f"history.replaceState(null, '', '#room={room_id}')")
    other.reload()
    expect(other.locator('#app')).to_be_visible()
    expect(other.locator('#sidebar-note')).to_have_text(
        'You are not in that conversation.')
    expect(other.locator('#composer-input')).to_be_hidden()
    expect(other.locator('#sidebar-error')).to_be_hidden()
    expect(other.locator('#history-status')).not_to_contain_text('member')
    assert other.evaluate('location.hash') == ''
    for page in (alice, other):
        assert clean(page) == [] and page.console_errors == []


def test_a_send_refused_in_a_group_left_elsewhere_takes_it_away(people,
                                                                server):
    """If the page missed the room_left (here: its listener taken away),
    the send the server refuses (`forbidden`: not a member) takes the
    group away as room_left would: no "Retry" that can never work."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    sign_up(alice, unique_name('alice'), 'Alice Martin')
    group_with_a_message(alice, 'Runners', bob['user']['username'],
                         'Sunday 8am')
    room_id = open_room_id(alice)
    alice.evaluate("""async () => {
        const {page} = await import('/static/page.js');
        page.conn.socket.off('room_left');
    }""")
    me = alice.evaluate('JSON.parse(localStorage.getItem("postbox.user"))')
    token = alice.evaluate('localStorage.getItem("postbox.token")')
    # Leaving, as another device of Alice's would.
    api(server, 'DELETE', f"/api/rooms/{room_id}/members/{me['username']}",
        token)
    send(alice, 'Count me in')
    expect(inbox_item(alice, 'Runners')).to_have_count(0)
    expect(alice.locator('#composer-input')).to_be_hidden()
    expect(alice.locator('#sidebar-note')).to_have_text(
        'You are no longer in “Runners”.')
    expect(alice.locator('#sidebar-error')).to_be_hidden()
    assert clean(alice) == [] and alice.console_errors == []


def test_search_names_rooms_the_inbox_has_not_loaded(people, server):
    """A search result from a room beyond the loaded inbox pages says
    which conversation it is from (the dm's other person, the group's
    name), not "Another conversation"; the inbox stays as it was."""
    bob = register(server, 'bob', 'Bob Chen')
    alice = people()
    a_name = unique_name('alice')
    sign_up(alice, a_name, 'Alice Martin')
    say(server, bob, 'kiwi for two', to=a_name)
    # The oldest activity: a group, then 30 newer groups fill the first
    # inbox page (over a socket of Bob's, from the page's global io).
    alice.evaluate("""async ([token, name]) => {
        const socket = io({auth: {token}, forceNew: true});
        await new Promise((resolve) => socket.on('connect', resolve));
        const send = (room_id, body, i) => socket.timeout(15000).emitWithAck(
            'send_dm', {room_id, body, client_msg_id: `k${i}`});
        const fruit = await socket.timeout(15000).emitWithAck(
            'create_group', {name: 'Fruit club', members: [name]});
        await send(fruit.room.id, 'kiwi for everyone', 'f');
        for (let i = 0; i < 30; i++) {
            const ack = await socket.timeout(15000).emitWithAck(
                'create_group', {name: `Club ${i}`, members: [name]});
            await send(ack.room.id, 'hi', i);
        }
        socket.disconnect();
    }""", [bob['token'], a_name])
    alice.reload()
    expect(alice.locator('.inbox-item')).to_have_count(30)
    expect(inbox_item(alice, 'Fruit club')).to_have_count(0)

    alice.fill('#search-input', 'kiwi')
    alice.press('#search-input', 'Enter')
    results = alice.locator('#search-results .search-result')
    expect(results.locator('.search-body')).to_have_text(
        ['kiwi for everyone', 'kiwi for two'])
    expect(results.locator('.search-room')).to_have_text(
        ['Fruit club', 'Bob Chen'])
    expect(alice.locator('.inbox-item')).to_have_count(30)
    results.nth(1).click()
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(bubbles(alice)).to_have_text(['kiwi for two'])
    assert alice.errors == [] and alice.console_errors == []


def test_drafts_survive_a_reload_and_go_with_the_sign_out(people, server):
    """A half-typed message survives a reload (this tab's
    sessionStorage, by user and room); a send clears it; signing out
    clears every draft, so the next account on this browser sees none."""
    bob = register(server, 'bob', 'Bob Chen')
    carol = register(server, 'carol', 'Carol Diaz')
    alice = people()
    a_name = unique_name('alice')
    sign_up(alice, a_name, 'Alice Martin')
    open_dm(alice, carol['user']['username'], 'Carol Diaz')
    alice.fill('#composer-input', 'For Carol, later')
    open_dm(alice, bob['user']['username'], 'Bob Chen')
    composer = alice.locator('#composer-input')
    alice.fill('#composer-input', 'Half a thought about')

    alice.reload()
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(composer).to_have_value('Half a thought about')
    expect(alice.locator('#send')).to_be_enabled()
    inbox_item(alice, 'Carol Diaz').click()
    expect(composer).to_have_value('For Carol, later')
    alice.press('#composer-input', 'Enter')
    expect(bubbles(alice)).to_have_text(['For Carol, later'])
    alice.reload()
    expect(alice.locator('#room-title')).to_have_text('Carol Diaz')
    expect(composer).to_have_value('')

    alice.click('#logout')
    expect(alice.locator('#auth')).to_be_visible()
    assert alice.evaluate("""Object.keys(sessionStorage)
        .filter((k) => k.startsWith('postbox.draft.'))""") == []
    alice.fill('#auth-username', a_name)
    alice.fill('#auth-password', PASSWORD)
    alice.click('#auth-submit')
    inbox_item(alice, 'Bob Chen').click()
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(composer).to_have_value('')
    assert alice.errors == [] and alice.console_errors == []
