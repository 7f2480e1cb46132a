"""Notifications and mutes on the demo page in a real Chromium (Playwright)
against a real server: "Enable notifications" registers a service worker,
subscribes with the server's VAPID key and registers the subscription with
the server; a push delivered to the worker (through Chromium's DevTools
protocol, ServiceWorker.deliverPushMessage) shows a notification; a muted
room stays muted after a reload.

No push service can run here, and headless Chromium's contexts have no
Push API (as incognito windows), so PushManager.subscribe is the one part
stood in for (PUSH_SERVICE): it makes a subscription with real P-256 and
auth keys and an endpoint on the test server, which therefore allows
loopback push endpoints (POSTBOX_WEBHOOK_ALLOW_PRIVATE)."""
import json

import pytest
from playwright.sync_api import expect

from tests.browser_kit import (  # noqa: F401 (browser, people: fixtures)
    PASSWORD, api, browser, open_room_id, pair, people, poll, serve, shot,
    sign_up)
from tests.helpers import unique_name

PUSH_SERVICE = r"""(() => {
  if (typeof PushManager === 'undefined') return;
  const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
    .replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  let current = null;
  PushManager.prototype.getSubscription = async () => current;
  PushManager.prototype.subscribe = async (options) => {
    const pair = await crypto.subtle.generateKey(
      {name: 'ECDH', namedCurve: 'P-256'}, true, ['deriveBits']);
    const keys = {p256dh: b64(await crypto.subtle.exportKey('raw', pair.publicKey)),
      auth: b64(crypto.getRandomValues(new Uint8Array(16)))};
    const endpoint = `${location.origin}/test-push-service/${crypto.randomUUID()}`;
    current = {
      endpoint,
      options: {applicationServerKey: options.applicationServerKey.buffer,
        userVisibleOnly: true},
      toJSON: () => ({endpoint, expirationTime: null, keys}),
      unsubscribe: async () => { current = null; return true; },
    };
    return current;
  };
})();"""

NOTIFICATIONS = """async () => {
  const registration = await navigator.serviceWorker.getRegistration('/static/');
  if (!registration) return [];
  return (await registration.getNotifications()).map(
    (n) => ({title: n.title, body: n.body, tag: n.tag}));
}"""

SUBSCRIPTIONS = """async () => {
  const res = await fetch('/api/push/subscriptions', {headers: {
    Authorization: `Bearer ${localStorage.getItem('postbox.token')}`}});
  return (await res.json()).subscriptions;
}"""


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, 'browser-push',
                     {'POSTBOX_WEBHOOK_ALLOW_PRIVATE': 'true'})


def test_enable_notifications_and_a_push_shows_one(people, server):
    page = people(init_script=PUSH_SERVICE)
    page.context.grant_permissions(['notifications'], origin=server.url)
    devtools = page.context.new_cdp_session(page)
    registrations = {}
    devtools.on('ServiceWorker.workerRegistrationUpdated', lambda ev: (
        registrations.update({r['scopeURL']: r for r in ev['registrations']
                              if not r['isDeleted']})))
    devtools.send('ServiceWorker.enable')
    name = unique_name('dana')
    sign_up(page, name, 'Dana Reyes')

    toggle = page.locator('#notify-toggle')
    expect(toggle).to_have_text('Enable notifications')
    toggle.click()
    expect(toggle).to_have_text('Notifications on')
    expect(page.locator('#notify-error')).to_be_hidden()
    subscriptions = page.evaluate(SUBSCRIPTIONS)
    assert [s['kind'] for s in subscriptions] == ['webpush']

    # A push as the server sends it (docs/protocol.md, "Push"), delivered
    # to the worker the page registered.
    poll(page, "navigator.serviceWorker.getRegistration('/static/')"
               ".then((r) => !!(r && r.active))", bool)
    scope = server.url + '/static/'
    assert scope in registrations, registrations
    devtools.send('ServiceWorker.deliverPushMessage', {
        'origin': server.url,
        'registrationId': registrations[scope]['registrationId'],
        'data': json.dumps({
            'type': 'message', 'room_id': 7, 'seq': 3, 'message_id': 31,
            'sender': {'id': 2, 'username': 'bob', 'display_name': 'Bob Chen'},
            'body': 'Lunch at 12:30?', 'unread': 2})})
    assert poll(page, NOTIFICATIONS, len) == [{
        'title': 'Bob Chen', 'body': 'Lunch at 12:30? (2 unread)',
        'tag': 'room-7'}]

    # Without a body (push_include_body off) it still says something.
    devtools.send('ServiceWorker.deliverPushMessage', {
        'origin': server.url,
        'registrationId': registrations[scope]['registrationId'],
        'data': json.dumps({
            'type': 'message', 'room_id': 8, 'seq': 1, 'message_id': 32,
            'sender': {'id': 3, 'username': 'erin'}, 'unread': 1})})
    assert {'title': 'erin', 'body': 'New message', 'tag': 'room-8'} in poll(
        page, NOTIFICATIONS, lambda shown: len(shown) > 1)

    # Turning them off removes the subscription from the server too.
    toggle.click()
    expect(toggle).to_have_text('Enable notifications')
    assert page.evaluate(SUBSCRIPTIONS) == []

    # So does signing out: whoever signs in next in this browser gets none
    # of Dana's notifications (seen from a session of hers elsewhere).
    toggle.click()
    expect(toggle).to_have_text('Notifications on')
    elsewhere = api(server, 'POST', '/api/login', body={
        'username': name, 'password': PASSWORD})['token']
    assert len(api(server, 'GET', '/api/push/subscriptions',
                   elsewhere)['subscriptions']) == 1
    page.click('#logout')
    expect(page.locator('#auth')).to_be_visible()
    assert api(server, 'GET', '/api/push/subscriptions',
               elsewhere)['subscriptions'] == []
    assert page.errors == [] and page.console_errors == []


def test_a_muted_room_stays_muted_after_reload(people):
    alice, bob, a_name, b_name = pair(people)
    room_id = open_room_id(alice)
    mute = alice.locator('#mute-toggle')
    item = alice.locator(f'.inbox-item[data-room-id="{room_id}"]')
    expect(mute).to_have_text('Mute')
    expect(item.locator('.muted-mark')).to_have_count(0)
    mute.click()
    expect(mute).to_have_text('Unmute')
    expect(mute).to_have_attribute('aria-pressed', 'true')
    expect(item.locator('.muted-mark')).to_be_visible()

    alice.reload()
    expect(alice.locator('#room-title')).to_have_text('Bob Chen')
    expect(mute).to_have_text('Unmute')
    expect(item.locator('.muted-mark')).to_be_visible()
    shot(alice, 'muted.png')

    # Muted is Alice's choice alone: Bob's side of the dm is not.
    bob.locator('.inbox-item', has_text='Alice Martin').click()
    expect(bob.locator('#mute-toggle')).to_have_text('Mute')

    mute.click()
    expect(mute).to_have_text('Mute')
    alice.reload()
    expect(alice.locator('#mute-toggle')).to_have_text('Mute')
    expect(item.locator('.muted-mark')).to_have_count(0)
    for page in (alice, bob):
        assert page.errors == [] and page.console_errors == []
