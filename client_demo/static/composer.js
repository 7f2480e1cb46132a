// The composer: writing, sending (shown at once, marked while it waits
// for its ack, retried or discarded after a refusal), editing, replying,
// deleting and reacting, attachments, the notice that says what went
// wrong, and the typing indicator both ways.
import {onMessage, onMessageUpdated, onRoomLeft} from './app.js';
import {refusalText} from './actions.js';
import {newClientMsgId} from './connection.js';
import {saveDraftText} from './drafts.js';
import {api, call, page} from './page.js';
import {addPending, timeline} from './store.js';
import {$, el, friendly, snippet, userName} from './util.js';
import {renderMessages, closePicker} from './views/messages.js';
import {renderTyping} from './views/room.js';

// Send `typing: true` again this often while the user keeps typing; the
// receivers drop the indicator 8 s after the last refresh.
const TYPING_REFRESH_MS = 3000;
const TYPING_EXPIRE_MS = 8000;
// How long the notice over the composer stays (long enough to read it).
const NOTICE_MS = 8000;
// Refusals that the same send would get again: retrying cannot help.
const FINAL_CODES = new Set(['invalid', 'too_large', 'not_found', 'conflict']);

export function onTyping(ev) {
  let room = page.ui.typing.get(ev.room_id);
  if (!room) page.ui.typing.set(ev.room_id, room = new Map());
  const old = room.get(ev.user.id);
  if (old) clearTimeout(old.timer);
  if (ev.typing && (!page.state.me || ev.user.id !== page.state.me.id)) {
    const timer = setTimeout(() => stopTypingIndicator(ev.room_id, ev.user.id), TYPING_EXPIRE_MS);
    room.set(ev.user.id, {user: ev.user, timer});
  } else room.delete(ev.user.id);
  if (ev.room_id === page.state.current) renderTyping();
}

export function stopTypingIndicator(roomId, userId) {
  const room = page.ui.typing.get(roomId);
  if (!room || !room.has(userId)) return;
  clearTimeout(room.get(userId).timer);
  room.delete(userId);
  if (roomId === page.state.current) renderTyping();
}

export function clearAllTyping() {
  for (const room of page.ui.typing.values()) for (const t of room.values()) clearTimeout(t.timer);
  page.ui.typing.clear();
  renderTyping();
}

