#!/usr/bin/env node
// The demo page's own connection.js and store.js (the code a JS app would
// copy) under Node with the npm socket.io-client against a real server:
// Bob's page state receives live messages, drops, misses messages, an edit
// and a send of his own made while offline, comes back, and ends with
// exactly the server's messages, each once. Twice: without recovery (the
// catch-up is `sync`, paged) and with recovery opted in (socket.recovered).
// Then a live event that jumps past the next seq makes the client sync.
//
// Usage: node connection_test.mjs <server url>. MISSED (default 12) sets how
// many messages are sent while Bob is away. Exits 0 and prints PASS.
import {io} from 'socket.io-client';
import {randomUUID} from 'node:crypto';

import {createApi} from '../../client_demo/static/api.js';
import {Connection} from '../../client_demo/static/connection.js';
import * as store from '../../client_demo/static/store.js';

const BASE = (process.argv[2] || process.env.POSTBOX_URL || '').replace(/\/$/, '');
const MISSED = Number(process.env.MISSED || 12);
const TIMEOUT_MS = 15000;

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function log(...args) {
  console.log('[connection_test]', ...args);
}

async function register(prefix) {
  const api = createApi(() => null, BASE);
  return api('POST', '/api/register', {
    username: `${prefix}${process.pid % 1000}_${randomUUID().slice(0, 8)}`,
    password: 'correct horse battery'});
}

// A person as the page holds them: a store fed by a Connection. `until`
// waits for a condition on the state, checked again after every event.
class Person {
  constructor(account, recover) {
    this.user = account.user;
    this.api = createApi(() => account.token, BASE);
    this.state = store.createState(account.user);
    this.waiters = [];
    this.log = [];
    const changed = () => this.recheck();
    const state = this.state;
    this.conn = new Connection({
      io, url: BASE, token: account.token, recover, retryDelayMs: () => 200,
      handlers: {
        message: (m, {isNew}) => {
          const {known} = store.applyMessage(state, m, isNew);
          if (!known) this.log.push(`unknown room ${m.room_id}`);
          changed();
        },
        message_updated: (m) => { store.applyMessageUpdated(state, m); changed(); },
        room: (room) => { store.applyRoom(state, room); changed(); },
        room_left: (ev) => { store.applyRoomLeft(state, ev.room_id); changed(); },
        connecting: async ({first}) => {
          if (!first) return;
          const ack = await this.conn.call('rooms', {limit: 20});
          store.applyInboxPage(state, ack, true);
          for (const entry of ack.rooms) this.conn.seed(entry.room.id, entry.room.last_seq);
        },
        connected: (info) => { this.log.push(info); changed(); },
        disconnected: () => changed(),
        error: (err) => { this.log.push(`error ${err}`); changed(); },
      },
    });
  }

  recheck() {
    this.waiters = this.waiters.filter((w) => !w.test());
  }

  until(predicate, what) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(
        `${this.user.username}: ${what} not within ${TIMEOUT_MS} ms; log ${JSON.stringify(this.log)}`)),
      TIMEOUT_MS);
      const test = () => {
        if (!predicate()) return false;
        clearTimeout(timer);
        resolve();
        return true;
      };
      if (!test()) this.waiters.push({test});
    });
  }

  connected(count) {
    return this.until(() => this.log.filter((x) => x && x.first !== undefined).length >= count,
      `connect #${count}`);
  }

  bodies(roomId) {
    const c = this.state.convos.get(roomId);
    return c ? store.timeline(c).map((m) => `${m.seq}:${m.body}`) : [];
  }
}

async function serverMessages(person, roomId) {
  const data = await person.api('GET', `/api/rooms/${roomId}/messages?limit=100`);
  return data.messages.map((m) => `${m.seq}:${m.body}`);
}

