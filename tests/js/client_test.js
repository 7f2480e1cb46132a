#!/usr/bin/env node
// Postbox against the official socket.io-client 4.x: register over HTTP,
// connect with a token (and fail with a bad one), open a dm, send with acks,
// receive `message`, drop the receiver, send while it is away, reconnect and
// catch up with `sync` (paging while has_more), and talk over long-polling.
//
// Usage: node client_test.js <server url>   (or POSTBOX_URL)
// MISSED (default 12) sets how many messages are sent while the receiver is
// away; MIN_SYNC_PAGES asks the test to check that catching up took at least
// that many `sync` pages (for a server started with a small page size).
// Exits 0 on success; prints what went wrong and exits 1 otherwise.
'use strict';

const { io } = require('socket.io-client');
const { randomUUID } = require('node:crypto');

const BASE = (process.argv[2] || process.env.POSTBOX_URL || '').replace(/\/$/, '');
const MISSED = Number(process.env.MISSED || 12);
const MIN_SYNC_PAGES = Number(process.env.MIN_SYNC_PAGES || 1);
const TIMEOUT_MS = 10000;

function fail(message) {
  throw new Error(message);
}

function check(condition, message) {
  if (!condition) fail(message);
}

function log(...args) {
  console.log('[client_test]', ...args);
}

async function api(method, path, { token, body } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const resp = await fetch(BASE + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  return { status: resp.status, data };
}

async function register(prefix) {
  const username = `${prefix}${process.pid % 1000}_${randomUUID().slice(0, 8)}`;
  const { status, data } = await api('POST', '/api/register',
    { body: { username, password: 'correct horse battery' } });
  check(status === 201, `register ${username}: ${status} ${JSON.stringify(data)}`);
  return data;
}

// A socket that records every server event in arrival order, so the test can
// wait for "the next `message` matching X" with a timeout instead of sleeping.
class Recorder {
  constructor(name, token, transports) {
    this.name = name;
    this.queues = new Map();
    this.waiters = new Map();
    this.socket = io(BASE, {
      auth: { token }, transports, reconnection: false, autoConnect: false,
      timeout: TIMEOUT_MS,
    });
    this.socket.onAny((event, payload) => this.push(event, payload));
  }

  push(event, payload) {
    const waiters = this.waiters.get(event) || [];
    const waiter = waiters.shift();
    if (waiter) waiter(payload);
    else this.queue(event).push(payload);
  }

  queue(event) {
    if (!this.queues.has(event)) this.queues.set(event, []);
    return this.queues.get(event);
  }

  // The next `event` matching `where`; events that do not match are dropped.
  async next(event, where = () => true, ms = TIMEOUT_MS) {
    const deadline = Date.now() + ms;
    for (;;) {
      const queued = this.queue(event);
      while (queued.length) {
        const item = queued.shift();
        if (where(item)) return item;
      }
      const remaining = deadline - Date.now();
      if (remaining <= 0) fail(`${this.name}: no ${event} within ${ms} ms`);
      const item = await new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          const list = this.waiters.get(event) || [];
          const at = list.indexOf(done);
          if (at >= 0) list.splice(at, 1);
          reject(new Error(`${this.name}: no ${event} within ${ms} ms`));
        }, remaining);
        const done = (payload) => { clearTimeout(timer); resolve(payload); };
        if (!this.waiters.has(event)) this.waiters.set(event, []);
        this.waiters.get(event).push(done);
      });
      if (where(item)) return item;
    }
  }

  drain(event) {
    return this.queue(event).splice(0);
  }

  connect() {
    return new Promise((resolve, reject) => {
      const onConnect = () => { cleanup(); resolve(this); };
      const onError = (err) => { cleanup(); reject(err); };
      const cleanup = () => {
        this.socket.off('connect', onConnect);
        this.socket.off('connect_error', onError);
      };
      this.socket.once('connect', onConnect);
      this.socket.once('connect_error', onError);
      this.socket.connect();
    });
  }

  async call(event, payload) {
    return this.socket.timeout(TIMEOUT_MS).emitWithAck(event, payload);
  }

  async ok(event, payload) {
    const ack = await this.call(event, payload);
    check(ack && ack.ok === true,
      `${this.name}: ${event} ${JSON.stringify(payload)} -> ${JSON.stringify(ack)}`);
    return ack;
  }

  close() {
    this.socket.disconnect();
  }
}

