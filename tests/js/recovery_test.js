#!/usr/bin/env node
// Connection state recovery (PROTOCOL v2) with the official socket.io-client:
// a socket that opts in (`auth: {token, recover: true}`) and loses its
// connection gets, on reconnect, `socket.recovered === true` and every event
// it missed once, in order, with offsets, before `connect` fires; its joined
// rooms come back. An offset the server cannot vouch for gives `recovered ===
// false`, and `sync` fills the gap. A socket that did not opt in sees events
// without an offset argument.
//
// Usage: node recovery_test.js <server url> <scenario>
// Scenarios: basic (drops, two recoveries in a row, a drop before any
// event, rooms restored, bad and too-old offsets, too many missed, a
// revoked token, a plain client), restart (the server is restarted with
// SIGTERM: the script prints "RESTART NOW" and waits for a line on stdin),
// other <second url> (two processes of one service, with Redis), chaos
// [second url] (random drops for CHAOS_SECONDS, default 60, while messages
// flow; with a second url, reconnects to either process while the test
// restarts them).
// The server must run with POSTBOX_RECOVERY_MAX_EVENTS=6.
// Prints PASS and exits 0 on success; prints what went wrong and exits 1.
'use strict';

const { io } = require('socket.io-client');
const { randomUUID } = require('node:crypto');
const readline = require('node:readline');

const BASE = (process.argv[2] || '').replace(/\/$/, '');
const SCENARIO = process.argv[3] || 'basic';
const TIMEOUT_MS = 15000;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function log(...args) {
  console.log('[recovery_test]', ...args);
}

async function api(method, path, { token, body } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const resp = await fetch(BASE + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: resp.status, data: await resp.json().catch(() => null) };
}

async function register(prefix) {
  const username = `${prefix}_${randomUUID().slice(0, 8)}`;
  const { status, data } = await api('POST', '/api/register',
    { body: { username, password: 'correct horse battery' } });
  check(status === 201, `register ${username}: ${status}`);
  return data;
}

// A socket that records, in arrival order, every event the app sees (with
// all its arguments) and every `connect` (with `socket.recovered`).
class Client {
  constructor(name, token, recover) {
    this.name = name;
    this.seen = [];
    this.wake = null;
    const auth = recover ? { token, recover: true } : { token };
    // Reconnection by hand, so that events are sent while it is away.
    this.socket = io(BASE, {
      auth, transports: ['websocket'], reconnection: false,
      autoConnect: false, timeout: TIMEOUT_MS,
    });
    this.socket.onAny((event, ...args) => this.record({ event, args }));
    this.socket.on('connect', () => this.record(
      { event: 'connect', recovered: this.socket.recovered }));
    this.socket.on('disconnect', (reason) => this.record(
      { event: 'disconnect', reason }));
  }

  record(item) {
    this.seen.push(item);
    if (this.wake) this.wake();
  }

  // Waits until `test(this.seen)` is true.
  async until(what, test, ms = TIMEOUT_MS) {
    const deadline = Date.now() + ms;
    while (!test(this.seen)) {
      const left = deadline - Date.now();
      check(left > 0, `${this.name}: ${what} did not happen within ${ms} ms;` +
        ` seen ${JSON.stringify(this.seen.map((s) => s.event))}`);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => { clearTimeout(timer); resolve(); };
      });
    }
  }

  mark() {
    return this.seen.length;
  }

  since(mark) {
    return this.seen.slice(mark);
  }

  // (Re)connects; resolves with `socket.recovered`, rejects on connect_error.
  connect() {
    return new Promise((resolve, reject) => {
      const onConnect = () => { cleanup(); resolve(this.socket.recovered); };
      const onError = (err) => { cleanup(); reject(err); };
      const timer = setTimeout(
        () => onError(new Error(`${this.name}: no connect within ${TIMEOUT_MS} ms`)),
        TIMEOUT_MS);
      const cleanup = () => {
        clearTimeout(timer);
        this.socket.off('connect', onConnect);
        this.socket.off('connect_error', onError);
      };
      this.socket.once('connect', onConnect);
      this.socket.once('connect_error', onError);
      this.socket.connect();
    });
  }

  // The transport dies under the socket (as when a network drops).
  async drop() {
    const mark = this.mark();
    this.socket.io.engine.close();
    await this.until('disconnect', () => this.since(mark).some(
      (s) => s.event === 'disconnect'));
  }

  async ok(event, payload) {
    const ack = await this.socket.timeout(TIMEOUT_MS).emitWithAck(event, payload);
    check(ack && ack.ok === true,
      `${this.name}: ${event} ${JSON.stringify(payload)} -> ${JSON.stringify(ack)}`);
    return ack;
  }
}

