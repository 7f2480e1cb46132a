// Postbox demo client, the page's entry module: the session, the connection's
// events applied to the store and shown, the inbox (paged) and the open
// conversation. The wire contract is docs/protocol.md. Modules: api.js
// (HTTP), connection.js (socket, seqs, sync, sends; DOM-free), store.js
// (state and reducers; DOM-free), page.js (this page's session),
// signin.js (the sign-in form), composer.js and actions.js (what the user
// does), push.js (notifications), views/ (rendering), wire.js (the page's
// event listeners).
import {loadBlocked} from './actions.js';
import {autoGrow, cancelEdit, cancelReply, clearAllTyping, hideNotice, onTyping, stopTyping,
  stopTypingIndicator, updateSendButton} from './composer.js';
import {Connection} from './connection.js';
import {clearDraft, clearDrafts, loadDraft, saveDraftText} from './drafts.js';
import {api, call, page, resetUi} from './page.js';
import {disablePush, listenToWorker, renderPushButton} from './push.js';
import * as store from './store.js';
import {setAuthMode} from './signin.js';
import {$, paintAvatar, showError, userName} from './util.js';
import {renderInbox, roomTitle} from './views/inbox.js';
import {renderMessages} from './views/messages.js';
import {renderRoomHeader, renderTyping, toggleMembers} from './views/room.js';
import {wire} from './wire.js';

const HISTORY_PAGE = 50;
// Inbox lines loaded at a time (`rooms` {limit, before}); more on demand.
const INBOX_PAGE = 30;

// ---------- sign in ----------

export function signedIn(token, user) {
  page.token = token;
  page.state = store.createState(user);
  localStorage.setItem('postbox.token', token);
  localStorage.setItem('postbox.user', JSON.stringify(user));
  $('auth-password').value = '';
  startApp();
}

export function signOut(message) {
  // This browser's push subscription goes with the session, however it
  // ended (if the token no longer works, the push service's subscription
  // is dropped and the server forgets it at its next push).
  disablePush().catch(() => {});
  localStorage.removeItem('postbox.token');
  localStorage.removeItem('postbox.user');
  endSession(message);
}