async function send(sender, target, body) {
  const clientMsgId = randomUUID();
  const ack = await sender.ok('send_dm', { ...target, body, client_msg_id: clientMsgId });
  check(ack.message.body === body && ack.message.client_msg_id === clientMsgId,
    `send_dm ack carries the message: ${JSON.stringify(ack)}`);
  return ack.message;
}

async function badTokenIsRefused(token, label) {
  const socket = io(BASE, {
    auth: token === undefined ? {} : { token }, transports: ['websocket'],
    reconnection: false, timeout: TIMEOUT_MS,
  });
  try {
    const err = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${label}: no connect_error`)), TIMEOUT_MS);
      socket.once('connect', () => { clearTimeout(timer); reject(new Error(`${label}: connected`)); });
      socket.once('connect_error', (e) => { clearTimeout(timer); resolve(e); });
    });
    check(err.message === 'unauthorized', `${label}: err.message is ${JSON.stringify(err.message)}`);
    check(err.data && err.data.code === 'unauthorized',
      `${label}: err.data is ${JSON.stringify(err.data)}`);
  } finally {
    socket.disconnect();
  }
}

// Catch up with `sync` from `known` ({room_id: last_seq}), paging while
// has_more; returns every event and the number of pages it took.
async function catchUp(client, known) {
  const events = [];
  let pages = 0;
  for (;;) {
    const ack = await client.ok('sync', { rooms: known });
    pages += 1;
    for (const event of ack.events) {
      events.push(event);
      known[event.room_id] = Math.max(known[event.room_id] || 0, event.seq);
    }
    if (!ack.has_more) return { events, pages };
    check(ack.events.length > 0, 'sync said has_more with no events');
  }
}

async function main() {
  check(BASE, 'usage: node client_test.js <server url> (or POSTBOX_URL)');
  log('server', BASE);

  // Accounts over HTTP.
  const alice = await register('ja');
  const bob = await register('jb');
  const carol = await register('jc');
  const me = await api('GET', '/api/me', { token: alice.token });
  check(me.status === 200 && me.data.user.id === alice.user.id, `GET /api/me: ${JSON.stringify(me)}`);

  // A bad, a missing and a forged token are refused the way the contract says.
  await badTokenIsRefused('not-a-token', 'garbage token');
  await badTokenIsRefused(undefined, 'missing token');
  await badTokenIsRefused(alice.token.slice(0, -4) + 'AAAA', 'tampered token');
  log('bad tokens refused with connect_error unauthorized');

  const a = await new Recorder('alice', alice.token, ['websocket']).connect();
  const b = await new Recorder('bob', bob.token, ['websocket']).connect();
  check(a.socket.io.engine.transport.name === 'websocket', 'alice is on websocket');

  // Open the dm: both get the room, opening it from the other side gives the same one.
  const opened = await a.ok('open_dm', { username: bob.user.username });
  const room = opened.room;
  check(room.kind === 'dm' && room.members.length === 2, `dm room: ${JSON.stringify(room)}`);
  const roomEvent = await b.next('room', (r) => r.id === room.id);
  check(roomEvent.kind === 'dm', 'bob got the room event');
  const fromBob = await b.ok('open_dm', { username: alice.user.username });
  check(fromBob.room.id === room.id, 'the dm is unique per pair');

  // Send with acks; the receiver and the sender's socket both get `message`.
  const known = {}; // bob's last seq per room
  const hello = await send(a, { room_id: room.id }, 'hello bob');
  const got = await b.next('message', (m) => m.id === hello.id);
  check(got.body === 'hello bob' && got.sender.id === alice.user.id && got.room_id === room.id,
    `bob got the message: ${JSON.stringify(got)}`);
  known[room.id] = got.seq;
  const echo = await a.next('message', (m) => m.id === hello.id);
  check(echo.client_msg_id === hello.client_msg_id, 'the sender socket gets its message too');

  const reply = await send(b, { to: alice.user.username }, 'hi alice');
  check(reply.room_id === room.id && reply.seq === hello.seq + 1, `reply takes the next seq: ${JSON.stringify(reply)}`);
  const gotReply = await a.next('message', (m) => m.id === reply.id);
  check(gotReply.body === 'hi alice', 'alice got the reply');
  known[room.id] = (await b.next('message', (m) => m.id === reply.id)).seq;

  // A retry with the same client_msg_id gives the first message, delivered once.
  const retryAck = await a.ok('send_dm', { room_id: room.id, body: 'hello bob', client_msg_id: hello.client_msg_id });
  check(retryAck.message.id === hello.id, 'idempotent retry returns the first message');
  const after = await send(a, { room_id: room.id }, 'after the retry');
  const nextForBob = await b.next('message');
  check(nextForBob.id === after.id, `bob's next message is the new one, not a duplicate: ${JSON.stringify(nextForBob)}`);
  known[room.id] = nextForBob.seq;

  // A bad payload gets an error ack, and the connection stays up.
  const bad = await a.call('send_dm', { room_id: room.id, client_msg_id: randomUUID() });
  check(bad.ok === false && bad.error.code === 'invalid', `missing body -> invalid: ${JSON.stringify(bad)}`);
  check(a.socket.connected, 'alice is still connected after a bad payload');
  log('dm, acks, message events and idempotent retry ok');

  // Drop bob, send while he is away (and edit one), reconnect, catch up.
  b.close();
  const missed = [];
  for (let i = 0; i < MISSED; i += 1) missed.push(await send(a, { room_id: room.id }, `missed ${i}`));
  const edited = await a.ok('edit_message', { message_id: missed[0].id, body: 'missed 0 (edited)' });
  check(edited.message.body === 'missed 0 (edited)', 'edit ok');
  const lastSeq = edited.message.update_seq || missed[missed.length - 1].seq + 1;

  b.drain('message');
  b.drain('message_updated');
  await b.connect();
  const before = known[room.id];
  const { events, pages } = await catchUp(b, known);
  const inRoom = events.filter((e) => e.room_id === room.id);
  const seqs = inRoom.map((e) => e.seq);
  const expected = [];
  for (let s = before + 1; s <= lastSeq; s += 1) expected.push(s);
  check(JSON.stringify(seqs) === JSON.stringify(expected),
    `sync gives every missed seq once, in order: got ${JSON.stringify(seqs)}, want ${JSON.stringify(expected)}`);
  const syncedIds = inRoom.filter((e) => e.type === 'message').map((e) => e.message.id);
  check(JSON.stringify(syncedIds) === JSON.stringify(missed.map((m) => m.id)),
    'every missed message arrives exactly once, in order');
  const update = inRoom[inRoom.length - 1];
  check(update.type === 'message_updated' && update.message.id === missed[0].id
    && update.message.body === 'missed 0 (edited)', `the edit is replayed: ${JSON.stringify(update)}`);
  check(pages >= MIN_SYNC_PAGES, `catching up took ${pages} sync pages, expected at least ${MIN_SYNC_PAGES}`);
  const again = await b.ok('sync', { rooms: known });
  check(again.events.length === 0 && again.has_more === false, 'a second sync has nothing new');
  log(`caught up ${inRoom.length} events in ${pages} sync page(s)`);

  // Live again after the catch-up: the next message is the next seq.
  const live = await send(a, { room_id: room.id }, 'welcome back');
  const gotLive = await b.next('message', (m) => m.id === live.id);
  check(gotLive.seq === lastSeq + 1, `live message after catch-up has seq ${gotLive.seq}`);

  // A long-polling-only client sends and receives.
  const c = await new Recorder('carol', carol.token, ['polling']).connect();
  check(c.socket.io.engine.transport.name === 'polling', 'carol is on polling');
  const toCarol = await send(a, { to: carol.user.username }, 'hello over polling');
  const carolGot = await c.next('message', (m) => m.id === toCarol.id);
  check(carolGot.body === 'hello over polling', 'carol received over polling');
  const fromCarol = await send(c, { room_id: toCarol.room_id }, 'polling reply');
  const aliceGot = await a.next('message', (m) => m.id === fromCarol.id);
  check(aliceGot.body === 'polling reply' && aliceGot.sender.id === carol.user.id, 'alice got carol\'s reply');
  check(c.socket.io.engine.transport.name === 'polling', 'carol stayed on polling');
  log('long-polling client sends and receives');

  a.close();
  b.close();
  c.close();
}

const guard = setTimeout(() => {
  console.error('[client_test] FAILED: the whole test took longer than 90 s');
  process.exit(1);
}, 90000);

main().then(() => {
  clearTimeout(guard);
  log('PASS');
  process.exit(0);
}, (err) => {
  console.error('[client_test] FAILED:', err && err.stack ? err.stack : err);
  process.exit(1);
});