let counter = 0;

async function send(sender, roomId, body) {
  const ack = await sender.ok('send_dm',
    { room_id: roomId, body, client_msg_id: `c${++counter}-${randomUUID()}` });
  return ack.message;
}

function bodies(items, event = 'message') {
  return items.filter((s) => s.event === event).map((s) => s.args[0].body);
}

// Checks what a reconnect after `mark` brought: `recovered` as expected and,
// when recovered, exactly `missed` (message bodies, in order, each with a
// string offset) before `connect`.
function checkRecovery(client, mark, recovered, missed) {
  const after = client.since(mark);
  const at = after.findIndex((s) => s.event === 'connect');
  check(at >= 0, `${client.name}: no connect`);
  check(after[at].recovered === recovered,
    `${client.name}: recovered ${after[at].recovered}, expected ${recovered}`);
  if (!recovered) return;
  const before = after.slice(0, at);
  const messages = before.filter((s) => s.event === 'message');
  check(JSON.stringify(bodies(before)) === JSON.stringify(missed),
    `${client.name}: before connect got ${JSON.stringify(bodies(before))},` +
    ` expected ${JSON.stringify(missed)}`);
  for (const m of messages) {
    check(m.args.length === 2 && typeof m.args[1] === 'string',
      `${client.name}: replayed message without an offset: ${JSON.stringify(m.args)}`);
  }
}

async function openDm(a, b) {
  const ack = await a.ok('open_dm', { username: b.username });
  return ack.room.id;
}