// Recovery replays at most a sync page of missed events (the test server's
// page is 5): with recovery Bob misses 3 messages and an edit.
async function scenario(recover) {
  const missed = recover ? 3 : MISSED;
  const [a, b] = [await register('alice'), await register('bob')];
  const alice = new Person(a, false);
  const bob = new Person(b, recover);
  alice.conn.connect();
  bob.conn.connect();
  await Promise.all([alice.connected(1), bob.connected(1)]);

  const {room} = await alice.conn.call('open_dm', {username: bob.user.username});
  await bob.until(() => bob.state.rooms.has(room.id), 'the room event');
  store.applyJoin(bob.state, room.id, await bob.conn.call('join_room', {room_id: room.id}));

  const first = await alice.conn.send({room_id: room.id, body: 'hello 1'});
  check(first.seq === 1, `first seq ${first.seq}`);
  await alice.conn.send({room_id: room.id, body: 'hello 2'});
  await bob.until(() => bob.bodies(room.id).length === 2, 'two live messages');
  check(bob.state.rooms.get(room.id).unread === 2, 'two unread');

  // Bob drops; meanwhile Alice writes, edits, and Bob queues a send.
  if (recover) bob.conn.drop();
  else bob.conn.socket.disconnect();
  await bob.until(() => !bob.conn.connected, 'the drop');
  const pagesBefore = bob.conn.syncPages;
  for (let i = 0; i < missed; i++) {
    await alice.conn.send({room_id: room.id, body: `missed ${i + 1}`});
  }
  await alice.conn.call('edit_message', {message_id: first.id, body: 'hello 1 (edited)'});
  const queued = bob.conn.send({room_id: room.id, body: 'sent while offline'});
  if (!recover) bob.conn.socket.connect();
  const mine = await queued;
  await bob.connected(2);

  const expected = await serverMessages(alice, room.id);
  check(expected.length === missed + 3, `server has ${expected.length}`);
  await bob.until(() => bob.bodies(room.id).join('|') === expected.join('|'),
    `the server's messages (${expected.join('|')}, has ${bob.bodies(room.id).join('|')})`);
  const again = await bob.conn.send({room_id: room.id, body: 'sent while offline',
    client_msg_id: mine.client_msg_id});
  check(again.id === mine.id, 'a resend with the same client_msg_id is the same message');
  check((await serverMessages(alice, room.id)).length === missed + 3, 'stored once');
  const entry = bob.state.rooms.get(room.id);
  check(entry.unread === missed + 2, `unread ${entry.unread}, expected ${missed + 2}`);
  const info = bob.log.filter((x) => x && x.first === false)[0];
  if (recover) check(info.recovered, `recovered: ${JSON.stringify(info)}`);
  else check(bob.conn.syncPages >= pagesBefore + 2 && info.synced >= missed + 1,
    `caught up with sync: ${JSON.stringify(info)}, ${bob.conn.syncPages} pages`);
  log(`${recover ? 'recovery' : 'sync'}: ${JSON.stringify(info)}, `
    + `${bob.conn.syncPages - pagesBefore} sync page(s), ${expected.length} messages`);
  check(!bob.log.some((x) => typeof x === 'string'), `log ${JSON.stringify(bob.log)}`);
  alice.conn.close();
  bob.conn.close();
}

// Bob's socket loses two `message` events (as a dropped frame would): the
// next one jumps past his seq, so he syncs and has all of them, once.
async function gap() {
  const [a, b] = [await register('alice'), await register('bob')];
  const alice = new Person(a, false);
  const bob = new Person(b, false);
  alice.conn.connect();
  bob.conn.connect();
  await Promise.all([alice.connected(1), bob.connected(1)]);
  const {room} = await alice.conn.call('open_dm', {username: bob.user.username});
  await bob.until(() => bob.state.rooms.has(room.id), 'the room event');
  store.applyJoin(bob.state, room.id, await bob.conn.call('join_room', {room_id: room.id}));
  await alice.conn.send({room_id: room.id, body: 'one'});
  await bob.until(() => bob.bodies(room.id).length === 1, 'one live message');

  const socket = bob.conn.socket;
  let lost = 0;
  socket.off('message');
  socket.on('message', () => { lost += 1; bob.recheck(); });
  await alice.conn.send({room_id: room.id, body: 'two'});
  await alice.conn.send({room_id: room.id, body: 'three'});
  await bob.until(() => lost === 2, 'two lost events');
  socket.off('message');
  socket.on('message', (m) => bob.conn.applyMessage(m));
  const pages = bob.conn.syncPages;
  await alice.conn.send({room_id: room.id, body: 'four'});
  const expected = ['1:one', '2:two', '3:three', '4:four'];
  await bob.until(() => bob.bodies(room.id).join('|') === expected.join('|'),
    `all four (has ${bob.bodies(room.id).join('|')})`);
  check(bob.conn.syncPages > pages, 'the jump made Bob sync');
  check(bob.state.rooms.get(room.id).unread === 4, `unread ${bob.state.rooms.get(room.id).unread}`);
  log(`gap: synced after a jump, ${bob.conn.syncPages - pages} sync page(s)`);
  alice.conn.close();
  bob.conn.close();
}

try {
  await scenario(false);
  await scenario(true);
  await gap();
  log('PASS');
  process.exit(0);
} catch (err) {
  console.error('[connection_test] FAIL', err);
  process.exit(1);
}
