// "Enable notifications": a service worker (static/sw.js) shows Web Push
// messages while this page is closed. The browser subscribes with the
// server's VAPID key (GET /api/push/vapid) and the subscription is
// registered with the server (POST /api/push/subscriptions); the server
// pushes only while none of my sockets is connected, and never for a
// muted room. docs/protocol.md "Push".
import {api} from './page.js';
import {$} from './util.js';

const WORKER = '/static/sw.js';
// The worker's scope is its folder: it needs no page under it (it only
// shows notifications), so the server sends no Service-Worker-Allowed.
const SCOPE = '/static/';
// The server's id of this browser's subscription (for the DELETE).
const SAVED = 'postbox.push';

function supported() {
  return 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window;
}

function keyBytes(base64url) {
  const text = atob(base64url.replace(/-/g, '+').replace(/_/g, '/'));
  return Uint8Array.from(text, (ch) => ch.charCodeAt(0));
}

async function subscription() {
  const registration = await navigator.serviceWorker.getRegistration(SCOPE);
  return registration ? registration.pushManager.getSubscription() : null;
}

// Resolves once the registration's worker is active (push events need it).
function activated(registration) {
  const worker = registration.installing || registration.waiting || registration.active;
  if (worker.state === 'activated') return Promise.resolve(registration);
  return new Promise((resolve) => {
    worker.addEventListener('statechange', () => {
      if (worker.state === 'activated') resolve(registration);
    });
  });
}

export async function enablePush() {
  if (!supported()) throw new Error('This browser cannot show notifications.');
  if (await Notification.requestPermission() !== 'granted') {
    throw new Error('Notifications are blocked for this site in the browser settings.');
  }
  const registration = await activated(await navigator.serviceWorker.register(WORKER, {scope: SCOPE}));
  const {public_key: key} = await api('GET', '/api/push/vapid');
  let sub = await registration.pushManager.getSubscription();
  if (sub && sub.options.applicationServerKey) {
    // Subscribed for another server key (the server's data dir changed).
    const old = new Uint8Array(sub.options.applicationServerKey);
    if (old.join() !== keyBytes(key).join()) {
      await sub.unsubscribe();
      sub = null;
    }
  }
  if (!sub) {
    try {
      sub = await registration.pushManager.subscribe({
        userVisibleOnly: true, applicationServerKey: keyBytes(key)});
    } catch (err) {
      // Chromium refuses push in private windows with just this (while
      // notifications are allowed).
      if (err.name === 'AbortError' && /permission denied/.test(err.message)) {
        throw new Error('this browser window cannot receive push messages (a private window?)');
      }
      throw err;
    }
  }
  const {endpoint, keys} = sub.toJSON();
  const data = await api('POST', '/api/push/subscriptions', {
    kind: 'webpush', endpoint, keys: {p256dh: keys.p256dh, auth: keys.auth}});
  localStorage.setItem(SAVED, String(data.subscription.id));
}

// Stops notifications to this browser: the server forgets the subscription
// (while the token works) and the browser drops it.
export async function disablePush() {
  const id = localStorage.getItem(SAVED);
  localStorage.removeItem(SAVED);
  if (!supported()) return;
  try {
    if (id) await api('DELETE', `/api/push/subscriptions/${id}`);
  } finally {
    const sub = await subscription();
    if (sub) await sub.unsubscribe();
  }
}

// A click on a notification while a Postbox tab is open opens its room
// there (the worker cannot navigate a page outside its scope).
export function listenToWorker(openRoom) {
  if (!('serviceWorker' in navigator)) return;
  navigator.serviceWorker.addEventListener('message', (event) => {
    const data = event.data || {};
    if (data.type === 'open_room' && data.room_id) openRoom(data.room_id);
  });
  navigator.serviceWorker.startMessages();
}

export async function renderPushButton(error) {
  const button = $('notify-toggle');
  const on = supported() && !!localStorage.getItem(SAVED) && !!(await subscription());
  button.hidden = !supported();
  button.textContent = on ? 'Notifications on' : 'Enable notifications';
  button.classList.toggle('on', on);
  button.setAttribute('aria-pressed', String(on));
  button.title = on ? 'You get a notification for new messages while Postbox is closed. Click to turn off.'
    : 'Get a notification for new messages while Postbox is closed';
  $('notify-error').textContent = error || '';
  $('notify-error').hidden = !error;
}

export async function togglePush() {
  const button = $('notify-toggle');
  button.disabled = true;
  let error = '';
  try {
    if (button.getAttribute('aria-pressed') === 'true') await disablePush();
    else await enablePush();
  } catch (err) {
    error = `Notifications: ${err.message}`;
  }
  button.disabled = false;
  await renderPushButton(error);
}