async function basic() {
  const [alice, bob, carol, dave] = await Promise.all(
    ['alice', 'bob', 'carol', 'dave'].map(register));
  const A = new Client('alice', alice.token, true);
  const B = new Client('bob', bob.token, false);
  const D = new Client('dave', dave.token, false);
  await B.connect();
  await D.connect();
  check((await A.connect()) !== true, 'a first connection is not recovered');
  check(A.socket._pid, 'the CONNECT reply of an opted-in socket has a pid');
  check(!D.socket._pid, 'a socket that did not opt in gets no pid');
  const room = await openDm(B, { username: alice.user.username });
  const roomD = await openDm(B, { username: dave.user.username });

  // Live events carry an offset for alice, none for dave.
  let mark = A.mark();
  const markD = D.mark();
  await send(B, room, 'm1');
  await send(B, roomD, 'd1');
  await A.until('m1', () => bodies(A.since(mark)).includes('m1'));
  await D.until('d1', () => bodies(D.since(markD)).includes('d1'));
  const m1 = A.since(mark).find((s) => s.event === 'message');
  check(m1.args.length === 2 && typeof m1.args[1] === 'string',
    `alice's message has an offset: ${JSON.stringify(m1.args)}`);
  const d1 = D.since(markD).find((s) => s.event === 'message');
  check(d1.args.length === 1, `dave's message has no offset: ${JSON.stringify(d1.args)}`);
  await A.ok('join_room', { room_id: room });
  log('live events: offsets for the opted-in socket only');

  // A dropped transport; missed events come back before connect.
  await A.drop();
  await send(B, room, 'm2');
  await send(B, room, 'm3');
  mark = A.mark();
  check(await A.connect() === true, 'recovered after a dropped transport');
  checkRecovery(A, mark, true, ['m2', 'm3']);
  // Its joined room is back: bob's typing reaches it.
  mark = A.mark();
  await B.ok('typing', { room_id: room, typing: true });
  await A.until('typing', () => A.since(mark).some((s) => s.event === 'typing'));
  log('dropped transport: recovered, m2 m3 before connect, joined room back');

  // Again, with two edits among the missed events, and a new dm.
  await A.drop();
  const m4 = await send(B, room, 'm4');
  await B.ok('edit_message', { message_id: m4.id, body: 'm4 edited' });
  await B.ok('edit_message', { message_id: m4.id, body: 'm4 edited twice' });
  const E = new Client('eve', (await register('eve')).token, false);
  await E.connect();
  const roomE = await openDm(E, { username: alice.user.username });
  await send(E, roomE, 'e1');
  mark = A.mark();
  check(await A.connect() === true, 'recovered a second time');
  checkRecovery(A, mark, true, ['m4 edited twice', 'e1']);
  let before = A.since(mark);
  before = before.slice(0, before.findIndex((s) => s.event === 'connect'));
  const updated = before.filter((s) => s.event === 'message_updated');
  check(updated.length === 2 && typeof updated[1].args[1] === 'string',
    `both edits are replayed once: ${JSON.stringify(updated)}`);
  const newRoom = before.findIndex((s) => s.event === 'room' && s.args[0].id === roomE);
  const e1 = before.findIndex((s) => s.event === 'message' && s.args[0].body === 'e1');
  check(newRoom >= 0 && newRoom < e1, 'the new dm room comes before its message');
  E.socket.disconnect();
  // A third time: nothing missed (the edits are not replayed again).
  await A.drop();
  mark = A.mark();
  check(await A.connect() === true, 'recovered a third time');
  before = A.since(mark);
  check(before[0].event === 'connect', `nothing replayed: ${JSON.stringify(before)}`);
  // A group she is removed from while away: room_left is replayed (with
  // the departure's seq), once; as with sync, nothing else of that room
  // (she is out of it).
  const group = (await B.ok('create_group',
    { name: 'g', members: [alice.user.username] })).room;
  mark = A.mark();
  await B.ok('rename_group', { room_id: group.id, name: 'g2' });
  await A.until('the rename', () => A.since(mark).some(
    (s) => s.event === 'room' && s.args[0].name === 'g2'));
  await A.drop();
  await send(B, group.id, 'g1');
  const removed = await B.ok('remove_member',
    { room_id: group.id, username: alice.user.username });
  mark = A.mark();
  check(await A.connect() === true, 'recovered with a room_left');
  checkRecovery(A, mark, true, []);
  before = A.since(mark);
  const left = before.filter((s) => s.event === 'room_left');
  check(left.length === 1 && left[0].args[0].room_id === group.id &&
    left[0].args[0].seq === removed.room.last_seq &&
    typeof left[0].args[1] === 'string' &&
    before.indexOf(left[0]) < before.findIndex((s) => s.event === 'connect'),
    `room_left replayed before connect: ${JSON.stringify(before)}`);
  await A.drop();
  mark = A.mark();
  check(await A.connect() === true, 'recovered after the room_left');
  check(A.since(mark)[0].event === 'connect',
    `nothing replayed again: ${JSON.stringify(A.since(mark))}`);
  // Live after recovery: once, after connect.
  mark = A.mark();
  await send(B, room, 'm5');
  await A.until('m5', () => bodies(A.since(mark)).includes('m5'));
  check(JSON.stringify(bodies(A.since(mark))) === '["m5"]', 'm5 once');
  log('second recovery in a row: recovered');

  // A drop before the socket got any event.
  const C = new Client('carol', carol.token, true);
  const roomC = await openDm(B, { username: carol.user.username });
  await C.connect();
  await C.drop();
  await send(B, roomC, 'c1');
  await send(B, roomC, 'c2');
  mark = C.mark();
  check(await C.connect() === true, 'recovered after a drop before any event');
  checkRecovery(C, mark, true, ['c1', 'c2']);
  log('drop before any event: recovered');

  // An offset the server never gave: recovered false, sync fills the gap.
  await C.drop();
  await send(B, roomC, 'c3');
  C.socket._lastOffset = '999999';
  mark = C.mark();
  check(await C.connect() === false, 'an unknown offset is not recovered');
  check(bodies(C.since(mark)).length === 0, 'nothing replayed without recovery');
  let sync = await C.ok('sync', { rooms: { [roomC]: 2 } });
  check(JSON.stringify(sync.events.map((e) => e.message.body)) === '["c3"]',
    `sync fills the gap: ${JSON.stringify(sync.events)}`);
  log('unknown offset: recovered false, sync has c3');

  // More missed than recovery_max_events (6): recovered false.
  await C.drop();
  for (let i = 4; i <= 10; i++) await send(B, roomC, `c${i}`);
  mark = C.mark();
  check(await C.connect() === false, 'too many missed events are not recovered');
  sync = await C.ok('sync', { rooms: { [roomC]: 3 } });
  check(sync.events.length === 7, 'sync has the seven');
  log('too many missed: recovered false');

  // An offset older than the sends kept (6): recovered false.
  mark = C.mark();
  for (let i = 11; i <= 18; i++) await send(B, roomC, `c${i}`);
  await C.until('c18', () => bodies(C.since(mark)).includes('c18'));
  await C.drop();
  C.socket._lastOffset = '1';
  mark = C.mark();
  check(await C.connect() === false, 'a too old offset is not recovered');
  log('too old offset: recovered false');

  // The token is checked again: revoked, the recovery is refused.
  await A.drop();
  const out = await api('POST', '/api/logout',
    { token: alice.token, body: { all: true } });
  check(out.status === 200, `logout everywhere: ${out.status}`);
  let refused = null;
  try {
    await A.connect();
  } catch (err) {
    refused = err;
  }
  check(refused && refused.message === 'unauthorized',
    `a revoked token is refused on recovery: ${refused && refused.message}`);
  log('revoked token: refused');

  for (const c of [A, B, C, D]) c.socket.disconnect();
}