// Ends this tab's session and shows the sign-in form; the browser's
// storage is left as it is (signOut clears it).
function endSession(message) {
  if (page.conn) page.conn.close();
  page.conn = null;
  for (const p of page.ui.blobs.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
  clearAllTyping();
  hideNotice();
  // This tab's drafts go with the session (the next account must not
  // see them).
  clearDrafts();
  showError('sidebar-note', '');
  page.token = null;
  page.state = store.createState(null);
  resetUi();
  $('replying').hidden = true;
  $('editing').hidden = true;
  history.replaceState(null, '', location.pathname);
  $('app').hidden = true;
  $('banner').hidden = true;
  $('auth').hidden = false;
  setAuthMode('login');
  showError('auth-error', message || '');
}

// Another tab of this browser signed out, or in as someone else: the
// session this tab holds is no longer the browser's, so it ends here too
// (its storage already says so: nothing to clear, and clearing it would
// sign out the other tab's new session). The user, written after the
// token, tells who (the token's own event may come before it).
export function onStorage(event) {
  if (!page.token || (event.key !== 'postbox.user' && event.key !== null)) return;
  const user = event.key ? JSON.parse(event.newValue || 'null') : null;
  // Signed in again as me: this tab's token still works.
  if (user && page.state.me && user.id === page.state.me.id) return;
  endSession(user ? 'You signed in as someone else in another tab.'
    : 'You signed out in another tab.');
}

// Signs this browser out: its push subscription goes first (while the
// token still works), then the token.
export async function logout() {
  await disablePush().catch(() => {});
  api('POST', '/api/logout', {}).catch(() => {});
  signOut();
}

// Revokes every token of the account: this page and every other session
// (other tabs, devices) end; the others see "Your session has ended". The
// account's bots lose their tokens too, so it asks first.
export async function signOutEverywhere() {
  if (!window.confirm('Sign out on every device? Bots you own are signed '
                      + 'out too: each will need a new token.')) return;
  $('logout-all').disabled = true;
  try {
    await disablePush().catch(() => {});
    await api('POST', '/api/logout', {all: true});
    signOut('You were signed out everywhere.');
  } catch (err) {
    showError('sidebar-error', `Could not sign out everywhere: ${err.message}`);
  } finally {
    $('logout-all').disabled = false;
  }
}

// ---------- the connection ----------

function connect() {
  // socket.io-client 4.8 (static/vendor) is the page's global `io`.
  page.conn = new Connection({
    io: window.io,
    token: page.token,
    handlers: {
      message: onMessage,
      message_updated: onMessageUpdated,
      room: onRoom,
      room_left: onRoomLeft,
      typing: onTyping,
      read: onRead,
      presence: onPresence,
      muted: onMuted,
      connecting: onConnecting,
      connected: onConnected,
      disconnected: onDisconnected,
      unauthorized: () => signOut('Your session has ended. Please sign in again.'),
      error: (err) => console.warn('catch-up failed', err),
    },
  }).connect();
}

// Before catching up: the first page of the inbox; after a drop the
// session did not survive, the seq of every room (see seedAllRooms).
async function onConnecting({first, recovered}) {
  $('banner').hidden = true;
  loadBlocked().catch((err) => console.warn('block list failed', err));
  if (first) await loadInbox();
  else if (!recovered) await seedAllRooms();
}

// `sync` counts rooms left out of its map from seq 0, so rooms beyond the
// loaded inbox pages would come back with their whole history: their
// current seqs (from `rooms` pages of 500) go into the map instead. Their
// news shows when the inbox's first page is loaded again, or their page.
async function seedAllRooms() {
  let before = null;
  for (;;) {
    const ack = await call('rooms', before ? {limit: 500, before} : {limit: 500});
    for (const entry of ack.rooms) page.conn.seed(entry.room.id, entry.room.last_seq);
    if (!ack.has_more) return;
    before = ack.next_before;
  }
}

// Caught up: refresh the inbox's first page, join the open room again
// (joins are per socket), ask who is online.
async function onConnected({first}) {
  if (!first) await loadInbox();
  if (page.state.current) await openRoom(page.state.current, true);
  else {
    const fromHash = /^#room=(\d+)$/.exec(location.hash);
    if (fromHash) openRoom(Number(fromHash[1]));
  }
  queryPresence();
}

function onDisconnected() {
  $('banner').hidden = false;
  clearAllTyping();
  // Unknown until the next connect asks again; a stale "Online" lies.
  page.state.presence.clear();
  renderInbox();
  if (page.state.current) renderRoomHeader();
}

// ---------- inbox ----------

async function loadInbox() {
  const ack = await call('rooms', {limit: INBOX_PAGE});
  store.applyInboxPage(page.state, ack, true);
  for (const entry of ack.rooms) page.conn.seed(entry.room.id, entry.room.last_seq);
  renderInbox();
  if (page.state.current) renderRoomHeader();
}

export async function loadMoreInbox() {
  const state = page.state;
  if (!state.inboxMore || page.ui.loadingInbox) return;
  page.ui.loadingInbox = true;
  renderInbox();
  try {
    const ack = await call('rooms', {limit: INBOX_PAGE, before: state.inboxCursor});
    if (page.state !== state) return;
    store.applyInboxPage(state, ack, false);
    for (const entry of ack.rooms) page.conn.seed(entry.room.id, entry.room.last_seq);
    queryPresence();
  } catch (err) {
    showError('sidebar-error', err.message);
  } finally {
    page.ui.loadingInbox = false;
    renderInbox();
  }
}

// A new room, or a group whose members, owner or name changed.
export function onRoom(room) {
  const isNew = store.applyRoom(page.state, room);
  if (page.conn) page.conn.seed(room.id, room.last_seq);
  renderInbox();
  queryPresence();
  if (room.id === page.state.current) renderRoomHeader();
  // A group I was added to may have a history: its latest message is the
  // inbox line's preview and time.
  if (isNew && room.last_seq > 0) loadLatest(room.id);
}

async function loadLatest(roomId) {
  const state = page.state;
  try {
    const ack = await call('history', {room_id: roomId, limit: 1});
    if (store.applyLatest(state, roomId, ack.messages[0]) && page.state === state) renderInbox();
  } catch (err) { /* the preview stays empty until the next message */ }
}

// I left the group (here, in another tab, on another device) or was
// removed (room_left does not say which; neither is an error): it goes
// quietly from this view entirely. Also for a room the
// server refuses as not mine (`forbidden`/`not_found` for a join or a
// send: left while this page missed the event, or an old link). If it
// was on screen, a neutral note says why it closed (not after my own
// click on "Leave group" here).
export function onRoomLeft(ev) {
  const wasOpen = page.state.current === ev.room_id;
  const entry = store.applyRoomLeft(page.state, ev.room_id);
  if (page.conn) page.conn.forget(ev.room_id);
  page.ui.typing.delete(ev.room_id);
  if (wasOpen) closeRoom({gone: true});
  clearDraft(page.state.me, ev.room_id);
  renderInbox();
  const onPurpose = page.ui.leaving.delete(ev.room_id);
  if (wasOpen && !onPurpose) {
    showNote(entry ? `You are no longer in “${roomTitle(entry.room)}”.`
      : 'You are not in that conversation.');
  }
}

// A neutral line under the sidebar's forms (not an error).
function showNote(text) {
  showError('sidebar-note', text);
}

// I muted or unmuted a room, here or on another tab or device.
function onMuted(ev) {
  store.applyMuted(page.state, ev.room_id, ev.muted);
  renderInbox();
  if (ev.room_id === page.state.current) renderRoomHeader();
}

// ---------- presence and receipts ----------

async function queryPresence() {
  const names = store.contacts(page.state);
  if (!names.length) return;
  try {
    // The server answers at most 100 names per call.
    for (let i = 0; i < names.length; i += 100) {
      const ack = await call('presence', {usernames: names.slice(i, i + 100)});
      for (const [name, p] of Object.entries(ack.presence)) store.applyPresence(page.state, name, p);
    }
    renderInbox();
    if (page.state.current) renderRoomHeader();
  } catch (err) { /* shown again on the next event or reconnect */ }
}

function onPresence(ev) {
  store.applyPresence(page.state, ev.user.username, {online: ev.online, last_seen: ev.last_seen});
  renderInbox();
  if (page.state.current) renderRoomHeader();
}

function onRead(ev) {
  if (store.applyRead(page.state, ev)) renderInbox();
  if (ev.room_id === page.state.current) renderMessages('keep');
}

export async function markRead() {
  const roomId = page.state.current;
  if (!roomId || !page.conn || document.visibilityState !== 'visible') return;
  const entry = page.state.rooms.get(roomId);
  const seq = page.conn.lastSeq.get(roomId) || 0;
  if (!entry || seq <= (entry.last_read_seq || 0)) return;
  const before = entry.last_read_seq || 0;
  entry.last_read_seq = seq;
  entry.unread = 0;
  renderInbox();
  try {
    const ack = await call('mark_read', {room_id: roomId, seq});
    store.applyRead(page.state, {room_id: roomId, user_id: page.state.me.id, ...ack});
    renderInbox();
  } catch (err) {
    // Not stored: the marker goes back to what the server has (not 0,
    // which would count old messages a sync replays as unread), so the
    // next chance tries again; unless something newer moved it meanwhile.
    if (entry.last_read_seq === seq) entry.last_read_seq = before;
  }
}

// ---------- messages ----------

// A message from the connection (live, recovered, synced) or a send's ack.
export function onMessage(m, {isNew}) {
  const {known, mine} = store.applyMessage(page.state, m, isNew);
  stopTypingIndicator(m.room_id, m.sender.id);
  if (!known) {
    // A room not in the loaded inbox pages: it is now the latest.
    loadInbox().catch(() => {});
    return;
  }
  renderInbox();
  if (m.room_id === page.state.current) {
    renderMessages(mine ? 'bottom' : 'keep');
    markRead();
  }
}

export function onMessageUpdated(m) {
  if (store.applyMessageUpdated(page.state, m)) renderInbox();
  if (m.room_id === page.state.current) renderMessages('keep');
}

// ---------- the open conversation ----------

export async function openRoom(roomId, rejoin) {
  const state = page.state;
  if (state.current !== roomId) {
    if (state.current) {
      stopTyping();
      call('leave_room', {room_id: state.current}).catch(() => {});
    }
    cancelEdit();
    cancelReply();
    saveDraft();
    hideNotice();
    showError('sidebar-note', '');
    page.ui.picker = null;
    state.current = roomId;
    page.ui.nodes.clear();
    toggleMembers(false);
    history.replaceState(null, '', `#room=${roomId}`);
    $('app').classList.add('in-room');
    $('no-room').hidden = true;
    $('room').hidden = false;
    $('composer-input').value = loadDraft(state.me, roomId);
    autoGrow();
    updateSendButton();
    renderTyping();
    renderInbox();
    renderRoomHeader();
    renderMessages('bottom');
    $('composer-input').focus();
  }
  let ack;
  try {
    ack = await call('join_room', {room_id: roomId});
  } catch (err) {
    if (state.current !== roomId || page.state !== state) return;
    if (err.code === 'forbidden' || err.code === 'not_found') onRoomLeft({room_id: roomId});
    else $('history-status').textContent = err.code === 'offline' ? '' : err.message;
    return;
  }
  if (state.current !== roomId) return;
  // A room beyond the loaded inbox pages (a link, a search result).
  if (!state.rooms.has(roomId)) onRoom(ack.room);
  const wasLoaded = store.applyJoin(state, roomId, ack);
  renderInbox();
  renderRoomHeader();
  renderMessages(wasLoaded && rejoin ? 'keep' : 'bottom');
  markRead();
  fillViewport();
}

// Narrow screens show one pane at a time: back to the inbox. `gone`: I
// am out of the room (nothing to tell the server, no draft to keep).
export function closeRoom(options) {
  const gone = !!options && options.gone === true;
  if (page.state.current) {
    if (!gone) stopTyping();
    page.ui.typingSentAt = 0;
    cancelEdit();
    cancelReply();
    if (!gone) {
      saveDraft();
      call('leave_room', {room_id: page.state.current}).catch(() => {});
    }
  }
  page.state.current = null;
  page.ui.picker = null;
  page.ui.nodes.clear();
  toggleMembers(false);
  history.replaceState(null, '', location.pathname);
  $('app').classList.remove('in-room');
  $('room').hidden = true;
  $('no-room').hidden = false;
  renderInbox();
}

// What I was writing in the open room, kept for when I come back (after
// cancelEdit: an edit's text is not a draft). The composer also saves it
// as it is typed (composer.js, typed), so a reload keeps it.
function saveDraft() {
  if (!page.state.current) return;
  saveDraftText(page.state.me, page.state.current, $('composer-input').value);
}

export async function loadOlder() {
  const state = page.state;
  const roomId = state.current;
  const c = state.convos.get(roomId);
  if (!c || !c.loaded || !c.hasMore || c.loadingOlder) return;
  const oldest = store.timeline(c).find((m) => m.seq);
  if (!oldest) return;
  c.loadingOlder = true;
  renderMessages('older');
  try {
    const ack = await call('history', {room_id: roomId, before: oldest.seq, limit: HISTORY_PAGE});
    store.applyOlder(state, roomId, ack);
  } catch (err) { /* scrolling up again retries */ }
  c.loadingOlder = false;
  if (state.current === roomId) {
    renderMessages('older');
    fillViewport();
  }
}

// A short first page does not scroll, so the scroll handler would never
// ask for more: ask now.
function fillViewport() {
  const box = $('messages');
  if (box.scrollHeight <= box.clientHeight + 10) loadOlder();
}

// ---------- start ----------

function startApp() {
  const me = page.state.me;
  $('auth').hidden = true;
  $('app').hidden = false;
  paintAvatar($('me-avatar'), userName(me), me.username);
  $('me-name').textContent = userName(me);
  $('me-username').textContent = `@${me.username}`;
  renderInbox();
  renderPushButton();
  connect();
}

wire();
listenToWorker((roomId) => page.token && openRoom(roomId));
if (page.token && page.state.me) startApp();
else signOut();
