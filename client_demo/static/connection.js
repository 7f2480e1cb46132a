// The connection to Postbox, DOM-free (the page and Node tests share it):
// connect with a token, the seq kept per room, catching up with `sync`
// after every (re)connect that did not recover, sends that survive drops
// (resent with the same client_msg_id, which the server stores once), and
// reconnecting when the server closed us. PROTOCOL.md "Catching up",
// docs/protocol.md "Connection state recovery".
//
// What the connection learns goes to `handlers` (all optional):
//   message(m, {isNew})        a message (live, recovered or from sync);
//                              isNew: its seq is past what the room had
//   message_updated(m)         an edit, delete or reaction
//   room(room) / room_left(ev) a room appeared or changed / I am out of it
//   typing(ev) / read(ev) / presence(ev) / muted(ev)   never stored, never
//                              replayed
//   connecting({first, recovered})  awaited before catching up: the place
//                              to load the inbox (and seed() its seqs)
//   connected({first, recovered, synced})  caught up, queued sends resent
//   disconnected(reason) / unauthorized()  the token is no longer valid

// How long an ack may take before the call counts as lost.
export const ACK_TIMEOUT_MS = 15000;

export class OfflineError extends Error {
  constructor(message) {
    super(message);
    this.code = 'offline';
  }
}

export class ServerError extends Error {
  constructor(error) {
    super((error && error.message) || 'Something went wrong.');
    this.code = error && error.code;
  }
}

export function newClientMsgId() {
  if (globalThis.crypto && globalThis.crypto.randomUUID) return globalThis.crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
}

export class Connection {
  // io: socket.io-client's `io` (the page's global, or the npm package's).
  // url: the server ('' or undefined for this page's origin).
  // recover: opt in to connection state recovery (socket.recovered).
  constructor({io, url, token, handlers = {}, recover = true,
    ackTimeoutMs = ACK_TIMEOUT_MS, retryDelayMs = () => 1000 + Math.random() * 2000}) {
    this.io = io;
    this.url = url;
    this.token = token;
    this.handlers = handlers;
    this.recover = recover;
    this.ackTimeoutMs = ackTimeoutMs;
    this.retryDelayMs = retryDelayMs;
    this.socket = null;
    this.lastSeq = new Map();  // room id -> highest seq applied
    this.outbox = new Map();   // client_msg_id -> {payload, resolve, reject}
    this.connects = 0;
    this.behind = false;       // a gap was seen offline: sync on connect
    this.syncing = null;       // the running resync()
    this.again = false;
    this.syncPages = 0;        // sync calls made (for tests and metrics)
  }

  get connected() {
    return !!(this.socket && this.socket.connected);
  }

  connect() {
    // Polling first, then the upgrade to WebSocket (the client's default):
    // works behind proxies that do not pass WebSockets. forceNew: a
    // sign-out and sign-in must not reuse the old Manager.
    const options = {auth: {token: this.token, recover: this.recover}, forceNew: true};
    const socket = this.url ? this.io(this.url, options) : this.io(options);
    this.socket = socket;
    socket.on('connect', () => {
      this.onConnect(socket).catch((err) => this.emit('error', err));
    });
    socket.on('disconnect', (reason) => {
      this.emit('disconnected', reason);
      // The server closed us (restart, shutdown): socket.io-client does
      // not come back by itself in that case.
      if (reason === 'io server disconnect') this.retry(socket);
    });
    socket.on('connect_error', (err) => {
      if (err && err.message === 'unauthorized') {
        this.close();
        this.emit('unauthorized');
        return;
      }
      this.emit('disconnected', 'connect_error');
      // A refusal by the server stops the built-in reconnection.
      if (!socket.active) this.retry(socket);
    });
    socket.on('message', (m) => this.applyMessage(m));
    socket.on('message_updated', (m) => this.applyUpdate(m));
    socket.on('room', (room) => this.applyRoom(room));
    socket.on('room_left', (ev) => this.applyRoomLeft(ev));
    for (const name of ['typing', 'read', 'presence', 'muted']) {
      socket.on(name, (ev) => this.emit(name, ev));
    }
    return this;
  }

  close() {
    if (!this.socket) return;
    this.socket.removeAllListeners();
    this.socket.disconnect();
    this.socket = null;
  }

  // Closes the socket without forgetting anything, as a network drop does
  // (tests; a page could use it for "go offline").
  drop() {
    if (this.socket) this.socket.io.engine.close();
  }

  retry(socket) {
    setTimeout(() => {
      if (this.socket === socket && !socket.connected) socket.connect();
    }, this.retryDelayMs());
  }

  emit(name, ...args) {
    const handler = this.handlers[name];
    return handler ? handler(...args) : undefined;
  }

  // After every (re)connect: let the app load what it shows first, catch up
  // with `sync` unless the server recovered the session (the missed events
  // then came before `connect`), then resend the queued sends. The first
  // connect has nothing to catch up: what the app loads in `connecting` is
  // current, and later events come live (a `sync` then would replay every
  // room the app did not seed from its first message).
  async onConnect(socket) {
    const first = this.connects === 0;
    this.connects += 1;
    const recovered = !first && !!socket.recovered;
    await this.emit('connecting', {first, recovered});
    const behind = this.behind;
    this.behind = false;
    const synced = (first || recovered) && !behind ? 0 : await this.catchUp();
    if (this.socket !== socket) return;
    this.resend();
    await this.emit('connected', {first, recovered, synced});
  }