async function restart() {
  const [alice, bob] = await Promise.all(['alice', 'bob'].map(register));
  const A = new Client('alice', alice.token, true);
  const B = new Client('bob', bob.token, false);
  await B.connect();
  await A.connect();
  const room = await openDm(B, { username: alice.user.username });
  let mark = A.mark();
  await send(B, room, 'r1');
  await A.until('r1', () => bodies(A.since(mark)).includes('r1'));
  await A.ok('join_room', { room_id: room });
  mark = A.mark();
  console.log('RESTART NOW');
  const lines = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => lines.once('line', resolve));
  lines.close();
  await A.until('disconnect', () => A.since(mark).some(
    (s) => s.event === 'disconnect'));
  await B.connect();
  await send(B, room, 'r2');
  await send(B, room, 'r3');
  mark = A.mark();
  check(await A.connect() === true, 'recovered across a SIGTERM restart');
  checkRecovery(A, mark, true, ['r2', 'r3']);
  mark = A.mark();
  await B.ok('typing', { room_id: room, typing: true });
  await A.until('typing', () => A.since(mark).some((s) => s.event === 'typing'));
  // And once more on the restarted server.
  await A.drop();
  await send(B, room, 'r4');
  mark = A.mark();
  check(await A.connect() === true, 'recovered again after the restart');
  checkRecovery(A, mark, true, ['r4']);
  log('restart: recovered twice');
  A.socket.disconnect();
  B.socket.disconnect();
}

// Two processes of one service (Redis): a socket of the first recovers on
// the second, and back on the first.
async function other() {
  const OTHER = (process.argv[4] || '').replace(/\/$/, '');
  const [alice, bob] = await Promise.all(['alice', 'bob'].map(register));
  const A = new Client('alice', alice.token, true);
  const B = new Client('bob', bob.token, false);
  await B.connect();
  await A.connect();
  const room = await openDm(B, { username: alice.user.username });
  let mark = A.mark();
  await send(B, room, 'p1');
  await A.until('p1', () => bodies(A.since(mark)).includes('p1'));
  await A.ok('join_room', { room_id: room });
  await A.drop();
  await send(B, room, 'p2');
  await send(B, room, 'p3');
  A.socket.io.uri = OTHER;
  mark = A.mark();
  check(await A.connect() === true, 'recovered on the other process');
  checkRecovery(A, mark, true, ['p2', 'p3']);
  mark = A.mark();
  await B.ok('typing', { room_id: room, typing: true });
  await A.until('typing', () => A.since(mark).some((s) => s.event === 'typing'));
  await A.drop();
  await send(B, room, 'p4');
  A.socket.io.uri = BASE;
  mark = A.mark();
  check(await A.connect() === true, 'recovered back on the first process');
  checkRecovery(A, mark, true, ['p4']);
  log('other process: recovered there and back');
  A.socket.disconnect();
  B.socket.disconnect();
}

