// What the client knows, DOM-free: the inbox, the loaded conversations,
// presence and blocks, and the reducers that apply server answers and
// events to them. Reducers only change the state they are given and say
// what changed; they do no I/O (the connection and the views do). The
// page and Node tests share this module.

export function createState(me = null) {
  return {
    me,                     // the signed-in user
    rooms: new Map(),       // room id -> inbox entry {room, last_message, unread, last_read_seq, muted}
    inboxPaged: false,      // the first inbox page came
    inboxMore: false,       // more inbox pages on the server
    inboxCursor: null,      // `before` for the next inbox page
    convos: new Map(),      // room id -> loaded conversation, see convo()
    current: null,          // room id on screen
    presence: new Map(),    // username -> {online, last_seen}
    blocked: new Set(),     // usernames I blocked
  };
}

// The room's conversation: messages by id, my sends waiting for their ack
// (by client_msg_id), receipts (user id -> seq read).
export function convo(state, roomId) {
  let c = state.convos.get(roomId);
  if (!c) {
    c = {messages: new Map(), pending: new Map(), hasMore: false, loaded: false,
      loadingOlder: false, read: {}};
    state.convos.set(roomId, c);
  }
  return c;
}

function isMine(state, m) {
  return !!state.me && !!m.sender && m.sender.id === state.me.id;
}

// Puts a message into a conversation; the newest version wins, and my own
// message replaces its pending copy.
export function putMessage(state, c, m) {
  const old = c.messages.get(m.id);
  if (!old || (m.update_seq || m.seq) >= (old.update_seq || old.seq)) c.messages.set(m.id, m);
  if (isMine(state, m)) c.pending.delete(m.client_msg_id);
}