  // An ack'ed call: resolves to the ack, rejects with OfflineError (not
  // connected, or no answer in time) or ServerError (the ack's error).
  call(event, data) {
    return new Promise((resolve, reject) => {
      const socket = this.socket;
      if (!socket || !socket.connected) {
        reject(new OfflineError('You are offline.'));
        return;
      }
      socket.timeout(this.ackTimeoutMs).emit(event, data, (timeout, ack) => {
        if (timeout) reject(new OfflineError('No answer from the server.'));
        else if (!ack || !ack.ok) reject(new ServerError(ack && ack.error));
        else resolve(ack);
      });
    });
  }

  // ---------- seq tracking ----------

  // A room's seq as the inbox showed it; kept if the room is already known.
  seed(roomId, seq) {
    if (!this.lastSeq.has(roomId)) this.lastSeq.set(roomId, seq || 0);
  }

  forget(roomId) {
    this.lastSeq.delete(roomId);
  }

  // Whether to apply an event with this seq, recording it. Not when it
  // was applied already (the same event live and from sync, or replayed
  // twice), nor when a live event jumps past the room's next seq: events
  // were missed, and the `sync` that fetches them brings this one too.
  bump(roomId, seq, live) {
    if (typeof seq !== 'number') return true;
    const last = this.lastSeq.get(roomId);
    if (last !== undefined && seq <= last) return false;
    if (live && last !== undefined && seq > last + 1) {
      this.resync();
      return false;
    }
    this.lastSeq.set(roomId, seq);
    return true;
  }

  // `live`: from the socket (false: from a sync answer).
  applyMessage(m, live = true) {
    if (!this.bump(m.room_id, m.seq, live)) return;
    this.emit('message', m, {isNew: true});
  }

  applyUpdate(m, live = true) {
    if (!this.bump(m.room_id, m.update_seq, live)) return;
    this.emit('message_updated', m);
  }

  applyRoom(room, live = true) {
    // A room seen for the first time comes with its history from seq 1 in
    // a later sync, so its seq starts at what the room says now.
    if (this.bump(room.id, room.last_seq, live) || !this.lastSeq.has(room.id)) {
      this.emit('room', room);
    }
  }

  applyRoomLeft(ev) {
    this.forget(ev.room_id);
    this.emit('room_left', ev);
  }

  // Calls `sync` with the seqs seen until nothing more is missing; every
  // event goes through the same path as a live one. Returns how many
  // events were applied.
  async catchUp() {
    let count = 0;
    for (;;) {
      const ack = await this.call('sync', {rooms: Object.fromEntries(this.lastSeq)});
      this.syncPages += 1;
      for (const ev of ack.events) {
        count += 1;
        if (ev.type === 'room_left') this.applyRoomLeft(ev);
        else if (ev.type === 'message') this.applyMessage(ev.message, false);
        else if (ev.type === 'message_updated') this.applyUpdate(ev.message, false);
        else if (ev.type === 'room') this.applyRoom(ev.room, false);
      }
      if (!ack.has_more || !ack.events.length) return count;
    }
  }

  // A `sync` now, for a gap in the live events; one at a time (a gap seen
  // meanwhile runs it again). Offline, the next connect syncs instead.
  resync() {
    if (!this.connected) {
      this.behind = true;
      return;
    }
    if (this.syncing) {
      this.again = true;
      return;
    }
    this.syncing = (async () => {
      try {
        do {
          this.again = false;
          await this.catchUp();
        } while (this.again);
      } catch (err) {
        this.behind = true;
      } finally {
        this.syncing = null;
      }
    })();
  }

  // ---------- sends ----------

  // Sends a message (`send_dm` payload; a client_msg_id is added when
  // missing). Resolves to the stored message once acked, even if that takes
  // reconnects; rejects with ServerError when the server refuses it.
  send(payload) {
    const body = {...payload};
    if (!body.client_msg_id) body.client_msg_id = newClientMsgId();
    return new Promise((resolve, reject) => {
      this.outbox.set(body.client_msg_id, {payload: body, resolve, reject});
      this.trySend(body.client_msg_id);
    });
  }

  // Whether a send is still waiting for its ack.
  sending(clientMsgId) {
    return this.outbox.has(clientMsgId);
  }

  async trySend(clientMsgId) {
    const item = this.outbox.get(clientMsgId);
    if (!item || item.inFlight) return;
    item.inFlight = true;
    try {
      const ack = await this.call('send_dm', item.payload);
      this.outbox.delete(clientMsgId);
      item.resolve(ack.message);
    } catch (err) {
      item.inFlight = false;
      if (err instanceof OfflineError) return;  // resent after the reconnect
      this.outbox.delete(clientMsgId);
      item.reject(err);
    }
  }

  resend() {
    for (const id of this.outbox.keys()) this.trySend(id);
  }
}