// Chaos: a sender sends (and now and then edits) without pause while the
// receiver's transport is dropped at random moments and it reconnects at
// random moments. A recovered reconnect must bring exactly what was missed
// (an event twice is a failure); a refused one is caught up with sync. In
// the end the receiver has every seq of the room, each once. With a second
// url (two processes of one service, with Redis, which the test restarts
// with SIGTERM at random meanwhile) each reconnect goes to either process,
// and both clients ride out their server's restarts.
async function chaos() {
  const SECONDS = Number(process.env.CHAOS_SECONDS || 60);
  const URLS = [BASE, (process.argv[4] || '').replace(/\/$/, '')].filter(Boolean);
  const [alice, bob] = await Promise.all(['alice', 'bob'].map(register));
  const A = new Client('alice', alice.token, true);
  const B = new Client('bob', bob.token, false);
  const rand = (lo, hi) => lo + Math.random() * (hi - lo);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  // Connects to a random process, trying until one answers (the other may
  // be restarting); resolves with `socket.recovered`.
  const reconnect = async (client) => {
    const deadline = Date.now() + 60000;
    for (;;) {
      client.socket.io.uri = URLS[Math.floor(Math.random() * URLS.length)];
      try {
        return await client.connect();
      } catch (err) {
        check(Date.now() < deadline, `${client.name}: no process answers: ${err}`);
        await sleep(200);
      }
    }
  };
  // An ack, resent (same payload, so the same client_msg_id) across its
  // server's restarts until one comes.
  const reliably = async (client, event, payload) => {
    for (;;) {
      if (!client.socket.connected) await reconnect(client);
      try {
        const ack = await client.socket.timeout(5000).emitWithAck(event, payload);
        check(ack && ack.ok === true,
          `${client.name}: ${event} ${JSON.stringify(payload)} -> ${JSON.stringify(ack)}`);
        return ack;
      } catch (err) {
        if (!(err instanceof Error) || err.message.startsWith(client.name)) throw err;
      }
    }
  };
  await reconnect(B);
  await reconnect(A);
  const room = (await reliably(B, 'open_dm', { username: alice.user.username })).room.id;
  const live = new Set();  // seqs delivered live or replayed
  const have = new Set();  // seqs from any source
  let dupes = [];
  const seen = (seq, fromSync) => {
    if (!fromSync) {
      if (live.has(seq)) dupes.push(seq);
      live.add(seq);
    }
    have.add(seq);
  };
  A.socket.on('message', (m) => { if (m.room_id === room) seen(m.seq, false); });
  A.socket.on('message_updated', (m) => {
    if (m.room_id === room) seen(m.update_seq, false);
  });
  const mark = () => { let n = 0; while (have.has(n + 1)) n++; return n; };
  const stats = { recovered: 0, fellBack: 0 };
  // Reconnects alice; after a refused recovery, sync fills the gap.
  const rejoin = async () => {
    if (await reconnect(A)) {
      stats.recovered++;
      return;
    }
    stats.fellBack++;
    for (;;) {
      const ack = await reliably(A, 'sync', { rooms: { [room]: mark() } });
      for (const e of ack.events) if (e.room_id === room) seen(e.seq, true);
      if (!ack.has_more) break;
    }
  };
  let stop = false;
  let last = 0;  // the room's last seq the sender knows of
  const sender = (async () => {
    let i = 0;
    let previous = null;
    while (!stop) {
      const ack = await reliably(B, 'send_dm', {
        room_id: room, body: `x${++i}`, client_msg_id: `chaos-${i}-${randomUUID()}`,
      });
      last = Math.max(last, ack.message.seq);
      if (previous && i % 7 === 0) {
        const edit = await reliably(B, 'edit_message',
          { message_id: previous.id, body: `x${i - 1} edited` });
        last = Math.max(last, edit.message.update_seq);
      }
      previous = ack.message;
      await sleep(rand(0, 15));
    }
  })();
  const end = Date.now() + SECONDS * 1000;
  while (Date.now() < end) {
    await sleep(rand(100, 1200));
    if (A.socket.connected) await A.drop();
    await sleep(rand(0, 600));
    await rejoin();
  }
  stop = true;
  await sender;
  const deadline = Date.now() + 30000;
  while (!(have.has(last) && mark() >= last)) {
    check(Date.now() < deadline, `missing seqs: up to ${mark()} of ${last}`);
    if (!A.socket.connected) await rejoin();
    await sleep(100);
  }
  check(dupes.length === 0, `events delivered twice: ${dupes.slice(0, 20)}`);
  check(stats.recovered > 0, 'no reconnect recovered');
  log(`chaos: ${last} events, ${stats.recovered} recovered, ` +
    `${stats.fellBack} fell back, none missed or twice`);
  A.socket.disconnect();
  B.socket.disconnect();
}

const SCENARIOS = { basic, restart, other, chaos };

SCENARIOS[SCENARIO]().then(() => {
  console.log('PASS');
  process.exit(0);
}, (err) => {
  console.log('FAIL', err && err.stack || err);
  process.exit(1);
});