// Messages in order: stored ones by seq, then the ones still sending.
export function timeline(c) {
  const stored = [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  return stored.concat([...c.pending.values()]);
}

// ---------- inbox ----------

export function activity(entry) {
  return (entry.last_message && entry.last_message.created_at) || entry.room.created_at || '';
}

// Inbox entries, latest activity first.
export function inbox(state) {
  return [...state.rooms.values()].sort((a, b) => (activity(a) < activity(b) ? 1 : -1));
}

export function totalUnread(state) {
  let n = 0;
  for (const entry of state.rooms.values()) n += entry.muted ? 0 : (entry.unread || 0);
  return n;
}

// One page of `rooms` ({rooms, has_more, next_before}); its entries
// replace what was known of those rooms, the others stay. `refresh` is the
// first page loaded again (after a reconnect): it does not rewind the
// paging cursor once paging has started.
export function applyInboxPage(state, ack, refresh) {
  // Each count covers the room's messages through its last_seq.
  for (const entry of ack.rooms) {
    state.rooms.set(entry.room.id, {muted: false, ...entry, counted_through: entry.room.last_seq, counted: []});
  }
  if (refresh && state.inboxPaged) return;
  state.inboxPaged = true;
  state.inboxMore = !!ack.has_more;
  state.inboxCursor = ack.has_more ? ack.next_before : null;
}

// A new room, or a group whose members, owner or name changed. Returns
// whether the room is new here (its latest message, if it has one, is
// then unknown: see applyLatest).
export function applyRoom(state, room) {
  const entry = state.rooms.get(room.id);
  if (entry) entry.room = room;
  else state.rooms.set(room.id, {room, last_message: null, unread: 0, last_read_seq: 0, muted: false});
  return !entry;
}

// The room's latest message as `history` or `join_room` gave it: the
// inbox preview, unless a newer message came meanwhile. Returns whether
// the preview changed.
export function applyLatest(state, roomId, m) {
  const entry = state.rooms.get(roomId);
  if (!entry || !m || (entry.last_message && entry.last_message.seq >= m.seq)) return false;
  entry.last_message = m;
  return true;
}

// I left the room or was removed: it goes entirely. Returns its old entry.
export function applyRoomLeft(state, roomId) {
  const entry = state.rooms.get(roomId);
  state.rooms.delete(roomId);
  state.convos.delete(roomId);
  return entry || null;
}

export function applyMuted(state, roomId, muted) {
  const entry = state.rooms.get(roomId);
  if (entry) entry.muted = muted;
}

// A message; `isNew` when its seq is past what the room had (it then
// counts as unread unless mine). Returns {known: false} for a room not in
// the inbox yet (the caller loads it), else {known, mine}.
export function applyMessage(state, m, isNew) {
  const c = state.convos.get(m.room_id);
  if (c && c.loaded) putMessage(state, c, m);
  else if (c) c.pending.delete(m.client_msg_id);
  const entry = state.rooms.get(m.room_id);
  const mine = isMine(state, m);
  if (!entry) return {known: false, mine};
  if (!entry.last_message || m.seq >= entry.last_message.seq) entry.last_message = m;
  if (!mine && isNew && !m.deleted && m.seq > (entry.last_read_seq || 0)
      && m.seq > (entry.counted_through || 0) && !(entry.counted || []).includes(m.seq)) {
    entry.unread = (entry.unread || 0) + 1;
    (entry.counted ||= []).push(m.seq);
  }
  return {known: true, mine};
}

// An edit, delete or reaction. A change to a message older than the loaded
// pages waits until that page loads (it then comes in its new version).
// A message of someone else that I had not read, deleted, no longer
// counts as unread, if it was counted: live (in `counted`), or by the
// server's count through `counted_through` taken before the delete (a
// count taken after it, or a message never counted, has nothing to take
// back: a `sync` may replay a delete the inbox page already left out).
// Returns whether the inbox line changed.
export function applyMessageUpdated(state, m) {
  const c = state.convos.get(m.room_id);
  if (c && c.messages.has(m.id)) putMessage(state, c, m);
  const entry = state.rooms.get(m.room_id);
  if (!entry) return false;
  let changed = false;
  if (m.deleted && !isMine(state, m) && m.seq > (entry.last_read_seq || 0) && entry.unread > 0) {
    const through = entry.counted_through || 0;
    const live = (entry.counted || []).indexOf(m.seq);
    if (live !== -1) entry.counted.splice(live, 1);
    if (live !== -1 || (m.seq <= through && (m.update_seq || m.seq) > through)) {
      entry.unread -= 1;
      changed = true;
    }
  }
  if (entry.last_message && entry.last_message.id === m.id) {
    entry.last_message = m;
    changed = true;
  }
  return changed;
}

// A read marker moved. Mine (from any of my tabs or devices, or my own
// mark_read's ack) carries my unread count in the room after the move,
// counted through the room's `last_seq`: a message above it that came
// live was not in that count (it is added), and one at or below it that
// comes live after is not counted again. Returns whether the inbox line
// changed.
export function applyRead(state, ev) {
  // Receipts of a room not loaded here come with its join_room.
  const c = state.convos.get(ev.room_id);
  if (c) c.read[ev.user_id] = Math.max(c.read[ev.user_id] || 0, ev.seq);
  const entry = state.rooms.get(ev.room_id);
  if (!entry || !state.me || ev.user_id !== state.me.id || typeof ev.unread !== 'number'
      || ev.seq < (entry.last_read_seq || 0)) return false;
  entry.last_read_seq = ev.seq;
  const through = ev.last_seq ?? ev.seq;
  entry.counted = (entry.counted || []).filter((s) => s > through && s > ev.seq);
  entry.unread = ev.unread + entry.counted.length;
  entry.counted_through = Math.max(entry.counted_through || 0, through);
  return true;
}

export function applyPresence(state, username, presence) {
  state.presence.set(username, presence);
}

// ---------- a conversation ----------

// The `join_room` ack: the newest page, receipts and the room.
export function applyJoin(state, roomId, ack) {
  const c = convo(state, roomId);
  const wasLoaded = c.loaded;
  c.loaded = true;
  for (const m of ack.messages) putMessage(state, c, m);
  if (!wasLoaded) c.hasMore = ack.has_more;
  for (const [uid, seq] of Object.entries(ack.read || {})) {
    c.read[uid] = Math.max(c.read[uid] || 0, seq);
  }
  const entry = state.rooms.get(roomId);
  if (entry && ack.room) entry.room = ack.room;
  applyLatest(state, roomId, ack.messages[ack.messages.length - 1]);
  return wasLoaded;
}

// An older `history` page.
export function applyOlder(state, roomId, ack) {
  const c = convo(state, roomId);
  for (const m of ack.messages) putMessage(state, c, m);
  c.hasMore = ack.has_more;
}

// A send of mine, shown while it waits for its ack.
export function addPending(state, m) {
  convo(state, m.room_id).pending.set(m.client_msg_id, m);
}

// A refused send I gave up on.
export function discardPending(state, m) {
  const c = state.convos.get(m.room_id);
  if (c) c.pending.delete(m.client_msg_id);
}

// The room's members other than me; in a dm, the other person.
export function otherMember(state, room) {
  if (!room || !state.me) return null;
  return room.members.find((u) => u.id !== state.me.id) || room.members[0];
}

// Everyone I share a room with (for `presence`).
export function contacts(state) {
  const names = new Set();
  for (const {room} of state.rooms.values()) {
    for (const u of room.members) if (state.me && u.id !== state.me.id) names.add(u.username);
  }
  return [...names];
}
