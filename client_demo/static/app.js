// Postbox demo client: plain JavaScript against the wire contract in
// PROTOCOL.md. User data is only ever put into the page as text
// (textContent, attributes), never parsed as HTML.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);

  // How long an ack may take before the client treats the call as lost.
  const ACK_TIMEOUT_MS = 15000;
  // Send `typing: true` again this often while the user keeps typing; the
  // receivers drop the indicator 8 s after the last refresh.
  const TYPING_REFRESH_MS = 3000;
  const TYPING_EXPIRE_MS = 8000;
  const PAGE_SIZE = 50;
  // The quick reactions offered by the picker (any emoji works on the wire).
  const REACTIONS = ['👍', '❤️', '😂', '😮', '😢'];
  const SNIPPET_CHARS = 90;

  const state = {
    token: localStorage.getItem('postbox.token'),
    me: JSON.parse(localStorage.getItem('postbox.user') || 'null'),
    socket: null,
    seeded: false,          // the inbox was loaded once since sign-in
    rooms: new Map(),       // room id -> {room, last_message, unread, last_read_seq}
    lastSeq: new Map(),     // room id -> highest seq seen (for sync)
    convos: new Map(),      // room id -> loaded conversation, see convo()
    current: null,          // room id on screen
    presence: new Map(),    // username -> {online, last_seen}
    typing: new Map(),      // room id -> Map(user id -> {user, timer})
    blobs: new Map(),       // attachment url -> Promise of a blob: URL
    files: [],              // attachments being prepared in the composer
    editing: null,          // id of the message being edited
    replyTo: null,          // message the composer replies to
    picker: null,           // id of the message whose reaction picker is open
    blocked: new Set(),     // usernames I blocked (from GET /api/blocks)
    typingSentAt: 0,
    nodes: new Map(),       // message key -> rendered <li> (reused while unchanged)
  };

  // ---------- small helpers ----------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
  }

  function initials(name) {
    const parts = (name || '?').trim().split(/[\s._]+/).filter(Boolean);
    return ((parts[0] || '?')[0] + (parts[1] ? parts[1][0] : '')).toUpperCase();
  }

  const PALETTE = ['#5b6cf0', '#e0607e', '#1fa38a', '#f08a3c', '#8a5cf0',
    '#2f96d8', '#c9527a', '#4b9a48', '#d6703a', '#6a74a0'];
  function colorFor(key) {
    let h = 0;
    for (const ch of String(key)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    return PALETTE[h % PALETTE.length];
  }

  function paintAvatar(node, label, key, group) {
    node.textContent = initials(label);
    node.style.background = colorFor(key);
    node.classList.toggle('group', !!group);
  }

  function userName(user) {
    return (user && (user.display_name || user.username)) || 'Someone';
  }

  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth()
      && a.getDate() === b.getDate();
  }

  function clock(date) {
    return date.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
  }

  function shortTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    const now = new Date();
    if (sameDay(d, now)) return clock(d);
    if (now - d < 6 * 864e5) return d.toLocaleDateString([], {weekday: 'short'});
    return d.toLocaleDateString([], {month: 'short', day: 'numeric'});
  }

  function dayLabel(date) {
    const now = new Date();
    if (sameDay(date, now)) return 'Today';
    if (sameDay(date, new Date(now - 864e5))) return 'Yesterday';
    return date.toLocaleDateString([], {weekday: 'long', month: 'long', day: 'numeric'});
  }

  function lastSeenText(p) {
    if (!p) return '';
    if (p.online) return 'Online';
    if (!p.last_seen) return 'Offline';
    const d = new Date(p.last_seen);
    const mins = Math.round((Date.now() - d) / 60000);
    if (mins < 1) return 'Last seen just now';
    if (mins < 60) return `Last seen ${mins} min ago`;
    if (sameDay(d, new Date())) return `Last seen today at ${clock(d)}`;
    return `Last seen ${d.toLocaleDateString([], {month: 'short', day: 'numeric'})}`;
  }

  function humanSize(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1048576).toFixed(1)} MB`;
  }

  function showError(id, text) {
    const node = $(id);
    node.textContent = text || '';
    node.hidden = !text;
  }

  // ---------- HTTP ----------

  async function api(method, path, body) {
    const headers = {};
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    let payload;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const res = await fetch(path, {method, headers, body: payload});
    let data = null;
    try { data = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      const err = new Error((data && data.error && data.error.message) || `HTTP ${res.status}`);
      err.status = res.status;
      err.code = data && data.error && data.error.code;
      throw err;
    }
    return data;
  }

  // ---------- sign in ----------

  let authMode = 'login';

  function setAuthMode(mode) {
    authMode = mode;
    $('tab-login').classList.toggle('active', mode === 'login');
    $('tab-register').classList.toggle('active', mode === 'register');
    $('display-name-field').hidden = mode !== 'register';
    $('auth-submit').textContent = mode === 'login' ? 'Sign in' : 'Create account';
    $('auth-password').autocomplete = mode === 'login' ? 'current-password' : 'new-password';
    showError('auth-error', '');
  }

  async function submitAuth(event) {
    event.preventDefault();
    const body = {
      username: $('auth-username').value.trim().toLowerCase(),
      password: $('auth-password').value,
    };
    const display = $('auth-display-name').value.trim();
    if (authMode === 'register' && display) body.display_name = display;
    $('auth-submit').disabled = true;
    try {
      const data = await api('POST', authMode === 'login' ? '/api/login' : '/api/register', body);
      signedIn(data.token, data.user);
    } catch (err) {
      showError('auth-error', err.status === 401 ? 'Wrong username or password.'
        : err.status === 409 ? 'That username is taken.' : err.message);
    } finally {
      $('auth-submit').disabled = false;
    }
  }

  function signedIn(token, user) {
    state.token = token;
    state.me = user;
    localStorage.setItem('postbox.token', token);
    localStorage.setItem('postbox.user', JSON.stringify(user));
    $('auth-password').value = '';
    startApp();
  }

  function signOut(message) {
    if (state.socket) {
      state.socket.removeAllListeners();
      state.socket.disconnect();
      state.socket = null;
    }
    localStorage.removeItem('postbox.token');
    localStorage.removeItem('postbox.user');
    for (const p of state.blobs.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
    Object.assign(state, {
      token: null, me: null, seeded: false, current: null, editing: null, files: [],
      replyTo: null, picker: null,
    });
    $('replying').hidden = true;
    $('editing').hidden = true;
    for (const key of ['rooms', 'lastSeq', 'convos', 'presence', 'typing', 'blobs', 'nodes',
      'blocked']) {
      state[key].clear();
    }
    history.replaceState(null, '', location.pathname);
    $('app').hidden = true;
    $('banner').hidden = true;
    $('auth').hidden = false;
    setAuthMode('login');
    showError('auth-error', message || '');
  }

  // ---------- socket ----------

  function call(event, data) {
    return new Promise((resolve, reject) => {
      const socket = state.socket;
      if (!socket || !socket.connected) {
        const err = new Error('You are offline.');
        err.code = 'offline';
        reject(err);
        return;
      }
      socket.timeout(ACK_TIMEOUT_MS).emit(event, data, (timeout, ack) => {
        if (timeout) {
          const err = new Error('No answer from the server.');
          err.code = 'offline';
          reject(err);
        } else if (!ack || !ack.ok) {
          const e = (ack && ack.error) || {};
          const err = new Error(e.message || 'Something went wrong.');
          err.code = e.code;
          reject(err);
        } else {
          resolve(ack);
        }
      });
    });
  }

  function connect() {
    // Polling first, then the upgrade to WebSocket (the client's default):
    // works behind proxies that do not pass WebSockets.
    // forceNew: a sign-out and sign-in must not reuse the old Manager.
    // recover: connection state recovery; after a short drop (or a server
    // restart) the missed events arrive before `connect` and
    // socket.recovered is true, so no `sync` is needed.
    const socket = io({auth: {token: state.token, recover: true}, forceNew: true});
    state.socket = socket;
    socket.on('connect', () => {
      $('banner').hidden = true;
      onConnected().catch((err) => console.warn('catch-up failed', err));
    });
    socket.on('disconnect', (reason) => {
      $('banner').hidden = false;
      clearAllTyping();
      // Unknown until the next connect asks again; a stale "Online" lies.
      state.presence.clear();
      renderInbox();
      if (state.current) renderRoomHeader();
      // The server closed us (restart, shutdown): socket.io-client does not
      // come back by itself in that case.
      if (reason === 'io server disconnect') retryConnect(socket);
    });
    socket.on('connect_error', (err) => {
      if (err && err.message === 'unauthorized') {
        signOut('Your session has ended. Please sign in again.');
        return;
      }
      $('banner').hidden = false;
      // A refusal by the server stops the built-in reconnection.
      if (!socket.active) retryConnect(socket);
    });
    socket.on('message', (m) => onMessage(m, true));
    socket.on('message_updated', (m) => onMessageUpdated(m, true));
    socket.on('room', onRoom);
    socket.on('room_left', onRoomLeft);
    socket.on('typing', onTyping);
    socket.on('read', onRead);
    socket.on('presence', onPresence);
  }

  function retryConnect(socket) {
    setTimeout(() => {
      if (state.socket === socket && !socket.connected) socket.connect();
    }, 1000 + Math.random() * 2000);
  }

  // After every (re)connect: catch up with `sync`, refresh the inbox,
  // re-join the open room (joins are per socket), resend what was queued.
  async function onConnected() {
    loadBlocked().catch((err) => console.warn('block list failed', err));
    const first = !state.seeded;
    if (first) {
      await loadInbox();
      state.seeded = true;
    }
    if (first || !state.socket.recovered) await catchUp();
    if (!first) await loadInbox();
    if (state.current) await openRoom(state.current, true);
    else {
      const fromHash = /^#room=(\d+)$/.exec(location.hash);
      if (fromHash && state.rooms.has(Number(fromHash[1]))) openRoom(Number(fromHash[1]));
    }
    resendPending();
    queryPresence();
  }

  async function catchUp() {
    for (;;) {
      const ack = await call('sync', {rooms: Object.fromEntries(state.lastSeq)});
      for (const ev of ack.events) {
        if (ev.type === 'room_left') {  // left or removed while away
          onRoomLeft(ev);
          continue;
        }
        if (ev.type === 'message') onMessage(ev.message, true);
        else if (ev.type === 'message_updated') onMessageUpdated(ev.message, true);
        else if (ev.type === 'room') onRoom(ev.room);
        bumpSeq(ev.room_id, ev.seq);
      }
      if (!ack.has_more || !ack.events.length) break;
    }
  }

  function bumpSeq(roomId, seq) {
    if (typeof seq === 'number' && seq > (state.lastSeq.get(roomId) || 0)) {
      state.lastSeq.set(roomId, seq);
    }
  }

  // ---------- inbox ----------

  async function loadInbox() {
    const ack = await call('rooms', {});
    const fresh = new Map();
    for (const entry of ack.rooms) {
      fresh.set(entry.room.id, entry);
      if (!state.lastSeq.has(entry.room.id)) state.lastSeq.set(entry.room.id, entry.room.last_seq);
    }
    state.rooms = fresh;
    renderInbox();
    if (state.current) renderRoomHeader();
  }

  function otherMember(room) {
    if (!room || !state.me) return null;
    return room.members.find((u) => u.id !== state.me.id) || room.members[0];
  }

  function roomTitle(room) {
    if (room.kind === 'dm') return userName(otherMember(room));
    return room.name || room.members.map(userName).join(', ');
  }

  function preview(entry) {
    const m = entry.last_message;
    if (!m) return 'No messages yet';
    const mine = state.me && m.sender.id === state.me.id;
    let text;
    if (m.deleted) text = 'Message deleted';
    else if (m.body) text = m.body.replace(/\s+/g, ' ');
    else if (m.attachments && m.attachments.length) {
      const a = m.attachments[0];
      text = a.content_type.startsWith('image/') ? 'Photo' : a.filename;
    } else text = '';
    if (mine) return `You: ${text}`;
    if (entry.room.kind === 'group') return `${userName(m.sender)}: ${text}`;
    return text;
  }

  function activity(entry) {
    return (entry.last_message && entry.last_message.created_at) || entry.room.created_at || '';
  }

  function renderInbox() {
    const entries = [...state.rooms.values()].sort((a, b) => (activity(a) < activity(b) ? 1 : -1));
    const list = $('inbox');
    const items = entries.map((entry) => {
      const room = entry.room;
      const li = el('li', 'inbox-item');
      li.dataset.roomId = room.id;
      li.classList.toggle('active', room.id === state.current);
      li.classList.toggle('unread', entry.unread > 0);
      const wrap = el('div', 'avatar-wrap');
      const av = el('div', 'avatar');
      const other = room.kind === 'dm' ? otherMember(room) : null;
      paintAvatar(av, roomTitle(room), other ? other.username : `group${room.id}`, room.kind === 'group');
      wrap.append(av);
      if (other) {
        const dot = el('span', 'dot');
        const p = state.presence.get(other.username);
        dot.classList.toggle('online', !!(p && p.online));
        wrap.append(dot);
      }
      const main = el('div', 'inbox-main');
      const top = el('div', 'inbox-top');
      top.append(el('span', 'inbox-name', roomTitle(room)),
        el('span', 'inbox-time', shortTime(entry.last_message && entry.last_message.created_at)));
      const bottom = el('div', 'inbox-bottom');
      bottom.append(el('span', 'inbox-preview', preview(entry)));
      if (entry.unread > 0) bottom.append(el('span', 'badge', entry.unread > 99 ? '99+' : String(entry.unread)));
      main.append(top, bottom);
      li.append(wrap, main);
      li.addEventListener('click', () => openRoom(room.id));
      return li;
    });
    list.replaceChildren(...items);
    $('inbox-empty').hidden = entries.length > 0;
    const unread = entries.reduce((n, e) => n + (e.unread || 0), 0);
    document.title = unread ? `(${unread}) Postbox` : 'Postbox';
  }

  // A new room, or a group whose members, owner or name changed (its
  // last_seq is then the seq of that change).
  function onRoom(room) {
    const entry = state.rooms.get(room.id);
    if (entry) entry.room = room;
    else {
      state.rooms.set(room.id, {room, last_message: null, unread: 0, last_read_seq: 0});
      if (!state.lastSeq.has(room.id)) state.lastSeq.set(room.id, room.last_seq);
    }
    bumpSeq(room.id, room.last_seq);
    renderInbox();
    queryPresence();
    if (room.id === state.current) renderRoomHeader();
  }

  // I left the group, or was removed: it goes from this view entirely.
  function onRoomLeft(ev) {
    const roomId = ev.room_id;
    const entry = state.rooms.get(roomId);
    state.rooms.delete(roomId);
    state.lastSeq.delete(roomId);
    state.convos.delete(roomId);
    state.typing.delete(roomId);
    if (state.current === roomId) closeRoom();
    renderInbox();
    if (entry) showError('sidebar-error', `You are no longer in “${roomTitle(entry.room)}”.`);
  }

  async function startDm(event) {
    event.preventDefault();
    const username = $('new-dm-username').value.trim().toLowerCase();
    if (!username) return;
    showError('sidebar-error', '');
    try {
      const ack = await call('open_dm', {username});
      $('new-dm-username').value = '';
      onRoom(ack.room);
      openRoom(ack.room.id);
    } catch (err) {
      showError('sidebar-error', err.code === 'not_found' ? `No user named “${username}”.`
        : err.code === 'forbidden' ? `@${username} isn't accepting messages from you.` : err.message);
    }
  }

  async function createGroup(event) {
    event.preventDefault();
    const name = $('new-group-name').value.trim();
    const members = $('new-group-members').value.split(/[\s,]+/).map((s) => s.trim().toLowerCase()).filter(Boolean);
    showError('sidebar-error', '');
    try {
      const ack = await call('create_group', {name, members});
      $('new-group-name').value = '';
      $('new-group-members').value = '';
      $('new-group').hidden = true;
      onRoom(ack.room);
      openRoom(ack.room.id);
    } catch (err) {
      showError('sidebar-error', err.message);
    }
  }

  // ---------- presence ----------

  async function queryPresence() {
    const names = new Set();
    for (const {room} of state.rooms.values()) {
      for (const u of room.members) if (state.me && u.id !== state.me.id) names.add(u.username);
    }
    if (!names.size) return;
    try {
      // The server answers at most 100 names per call.
      const all = [...names];
      for (let i = 0; i < all.length; i += 100) {
        const ack = await call('presence', {usernames: all.slice(i, i + 100)});
        for (const [name, p] of Object.entries(ack.presence)) state.presence.set(name, p);
      }
      renderInbox();
      if (state.current) renderRoomHeader();
    } catch (err) { /* shown again on the next event or reconnect */ }
  }

  function onPresence(ev) {
    state.presence.set(ev.user.username, {online: ev.online, last_seen: ev.last_seen});
    renderInbox();
    if (state.current) renderRoomHeader();
  }

  // ---------- messages ----------

  function convo(roomId) {
    let c = state.convos.get(roomId);
    if (!c) {
      c = {messages: new Map(), pending: new Map(), hasMore: false, loaded: false,
        loadingOlder: false, read: {}};
      state.convos.set(roomId, c);
    }
    return c;
  }

  // Put a message into a loaded conversation; the newest version wins.
  function store(c, m) {
    const old = c.messages.get(m.id);
    if (!old || (m.update_seq || m.seq) >= (old.update_seq || old.seq)) c.messages.set(m.id, m);
    if (state.me && m.sender.id === state.me.id) c.pending.delete(m.client_msg_id);
  }

  function onMessage(m, fromServerEvent) {
    const isNew = m.seq > (state.lastSeq.get(m.room_id) || 0);
    if (fromServerEvent) bumpSeq(m.room_id, m.seq);
    const c = state.convos.get(m.room_id);
    if (c && c.loaded) store(c, m);
    else if (c) c.pending.delete(m.client_msg_id);
    const entry = state.rooms.get(m.room_id);
    if (!entry) {
      loadInbox().catch(() => {});
      return;
    }
    if (!entry.last_message || m.seq >= entry.last_message.seq) entry.last_message = m;
    const mine = state.me && m.sender.id === state.me.id;
    if (mine) stopTypingIndicator(m.room_id, m.sender.id);
    else {
      stopTypingIndicator(m.room_id, m.sender.id);
      if (isNew && m.seq > (entry.last_read_seq || 0)) entry.unread = (entry.unread || 0) + 1;
    }
    renderInbox();
    if (m.room_id === state.current) {
      renderMessages(mine ? 'bottom' : 'keep');
      markRead();
    }
  }

  function onMessageUpdated(m, fromServerEvent) {
    if (fromServerEvent) bumpSeq(m.room_id, m.update_seq);
    const c = state.convos.get(m.room_id);
    // A change to a message older than the loaded pages waits until that
    // page is loaded (it then comes in its new version).
    if (c && c.messages.has(m.id)) store(c, m);
    const entry = state.rooms.get(m.room_id);
    if (entry && entry.last_message && entry.last_message.id === m.id) {
      entry.last_message = m;
      renderInbox();
    }
    if (m.room_id === state.current) renderMessages('keep');
  }

  function onRead(ev) {
    const c = convo(ev.room_id);
    c.read[ev.user_id] = Math.max(c.read[ev.user_id] || 0, ev.seq);
    if (ev.room_id === state.current) renderMessages('keep');
  }

  async function markRead() {
    const roomId = state.current;
    if (!roomId || document.visibilityState !== 'visible') return;
    const entry = state.rooms.get(roomId);
    const seq = state.lastSeq.get(roomId) || 0;
    if (!entry || seq <= (entry.last_read_seq || 0)) return;
    entry.last_read_seq = seq;
    entry.unread = 0;
    renderInbox();
    try {
      const ack = await call('mark_read', {room_id: roomId, seq});
      entry.unread = ack.unread;
      renderInbox();
    } catch (err) {
      entry.last_read_seq = 0;  // try again on the next chance
    }
  }

  // ---------- conversation view ----------

  async function openRoom(roomId, rejoin) {
    if (state.current !== roomId) {
      if (state.current) {
        stopTyping();
        call('leave_room', {room_id: state.current}).catch(() => {});
      }
      cancelEdit();
      cancelReply();
      state.picker = null;
      state.current = roomId;
      state.nodes.clear();
      toggleMembers(false);
      history.replaceState(null, '', `#room=${roomId}`);
      $('app').classList.add('in-room');
      $('no-room').hidden = true;
      $('room').hidden = false;
      $('composer-input').value = '';
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
      $('history-status').textContent = err.code === 'offline' ? '' : err.message;
      return;
    }
    if (state.current !== roomId) return;
    const c = convo(roomId);
    const wasLoaded = c.loaded;
    c.loaded = true;
    for (const m of ack.messages) store(c, m);
    if (!wasLoaded) c.hasMore = ack.has_more;
    for (const [uid, seq] of Object.entries(ack.read || {})) {
      c.read[uid] = Math.max(c.read[uid] || 0, seq);
    }
    const entry = state.rooms.get(roomId);
    if (entry) entry.room = ack.room;
    renderRoomHeader();
    renderMessages(wasLoaded && rejoin ? 'keep' : 'bottom');
    markRead();
    fillViewport();
  }

  // Narrow screens show one pane at a time: back to the inbox.
  function closeRoom() {
    if (state.current) {
      stopTyping();
      cancelEdit();
      cancelReply();
      call('leave_room', {room_id: state.current}).catch(() => {});
    }
    state.current = null;
    state.picker = null;
    state.nodes.clear();
    toggleMembers(false);
    history.replaceState(null, '', location.pathname);
    $('app').classList.remove('in-room');
    $('room').hidden = true;
    $('no-room').hidden = false;
    renderInbox();
  }

  function renderRoomHeader() {
    const entry = state.rooms.get(state.current);
    if (!entry) return;
    const room = entry.room;
    const other = room.kind === 'dm' ? otherMember(room) : null;
    paintAvatar($('room-avatar'), roomTitle(room), other ? other.username : `group${room.id}`, room.kind === 'group');
    $('room-title').textContent = roomTitle(room);
    const dot = $('room-dot');
    if (other) {
      const p = state.presence.get(other.username);
      dot.hidden = false;
      dot.classList.toggle('online', !!(p && p.online));
      $('room-status').textContent = p ? `${lastSeenText(p)} · @${other.username}` : `@${other.username}`;
    } else {
      dot.hidden = true;
      $('room-status').textContent = `${room.members.length} members: ${room.members.map(userName).join(', ')}`;
    }
    renderBlock(other);
    $('members-toggle').hidden = room.kind !== 'group';
    $('members-toggle').textContent = `Members (${room.members.length})`;
    if (room.kind !== 'group') toggleMembers(false);
    else renderMembers();
  }

  // ---------- group members ----------

  function currentGroup() {
    const entry = state.rooms.get(state.current);
    return entry && entry.room.kind === 'group' ? entry.room : null;
  }

  function toggleMembers(open) {
    const show = !!currentGroup() && (open === undefined ? $('members-panel').hidden : open);
    $('members-panel').hidden = !show;
    $('members-toggle').setAttribute('aria-expanded', String(show));
    showError('members-error', '');
    if (show) renderMembers();
  }

  function renderMembers() {
    const room = currentGroup();
    if (!room || $('members-panel').hidden) return;
    const me = state.me;
    const owner = !!me && room.owner_id === me.id;
    $('members-title').textContent = `Members (${room.members.length})`;
    $('rename-form').hidden = !owner;
    if (owner && document.activeElement !== $('rename-input')) $('rename-input').value = room.name || '';
    const items = room.members.map((u) => {
      const li = el('li', 'member');
      li.dataset.username = u.username;
      const av = el('div', 'avatar');
      paintAvatar(av, userName(u), u.username);
      const text = el('div', 'member-text');
      const name = el('div', 'member-name', userName(u) + (me && u.id === me.id ? ' (you)' : ''));
      if (u.id === room.owner_id) name.append(el('span', 'owner-badge', 'owner'));
      text.append(name, el('div', 'muted small', `@${u.username}`));
      li.append(av, text);
      if (owner && u.id !== me.id) {
        const remove = el('button', 'member-remove', 'Remove');
        remove.type = 'button';
        remove.title = `Remove @${u.username} from the group`;
        remove.addEventListener('click', () => removeMember(room.id, u.username, remove));
        li.append(remove);
      }
      return li;
    });
    $('members-list').replaceChildren(...items);
  }

  // Runs one group event; its ack's room (if any) updates the view at once
  // (the live `room` event that follows changes nothing more).
  async function groupCall(event, data, button) {
    showError('members-error', '');
    if (button) button.disabled = true;
    try {
      const ack = await call(event, data);
      if (ack.room) onRoom(ack.room);
      return ack;
    } catch (err) {
      showError('members-error', err.message);
      return null;
    } finally {
      if (button) button.disabled = false;
    }
  }

  async function addMembers(event) {
    event.preventDefault();
    const room = currentGroup();
    const members = $('add-input').value.split(/[\s,]+/).map((s) => s.trim().toLowerCase()).filter(Boolean);
    if (!room || !members.length) return;
    if (await groupCall('add_members', {room_id: room.id, members}, $('add-submit'))) {
      $('add-input').value = '';
    }
  }

  async function renameGroup(event) {
    event.preventDefault();
    const room = currentGroup();
    if (!room) return;
    await groupCall('rename_group', {room_id: room.id, name: $('rename-input').value.trim()},
      $('rename-submit'));
  }

  function removeMember(roomId, username, button) {
    return groupCall('remove_member', {room_id: roomId, username}, button);
  }

  async function leaveGroup() {
    const room = currentGroup();
    if (!room) return;
    if (await groupCall('leave_group', {room_id: room.id}, $('leave-group'))) {
      onRoomLeft({room_id: room.id});
    }
  }

  // ---------- blocking (dm rooms) ----------

  // Whom I block comes from the server (GET /api/blocks), so every device
  // and a fresh browser agree; loaded on each connect, then kept in step
  // with the acks of block/unblock.
  async function loadBlocked() {
    const token = state.token;
    const data = await api('GET', '/api/blocks');
    if (state.token !== token) return;  // signed out meanwhile
    state.blocked = new Set(data.blocks.map((b) => b.user.username));
    if (state.current) renderRoomHeader();
  }

  function renderBlock(other) {
    const button = $('block-toggle');
    const blocked = !!other && state.blocked.has(other.username);
    button.hidden = !other;
    button.textContent = blocked ? 'Unblock' : 'Block';
    button.classList.toggle('on', blocked);
    button.title = other ? `${blocked ? 'Unblock' : 'Block'} @${other.username}` : '';
    $('block-notice').hidden = !blocked;
    $('block-notice-text').textContent = blocked
      ? `You blocked ${userName(other)}. They can't message you; you can still write to them.` : '';
  }

  async function toggleBlock() {
    const entry = state.rooms.get(state.current);
    const other = entry && entry.room.kind === 'dm' ? otherMember(entry.room) : null;
    if (!other) return;
    const on = !state.blocked.has(other.username);
    $('block-toggle').disabled = true;
    $('block-notice-undo').disabled = true;
    try {
      await call(on ? 'block' : 'unblock', {username: other.username});
      // The ok ack means the change is committed: no need to reload.
      if (on) state.blocked.add(other.username);
      else state.blocked.delete(other.username);
    } catch (err) {
      alertInline(err.message);
    }
    $('block-toggle').disabled = false;
    $('block-notice-undo').disabled = false;
    if (state.current) renderRoomHeader();
  }

  // What a refused send says: in a dm, the other user has blocked us.
  function refusalText(roomId) {
    const entry = state.rooms.get(roomId);
    const other = entry && entry.room.kind === 'dm' ? otherMember(entry.room) : null;
    return other ? `${userName(other)} isn't accepting messages from you`
      : "you can't send messages here";
  }

  // Messages in order: stored ones by seq, then the ones still sending.
  function timeline(c) {
    const stored = [...c.messages.values()].sort((a, b) => a.seq - b.seq);
    return stored.concat([...c.pending.values()]);
  }

  function seenLabel(c, room, myLast) {
    if (!myLast || myLast.pending) return '';
    const others = room.members.filter((u) => u.id !== state.me.id);
    const seen = others.filter((u) => (c.read[u.id] || 0) >= myLast.seq);
    if (!seen.length) return '';
    if (room.kind === 'dm') return 'Seen';
    if (seen.length === others.length) return 'Seen by everyone';
    return `Seen by ${seen.map(userName).join(', ')}`;
  }

  function renderMessages(scroll) {
    const roomId = state.current;
    const box = $('messages');
    const list = $('message-list');
    const c = state.convos.get(roomId);
    const entry = state.rooms.get(roomId);
    if (!c || !entry) {
      list.replaceChildren();
      $('history-status').textContent = 'Loading…';
      return;
    }
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const heightBefore = box.scrollHeight;
    const topBefore = box.scrollTop;
    const items = timeline(c);
    // Receipts go under my last message that the server has (not one still
    // sending or refused).
    const myLast = [...items].reverse().find((m) => m.sender.id === state.me.id && !m.deleted && m.id);
    const seen = seenLabel(c, entry.room, myLast);
    const nodes = [];
    let prev = null;
    for (const m of items) {
      const date = new Date(m.created_at);
      if (!prev || !sameDay(new Date(prev.created_at), date)) {
        const day = el('li', 'day');
        day.append(el('span', null, dayLabel(date)));
        nodes.push(day);
      }
      const first = !prev || prev.sender.id !== m.sender.id
        || new Date(m.created_at) - new Date(prev.created_at) > 5 * 60000
        || !sameDay(new Date(prev.created_at), date);
      const key = m.id ? `m${m.id}` : `p${m.client_msg_id}`;
      const showSeen = m === myLast ? seen : '';
      // The quoted original, when it is loaded (its changes show in the quote).
      const orig = m.reply_to ? c.messages.get(m.reply_to) || null : null;
      const version = [m.update_seq, m.edited_at, m.deleted, m.status, m.error, first, showSeen,
        entry.room.kind, JSON.stringify(m.reactions || {}), state.picker === m.id,
        orig ? `${orig.update_seq || orig.seq}` : ''].join('|');
      let node = state.nodes.get(key);
      if (!node || node.dataset.version !== version) {
        node = renderMessage(m, first, showSeen, entry.room, orig);
        node.dataset.version = version;
        state.nodes.set(key, node);
      }
      nodes.push(node);
      prev = m;
    }
    list.replaceChildren(...nodes);
    $('history-status').textContent = c.loadingOlder ? 'Loading earlier messages…'
      : (c.loaded && !c.hasMore && items.length ? 'This is the start of the conversation.'
        : (c.loaded && !items.length ? 'No messages yet. Say hello!' : ''));
    if (scroll === 'bottom' || (scroll === 'keep' && atBottom)) box.scrollTop = box.scrollHeight;
    else if (scroll === 'older') box.scrollTop = topBefore + (box.scrollHeight - heightBefore);
  }

  function renderMessage(m, first, seen, room, orig) {
    const mine = m.sender.id === state.me.id;
    const li = el('li', 'msg');
    li.classList.toggle('mine', mine);
    li.classList.toggle('first', first);
    li.classList.toggle('deleted', !!m.deleted);
    li.classList.toggle('pending', m.status === 'sending');
    li.classList.toggle('failed', m.status === 'failed');
    if (m.id) li.dataset.id = m.id;
    li.dataset.cmid = m.client_msg_id || '';
    if (first && !mine && room.kind === 'group') li.append(el('div', 'msg-sender', userName(m.sender)));

    const row = el('div', 'msg-row');
    const bubble = el('div', 'bubble');
    if (m.deleted) {
      bubble.append(el('div', 'body', 'This message was deleted'));
    } else {
      if (m.reply_to) bubble.append(renderQuote(orig));
      const atts = el('div', 'attachments');
      for (const a of m.attachments || []) atts.append(renderAttachment(a));
      if ((m.attachments || []).some((a) => a.content_type.startsWith('image/'))) bubble.classList.add('has-image');
      bubble.append(atts);
      if (m.body) bubble.append(el('div', 'body', m.body));
      else if (!m.reply_to && (m.attachments || []).every((a) => a.content_type.startsWith('image/'))) {
        bubble.classList.add('bare');
      }
    }
    row.append(bubble);
    if (!m.deleted && m.id) {
      const actions = el('div', 'actions');
      const reactBtn = actionButton('react-open', '☺', `React to ${mine ? 'your' : 'this'} message`,
        () => togglePicker(m.id));
      reactBtn.setAttribute('aria-expanded', String(state.picker === m.id));
      const reply = actionButton('reply', 'Reply', 'Reply to this message', () => startReply(m));
      actions.append(reactBtn, reply);
      if (mine) {
        actions.append(actionButton('edit', 'Edit', 'Edit this message', () => startEdit(m)),
          actionButton('delete', 'Delete', 'Delete this message', () => deleteMessage(m)));
      }
      row.append(actions);
    }
    li.append(row);
    if (!m.deleted && m.id) {
      const reactions = renderReactions(m, room);
      if (reactions) li.append(reactions);
      if (state.picker === m.id) li.append(renderPicker(m));
    }

    let meta = clock(new Date(m.created_at));
    if (m.edited_at && !m.deleted) meta += ' · edited';
    if (m.status === 'sending') meta = 'Sending…';
    li.append(el('div', 'meta', meta));
    if (m.status === 'failed') {
      const retry = el('button', 'retry link', `Not sent: ${m.error || 'error'}. Retry`);
      retry.type = 'button';
      retry.addEventListener('click', () => trySend(m));
      li.append(retry);
    }
    if (seen) li.append(el('div', 'seen', seen));
    return li;
  }

  function actionButton(cls, label, title, onClick) {
    const button = el('button', cls, label);
    button.type = 'button';
    button.title = title;
    if (label.length <= 2) button.setAttribute('aria-label', title);
    button.addEventListener('click', onClick);
    return button;
  }

  // One line of text standing for a message (quotes, the reply bar).
  function snippet(m) {
    if (m.deleted) return 'Deleted message';
    if (m.body) {
      const text = m.body.replace(/\s+/g, ' ').trim();
      return text.length > SNIPPET_CHARS ? `${text.slice(0, SNIPPET_CHARS - 1)}…` : text;
    }
    const a = (m.attachments || [])[0];
    if (a) return a.content_type.startsWith('image/') ? 'Photo' : a.filename;
    return '';
  }

  // The quote on top of a reply: the original when loaded (a button that
  // scrolls to it), otherwise a plain "earlier message".
  function renderQuote(orig) {
    const quote = el(orig ? 'button' : 'div', 'quote');
    if (orig) {
      quote.type = 'button';
      quote.title = 'Show the original message';
      quote.addEventListener('click', () => scrollToMessage(orig.id));
      quote.append(el('span', 'quote-sender', orig.sender.id === state.me.id ? 'You' : userName(orig.sender)),
        el('span', 'quote-text', snippet(orig)));
    } else {
      quote.classList.add('missing');
      quote.append(el('span', 'quote-text', 'Reply to an earlier message'));
    }
    return quote;
  }

  function scrollToMessage(id) {
    const node = document.querySelector(`#message-list .msg[data-id="${Number(id)}"]`);
    if (!node) return;
    node.scrollIntoView({block: 'center', behavior: 'smooth'});
    node.classList.remove('flash');
    void node.offsetWidth;  // restart the highlight animation
    node.classList.add('flash');
  }

  // Reactions under a message: emoji and count, pressed when one is mine;
  // a click toggles mine.
  function renderReactions(m, room) {
    const entries = Object.entries(m.reactions || {}).filter(([, users]) => users && users.length);
    if (!entries.length) return null;
    const box = el('div', 'reactions');
    for (const [emoji, users] of entries) {
      const mine = users.includes(state.me.id);
      const chip = el('button', 'reaction');
      chip.type = 'button';
      chip.classList.toggle('mine', mine);
      chip.setAttribute('aria-pressed', String(mine));
      chip.append(el('span', 'reaction-emoji', emoji), ' ', el('span', 'reaction-count', String(users.length)));
      const names = users.map((id) => (id === state.me.id ? 'You'
        : userName(room.members.find((u) => u.id === id))));
      chip.title = `${names.join(', ')} reacted with ${emoji}`
        + (mine ? ' (click to remove yours)' : ' (click to add yours)');
      chip.addEventListener('click', () => toggleReaction(m, emoji));
      box.append(chip);
    }
    return box;
  }

  function renderPicker(m) {
    const picker = el('div', 'picker');
    picker.setAttribute('role', 'group');
    picker.setAttribute('aria-label', 'Reactions');
    for (const emoji of REACTIONS) {
      const mine = ((m.reactions || {})[emoji] || []).includes(state.me.id);
      const button = actionButton('pick', emoji, `React with ${emoji}`, () => toggleReaction(m, emoji));
      button.classList.toggle('mine', mine);
      button.setAttribute('aria-pressed', String(mine));
      picker.append(button);
    }
    return picker;
  }

  function togglePicker(id) {
    state.picker = state.picker === id ? null : id;
    renderMessages('keep');
    const first = document.querySelector('#message-list .picker .pick');
    if (first) first.focus();
  }

  function closePicker() {
    if (state.picker === null) return;
    state.picker = null;
    if (state.current) renderMessages('keep');
  }

  // Adds my `emoji` to the message, or takes it back if it is there: decided
  // on the newest version of the message, not the one rendered.
  async function toggleReaction(m, emoji) {
    const c = state.convos.get(m.room_id);
    const current = (c && c.messages.get(m.id)) || m;
    const on = !((current.reactions || {})[emoji] || []).includes(state.me.id);
    closePicker();
    try {
      const ack = await call('react', {message_id: m.id, emoji, on});
      onMessageUpdated(ack.message, false);
    } catch (err) {
      alertInline(err.message);
    }
  }

  function renderAttachment(a) {
    // Only the server's thumbnail is shown in the page: an image without
    // one is too big to decode safely (it may be a decompression bomb) and
    // is a download like any other file.
    if (a.content_type.startsWith('image/') && a.thumbnail_url) {
      const img = el('img', 'att-image');
      img.alt = a.filename;
      if (a.width && a.height) {
        const scale = Math.min(1, 320 / a.width, 320 / a.height);
        img.width = Math.round(a.width * scale);
        img.height = Math.round(a.height * scale);
      }
      // The thumbnail, never the original: a small file can still decode
      // to gigabytes. Clicking opens the original.
      blobUrl(a.thumbnail_url).then((url) => {
        const box = $('messages');
        const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
        img.addEventListener('load', () => { if (atBottom) box.scrollTop = box.scrollHeight; }, {once: true});
        img.src = url;
      }, () => { img.alt = `${a.filename} (could not load)`; });
      img.addEventListener('click', () => showImage(a));
      return img;
    }
    const link = el('a', 'att-file');
    link.href = '#';
    link.title = `Download ${a.filename}`;
    const ext = (a.filename.split('.').pop() || 'file').slice(0, 4);
    const text = el('div');
    text.append(el('div', 'att-name', a.filename), el('div', 'att-size', humanSize(a.size)));
    link.append(el('div', 'att-icon', ext), text);
    link.addEventListener('click', async (event) => {
      event.preventDefault();
      try {
        const save = el('a');
        save.href = await blobUrl(a.url);
        save.download = a.filename;
        save.click();
      } catch (err) { /* the link stays; the user can try again */ }
    });
    return link;
  }

  // Attachment URLs need the Authorization header, so images and downloads
  // are fetched and shown from blob: URLs (kept for the session).
  function blobUrl(url) {
    if (!state.blobs.has(url)) {
      const p = fetch(url, {headers: {Authorization: `Bearer ${state.token}`}})
        .then((res) => {
          if (!res.ok) throw new Error(`HTTP ${res.status}`);
          return res.blob();
        })
        .then((blob) => URL.createObjectURL(blob));
      p.catch(() => state.blobs.delete(url));
      state.blobs.set(url, p);
    }
    return state.blobs.get(url);
  }

  async function showImage(a) {
    const overlay = el('div', 'lightbox');
    overlay.style.cssText = 'position:fixed;inset:0;background:rgba(10,14,30,.82);display:grid;'
      + 'place-items:center;z-index:20;cursor:zoom-out';
    const img = el('img');
    img.style.cssText = 'max-width:92vw;max-height:92vh;border-radius:8px';
    img.alt = a.filename;
    overlay.append(img);
    overlay.addEventListener('click', () => overlay.remove());
    document.body.append(overlay);
    try { img.src = await blobUrl(a.url); } catch (err) { overlay.remove(); }
  }

  async function loadOlder() {
    const roomId = state.current;
    const c = state.convos.get(roomId);
    if (!c || !c.loaded || !c.hasMore || c.loadingOlder) return;
    const oldest = timeline(c).find((m) => m.seq);
    if (!oldest) return;
    c.loadingOlder = true;
    renderMessages('older');
    try {
      const ack = await call('history', {room_id: roomId, before: oldest.seq, limit: PAGE_SIZE});
      for (const m of ack.messages) store(c, m);
      c.hasMore = ack.has_more;
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

  // ---------- typing ----------

  function onTyping(ev) {
    let room = state.typing.get(ev.room_id);
    if (!room) state.typing.set(ev.room_id, room = new Map());
    const old = room.get(ev.user.id);
    if (old) clearTimeout(old.timer);
    if (ev.typing && (!state.me || ev.user.id !== state.me.id)) {
      const timer = setTimeout(() => stopTypingIndicator(ev.room_id, ev.user.id), TYPING_EXPIRE_MS);
      room.set(ev.user.id, {user: ev.user, timer});
    } else room.delete(ev.user.id);
    if (ev.room_id === state.current) renderTyping();
  }

  function stopTypingIndicator(roomId, userId) {
    const room = state.typing.get(roomId);
    if (!room || !room.has(userId)) return;
    clearTimeout(room.get(userId).timer);
    room.delete(userId);
    if (roomId === state.current) renderTyping();
  }

  function clearAllTyping() {
    for (const room of state.typing.values()) for (const t of room.values()) clearTimeout(t.timer);
    state.typing.clear();
    renderTyping();
  }

  function renderTyping() {
    const room = state.typing.get(state.current);
    const names = room ? [...room.values()].map((t) => userName(t.user)) : [];
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = 'Several people are typing…';
    $('typing').textContent = text;
  }

  function typed() {
    const text = $('composer-input').value;
    updateSendButton();
    autoGrow();
    if (state.editing || !state.current) return;
    if (!text.trim()) {
      stopTyping();
      return;
    }
    const now = Date.now();
    if (now - state.typingSentAt > TYPING_REFRESH_MS) {
      state.typingSentAt = now;
      call('typing', {room_id: state.current, typing: true}).catch(() => {});
    }
  }

  function stopTyping() {
    if (!state.typingSentAt || !state.current) return;
    state.typingSentAt = 0;
    call('typing', {room_id: state.current, typing: false}).catch(() => {});
  }

  // ---------- composer ----------

  function autoGrow() {
    const input = $('composer-input');
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  function updateSendButton() {
    const text = $('composer-input').value.trim();
    const uploading = state.files.some((f) => f.status === 'uploading');
    const ready = state.files.some((f) => f.status === 'ready');
    $('send').disabled = uploading || !(text || (ready && !state.editing));
    $('send').textContent = state.editing ? 'Save' : 'Send';
  }

  async function submitComposer(event) {
    event.preventDefault();
    if ($('send').disabled) return;
    if (state.editing) {
      saveEdit();
      return;
    }
    const roomId = state.current;
    const body = $('composer-input').value;
    const attachments = state.files.filter((f) => f.status === 'ready').map((f) => f.attachment);
    if (!body.trim() && !attachments.length) return;
    const m = {
      id: null, seq: 0, room_id: roomId, client_msg_id: newId(), sender: state.me,
      body: body.trim() ? body : '', attachments, created_at: new Date().toISOString(),
      edited_at: null, deleted: false, status: 'sending', reactions: {},
      reply_to: state.replyTo ? state.replyTo.id : null,
    };
    cancelReply();
    convo(roomId).pending.set(m.client_msg_id, m);
    $('composer-input').value = '';
    state.files = [];
    renderFiles();
    autoGrow();
    updateSendButton();
    stopTyping();
    renderMessages('bottom');
    trySend(m);
  }

  // Sends (or resends) a queued message. The same client_msg_id makes a
  // resend after a lost ack safe: the server stores it once.
  async function trySend(m) {
    m.status = 'sending';
    if (m.room_id === state.current) renderMessages('keep');
    try {
      const payload = {
        room_id: m.room_id, body: m.body, client_msg_id: m.client_msg_id,
        attachments: m.attachments.map((a) => a.id),
      };
      if (m.reply_to) payload.reply_to = m.reply_to;
      const ack = await call('send_dm', payload);
      onMessage(ack.message, false);
    } catch (err) {
      if (err.code === 'offline') return;  // resent after the reconnect
      m.status = 'failed';
      m.error = err.code === 'forbidden' ? refusalText(m.room_id) : err.message;
      if (m.room_id === state.current) renderMessages('keep');
    }
  }

  function resendPending() {
    for (const c of state.convos.values()) {
      for (const m of c.pending.values()) if (m.status === 'sending') trySend(m);
    }
  }

  function startEdit(m) {
    cancelReply();
    state.editing = m.id;
    $('editing').hidden = false;
    const input = $('composer-input');
    input.value = m.body;
    autoGrow();
    updateSendButton();
    input.focus();
  }

  function cancelEdit() {
    if (!state.editing) return;
    state.editing = null;
    $('editing').hidden = true;
    $('composer-input').value = '';
    autoGrow();
    updateSendButton();
  }

  function startReply(m) {
    cancelEdit();
    state.replyTo = m;
    $('replying').hidden = false;
    $('replying-to').textContent = `Replying to ${m.sender.id === state.me.id ? 'yourself' : userName(m.sender)}`;
    $('replying-snippet').textContent = snippet(m);
    $('composer-input').focus();
  }

  function cancelReply() {
    state.replyTo = null;
    $('replying').hidden = true;
  }

  async function saveEdit() {
    const id = state.editing;
    const body = $('composer-input').value;
    try {
      const ack = await call('edit_message', {message_id: id, body});
      cancelEdit();
      onMessageUpdated(ack.message, false);
    } catch (err) {
      alertInline(err.message);
    }
  }

  async function deleteMessage(m) {
    try {
      const ack = await call('delete_message', {message_id: m.id});
      if (state.editing === m.id) cancelEdit();
      onMessageUpdated(ack.message, false);
    } catch (err) {
      alertInline(err.message);
    }
  }

  function alertInline(text) {
    $('history-status').textContent = text;
  }

  function editLastOwn() {
    const c = state.convos.get(state.current);
    if (!c) return false;
    const mine = timeline(c).filter((m) => m.id && !m.deleted && m.sender.id === state.me.id);
    if (!mine.length) return false;
    startEdit(mine[mine.length - 1]);
    return true;
  }

  // ---------- attachments ----------

  function addFiles(fileList) {
    for (const file of fileList) upload(file);
  }

  async function upload(file) {
    const item = {file, status: 'uploading', attachment: null, error: null};
    state.files.push(item);
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
      item.error = err.status === 413 ? 'too large' : err.status === 415 ? 'type not allowed' : err.message;
    }
    renderFiles();
    updateSendButton();
  }

  function renderFiles() {
    const items = state.files.map((item) => {
      const li = el('li', item.status);
      let label = item.file.name;
      if (item.status === 'uploading') label += ' · uploading…';
      if (item.status === 'failed') label += ` · ${item.error}`;
      li.append(el('span', null, label));
      const remove = el('button', null, '×');
      remove.type = 'button';
      remove.title = 'Remove';
      remove.addEventListener('click', () => {
        state.files = state.files.filter((f) => f !== item);
        renderFiles();
        updateSendButton();
      });
      li.append(remove);
      return li;
    });
    $('pending-files').replaceChildren(...items);
  }

  // Revokes every token of the account: this page and every other session
  // (other tabs, devices) end; the others see "Your session has ended".
  async function signOutEverywhere() {
    $('logout-all').disabled = true;
    try {
      await api('POST', '/api/logout', {all: true});
      signOut('You were signed out everywhere.');
    } catch (err) {
      showError('sidebar-error', `Could not sign out everywhere: ${err.message}`);
    } finally {
      $('logout-all').disabled = false;
    }
  }

  // ---------- start ----------

  async function startApp() {
    $('auth').hidden = true;
    $('app').hidden = false;
    paintAvatar($('me-avatar'), userName(state.me), state.me.username);
    $('me-name').textContent = userName(state.me);
    $('me-username').textContent = `@${state.me.username}`;
    renderInbox();
    connect();
  }

  function wire() {
    $('tab-login').addEventListener('click', () => setAuthMode('login'));
    $('tab-register').addEventListener('click', () => setAuthMode('register'));
    $('auth-form').addEventListener('submit', submitAuth);
    $('logout').addEventListener('click', () => {
      api('POST', '/api/logout', {}).catch(() => {});
      signOut();
    });
    $('logout-all').addEventListener('click', signOutEverywhere);
    $('block-toggle').addEventListener('click', toggleBlock);
    $('block-notice-undo').addEventListener('click', toggleBlock);
    $('members-toggle').addEventListener('click', () => toggleMembers());
    $('members-close').addEventListener('click', () => toggleMembers(false));
    $('add-form').addEventListener('submit', addMembers);
    $('rename-form').addEventListener('submit', renameGroup);
    $('leave-group').addEventListener('click', leaveGroup);
    $('reply-cancel').addEventListener('click', () => {
      cancelReply();
      $('composer-input').focus();
    });
    $('new-dm').addEventListener('submit', startDm);
    $('new-group-toggle').addEventListener('click', () => {
      $('new-group').hidden = !$('new-group').hidden;
      if (!$('new-group').hidden) $('new-group-name').focus();
    });
    $('new-group').addEventListener('submit', createGroup);
    $('composer').addEventListener('submit', submitComposer);
    const input = $('composer-input');
    input.addEventListener('input', typed);
    input.addEventListener('blur', stopTyping);
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $('composer').requestSubmit();
      } else if (event.key === 'Escape') {
        if (state.editing) cancelEdit();
        else cancelReply();
      } else if (event.key === 'ArrowUp' && !input.value && !state.editing) {
        if (editLastOwn()) event.preventDefault();
      }
    });
    input.addEventListener('paste', (event) => {
      const files = event.clipboardData && event.clipboardData.files;
      if (files && files.length) {
        event.preventDefault();
        addFiles(files);
      }
    });
    $('edit-cancel').addEventListener('click', cancelEdit);
    $('back').addEventListener('click', closeRoom);
    document.addEventListener('keydown', (event) => {
      const overlay = document.querySelector('.lightbox');
      if (event.key === 'Escape' && overlay) overlay.remove();
      else if (event.key === 'Escape') closePicker();
    });
    document.addEventListener('click', (event) => {
      if (state.picker !== null && !event.target.closest('.picker, .react-open')) closePicker();
    });
    $('file-input').addEventListener('change', (event) => {
      addFiles(event.target.files);
      event.target.value = '';
    });
    const room = $('room');
    room.addEventListener('dragover', (event) => event.preventDefault());
    room.addEventListener('drop', (event) => {
      event.preventDefault();
      if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
    });
    $('messages').addEventListener('scroll', () => {
      if ($('messages').scrollTop < 120) loadOlder();
    });
    document.addEventListener('visibilitychange', markRead);
    window.addEventListener('focus', markRead);
    // static/search.js asks for a message: open its room, page back to it.
    window.addEventListener('postbox:show-message', async ({detail}) => {
      await openRoom(detail.room_id);
      const c = state.convos.get(detail.room_id);
      while (c && !c.messages.has(detail.id) && c.hasMore && state.current === detail.room_id) {
        if (c.loadingOlder) { await new Promise((r) => setTimeout(r, 50)); continue; }
        const size = c.messages.size;
        await loadOlder();
        if (c.messages.size === size) break;
      }
      scrollToMessage(detail.id);
    });
  }

  wire();
  if (state.token && state.me) startApp();
  else signOut();
})();