export function typed() {
  const text = $('composer-input').value;
  updateSendButton();
  autoGrow();
  if (page.ui.editing || !page.state.current) return;
  // Kept as it is typed: a reload brings it back (drafts.js).
  saveDraftText(page.state.me, page.state.current, text);
  if (!text.trim()) {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (now - page.ui.typingSentAt > TYPING_REFRESH_MS) {
    page.ui.typingSentAt = now;
    call('typing', {room_id: page.state.current, typing: true}).catch(() => {});
  }
}

export function stopTyping() {
  if (!page.ui.typingSentAt || !page.state.current) return;
  page.ui.typingSentAt = 0;
  call('typing', {room_id: page.state.current, typing: false}).catch(() => {});
}

// ---------- composer ----------

export function autoGrow() {
  const input = $('composer-input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
}

export function updateSendButton() {
  const text = $('composer-input').value.trim();
  const uploading = page.ui.files.some((f) => f.status === 'uploading');
  const ready = page.ui.files.some((f) => f.status === 'ready');
  $('send').disabled = uploading || !(text || (ready && !page.ui.editing));
  $('send').textContent = page.ui.editing ? 'Save' : 'Send';
}

export async function submitComposer(event) {
  event.preventDefault();
  if ($('send').disabled) return;
  if (page.ui.editing) {
    saveEdit();
    return;
  }
  const roomId = page.state.current;
  const body = $('composer-input').value;
  const attachments = page.ui.files.filter((f) => f.status === 'ready').map((f) => f.attachment);
  if (!body.trim() && !attachments.length) return;
  const m = {
    id: null, seq: 0, room_id: roomId, client_msg_id: newClientMsgId(), sender: page.state.me,
    body: body.trim() ? body : '', attachments, created_at: new Date().toISOString(),
    edited_at: null, deleted: false, status: 'sending', reactions: {},
    reply_to: page.ui.replyTo ? page.ui.replyTo.id : null,
  };
  cancelReply();
  addPending(page.state, m);
  $('composer-input').value = '';
  saveDraftText(page.state.me, roomId, '');
  page.ui.files = [];
  renderFiles();
  autoGrow();
  updateSendButton();
  stopTyping();
  renderMessages('bottom');
  sendPending(m);
}

// Sends a message shown as pending; the connection keeps it queued across
// drops and resends it with the same client_msg_id, which makes a resend
// after a lost ack safe (the server stores it once).
export function sendPending(m) {
  m.status = 'sending';
  m.error = null;
  if (m.room_id === page.state.current) renderMessages('keep');
  const payload = {
    room_id: m.room_id, body: m.body, client_msg_id: m.client_msg_id,
    attachments: m.attachments.map((a) => a.id),
  };
  if (m.reply_to) payload.reply_to = m.reply_to;
  const conn = page.conn;
  conn.send(payload).then((stored) => {
    if (page.conn === conn) onMessage(stored, {isNew: false});
  }, (err) => {
    if (page.conn !== conn) return;
    // Not a member (a group left in another tab or on another device,
    // whose room_left this page missed), or no such room: the room goes,
    // as with room_left. In a dm, `forbidden` is a block (shown below).
    const entry = page.state.rooms.get(m.room_id);
    if (err.code === 'not_found' || (err.code === 'forbidden' && (!entry || entry.room.kind !== 'dm'))) {
      onRoomLeft({room_id: m.room_id});
      return;
    }
    m.status = 'failed';
    m.error = err.code === 'forbidden' ? refusalText(m.room_id) : friendly(err).replace(/\.$/, '');
    // A block can be lifted, a rate limit or an outage passes; a message
    // the server finds invalid or too long stays so.
    m.final = FINAL_CODES.has(err.code);
    if (m.room_id === page.state.current) renderMessages('keep');
  });
}

export function startEdit(m) {
  cancelReply();
  // What I was writing comes back when the edit ends.
  if (!page.ui.editing) page.ui.draftBeforeEdit = $('composer-input').value;
  page.ui.editing = m.id;
  $('editing').hidden = false;
  const input = $('composer-input');
  input.value = m.body;
  autoGrow();
  updateSendButton();
  input.focus();
}

export function cancelEdit() {
  if (!page.ui.editing) return;
  page.ui.editing = null;
  $('editing').hidden = true;
  $('composer-input').value = page.ui.draftBeforeEdit;
  page.ui.draftBeforeEdit = '';
  autoGrow();
  updateSendButton();
}

export function startReply(m) {
  cancelEdit();
  page.ui.replyTo = m;
  $('replying').hidden = false;
  $('replying-to').textContent = `Replying to ${m.sender.id === page.state.me.id ? 'yourself' : userName(m.sender)}`;
  $('replying-snippet').textContent = snippet(m);
  $('composer-input').focus();
}

export function cancelReply() {
  page.ui.replyTo = null;
  $('replying').hidden = true;
}

async function saveEdit() {
  const id = page.ui.editing;
  const body = $('composer-input').value;
  try {
    const ack = await call('edit_message', {message_id: id, body});
    if (page.ui.editing === id) cancelEdit();
    onMessageUpdated(ack.message);
  } catch (err) {
    showNotice(`Could not save the edit. ${friendly(err)}`);
  }
}

export async function deleteMessage(m) {
  if (!window.confirm('Delete this message for everyone?')) return;
  try {
    const ack = await call('delete_message', {message_id: m.id});
    if (page.ui.editing === m.id) cancelEdit();
    onMessageUpdated(ack.message);
  } catch (err) {
    showNotice(`Could not delete the message. ${friendly(err)}`);
  }
}

// Says what went wrong with something the user just did, over the
// composer (where they are looking), for a few seconds; renders of the
// conversation leave it alone.
export function showNotice(text) {
  clearTimeout(page.ui.noticeTimer);
  $('notice-text').textContent = text;
  $('notice').hidden = false;
  page.ui.noticeTimer = setTimeout(hideNotice, NOTICE_MS);
}

export function hideNotice() {
  clearTimeout(page.ui.noticeTimer);
  $('notice').hidden = true;
}

export function editLastOwn() {
  const c = page.state.convos.get(page.state.current);
  if (!c) return false;
  const mine = timeline(c).filter((m) => m.id && !m.deleted && m.sender.id === page.state.me.id);
  if (!mine.length) return false;
  startEdit(mine[mine.length - 1]);
  return true;
}

// ---------- attachments ----------

export function addFiles(fileList) {
  for (const file of fileList) upload(file);
}

async function upload(file) {
  const item = {file, status: 'uploading', attachment: null, error: null};
  page.ui.files.push(item);
  renderFiles();
  updateSendButton();
  const form = new FormData();
  form.append('file', file, file.name);
  try {
    const data = await api('POST', '/api/attachments', form);
    item.attachment = data.attachment;
    item.status = 'ready';
  } catch (err) {
    item.status = 'failed';
    // The server says why (415: "HTML, SVG and XML documents are not
    // allowed"); a proxy's bare 413 says nothing.
    item.error = err.code ? err.message : err.status === 413 ? 'too large' : err.message;
  }
  renderFiles();
  updateSendButton();
}

function renderFiles() {
  const items = page.ui.files.map((item) => {
    const li = el('li', item.status);
    let label = item.file.name;
    if (item.status === 'uploading') label += ' · uploading…';
    if (item.status === 'failed') label += ` · ${item.error}`;
    li.append(el('span', null, label));
    const remove = el('button', null, '×');
    remove.type = 'button';
    remove.title = 'Remove';
    remove.addEventListener('click', () => {
      page.ui.files = page.ui.files.filter((f) => f !== item);
      renderFiles();
      updateSendButton();
    });
    li.append(remove);
    return li;
  });
  $('pending-files').replaceChildren(...items);
}

// Adds my `emoji` to the message, or takes it back if it is there: decided
// on the newest version of the message, not the one rendered.
export async function toggleReaction(m, emoji) {
  const c = page.state.convos.get(m.room_id);
  const current = (c && c.messages.get(m.id)) || m;
  const on = !((current.reactions || {})[emoji] || []).includes(page.state.me.id);
  closePicker();
  try {
    const ack = await call('react', {message_id: m.id, emoji, on});
    onMessageUpdated(ack.message);
  } catch (err) {
    showNotice(`Could not ${on ? 'add' : 'remove'} the reaction. ${friendly(err)}`);
  }
}

