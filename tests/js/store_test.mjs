#!/usr/bin/env node
// client_demo/static/store.js on its own (no server, no socket): the
// reducers the page and connection_test.mjs build on, with node:test.
// Run: node --test store_test.mjs
import assert from 'node:assert/strict';
import {test} from 'node:test';

import * as store from '../../client_demo/static/store.js';

const ME = {id: 1, username: 'me'};
const BOB = {id: 2, username: 'bob'};

function room(id, lastSeq = 0) {
  return {id, kind: 'dm', members: [ME, BOB], last_seq: lastSeq,
    created_at: `2026-01-01T00:00:0${id}Z`};
}

function message(roomId, seq, sender = BOB, extra = {}) {
  return {id: roomId * 1000 + seq, room_id: roomId, seq, sender, body: `m${seq}`,
    client_msg_id: `c${seq}`, created_at: `2026-01-02T00:00:${String(seq).padStart(2, '0')}Z`,
    ...extra};
}

test('a new message from someone else counts as unread; mine does not', () => {
  const state = store.createState(ME);
  store.applyRoom(state, room(5));
  assert.deepEqual(store.applyMessage(state, message(5, 1), true), {known: true, mine: false});
  store.applyMessage(state, message(5, 2, ME), true);
  store.applyMessage(state, message(5, 1), false);  // an ack's copy again
  const entry = state.rooms.get(5);
  assert.equal(entry.unread, 1);
  assert.equal(entry.last_message.seq, 2);
  assert.deepEqual(store.applyMessage(state, message(9, 1), true), {known: false, mine: false});
});

test('a loaded conversation keeps the newest version and drops my pending copy', () => {
  const state = store.createState(ME);
  store.applyRoom(state, room(5));
  store.applyJoin(state, 5, {messages: [message(5, 1)], has_more: false, read: {2: 1}, room: room(5, 1)});
  store.addPending(state, {...message(5, 0, ME), id: null, client_msg_id: 'mine'});
  store.applyMessage(state, message(5, 2, ME, {client_msg_id: 'mine'}), true);
  store.applyMessageUpdated(state, message(5, 1, BOB, {body: 'edited', update_seq: 3}));
  store.applyMessageUpdated(state, message(5, 1, BOB, {body: 'older', update_seq: 2}));
  const c = state.convos.get(5);
  assert.deepEqual(store.timeline(c).map((m) => m.body), ['edited', 'm2']);
  assert.equal(c.pending.size, 0);
  assert.equal(c.read[2], 1);
});

test('inbox pages add up; a refresh of the first page keeps the cursor', () => {
  const state = store.createState(ME);
  const entry = (id) => ({room: room(id), last_message: null, unread: 0, last_read_seq: 0});
  store.applyInboxPage(state, {rooms: [entry(3), entry(2)], has_more: true, next_before: 'x'}, true);
  assert.deepEqual([state.inboxMore, state.inboxCursor], [true, 'x']);
  store.applyInboxPage(state, {rooms: [entry(3), entry(2)], has_more: true, next_before: 'y'}, true);
  assert.equal(state.inboxCursor, 'x');
  store.applyInboxPage(state, {rooms: [entry(1)], has_more: false}, false);
  assert.deepEqual([state.inboxMore, state.inboxCursor], [false, null]);
  assert.deepEqual(store.inbox(state).map((e) => e.room.id), [3, 2, 1]);
  assert.equal(state.rooms.get(1).muted, false);
});

test('a muted room does not count in the total; a room left goes entirely', () => {
  const state = store.createState(ME);
  store.applyRoom(state, room(5));
  store.applyRoom(state, room(6));
  store.applyMessage(state, message(5, 1), true);
  store.applyMessage(state, message(6, 1), true);
  store.applyMuted(state, 6, true);
  assert.equal(store.totalUnread(state), 1);
  store.convo(state, 5);
  assert.equal(store.applyRoomLeft(state, 5).room.id, 5);
  assert.equal(state.rooms.has(5) || state.convos.has(5), false);
  assert.deepEqual(store.contacts(state), ['bob']);
});

test('my read from another device and a new message, in either order, leave the right count', () => {
  for (const readFirst of [true, false]) {
    for (const countedIt of [true, false]) {
      // The server counted 1 unread through seq 4 (countedIt: the new
      // message 4 was in) or 0 through seq 3 (it came after the count).
      const state = store.createState(ME);
      store.applyInboxPage(state, {rooms: [{room: room(5, 3), last_message: message(5, 3),
        unread: 3, last_read_seq: 0}], has_more: false});
      const read = countedIt ? {room_id: 5, user_id: ME.id, seq: 3, unread: 1, last_seq: 4}
        : {room_id: 5, user_id: ME.id, seq: 3, unread: 0, last_seq: 3};
      const steps = [() => store.applyRead(state, read), () => store.applyMessage(state, message(5, 4), true)];
      if (!readFirst) steps.reverse();
      for (const step of steps) step();
      assert.equal(state.rooms.get(5).unread, 1, `read first: ${readFirst}, counted: ${countedIt}`);
      assert.equal(state.rooms.get(5).last_read_seq, 3);
    }
  }
});

test('a deleted unread message that sync replays after an inbox reload is not subtracted twice', () => {
  // Bob's messages 1-4, none read; 4 deleted at seq 5. The inbox page,
  // counted through seq 5, already leaves 4 out: 3 unread.
  const state = store.createState(ME);
  const deleted = message(5, 4, BOB, {body: '', deleted: true, update_seq: 5});
  store.applyInboxPage(state, {rooms: [{room: room(5, 5), last_message: message(5, 3),
    unread: 3, last_read_seq: 0}], has_more: false});
  // A sync from seq 3 (the connection's seq was older than the page)
  // replays the message in its current state, then its delete.
  store.applyMessage(state, deleted, true);
  store.applyMessageUpdated(state, deleted);
  assert.equal(state.rooms.get(5).unread, 3);
});

test('a delete counts once whether its message was counted by the server or live', () => {
  // Counted by the server (through seq 4), deleted after the count.
  let state = store.createState(ME);
  store.applyInboxPage(state, {rooms: [{room: room(5, 4), last_message: message(5, 4),
    unread: 2, last_read_seq: 2}], has_more: false});
  store.applyMessageUpdated(state, message(5, 4, BOB, {body: '', deleted: true, update_seq: 5}));
  assert.equal(state.rooms.get(5).unread, 1);

  // Counted live (above the count), deleted, then my read from another
  // device that crossed it (counted through seq 3): it stays uncounted.
  state = store.createState(ME);
  store.applyInboxPage(state, {rooms: [{room: room(5, 3), last_message: message(5, 3),
    unread: 1, last_read_seq: 2}], has_more: false});
  store.applyMessage(state, message(5, 4), true);
  assert.equal(state.rooms.get(5).unread, 2);
  store.applyMessageUpdated(state, message(5, 4, BOB, {body: '', deleted: true, update_seq: 5}));
  assert.equal(state.rooms.get(5).unread, 1);
  store.applyRead(state, {room_id: 5, user_id: ME.id, seq: 3, unread: 0, last_seq: 3});
  assert.equal(state.rooms.get(5).unread, 0);

  // A message I never counted (mine, or already read) takes nothing off.
  state = store.createState(ME);
  store.applyInboxPage(state, {rooms: [{room: room(5, 3), last_message: message(5, 3),
    unread: 1, last_read_seq: 2}], has_more: false});
  store.applyMessage(state, message(5, 4, ME), true);
  store.applyMessageUpdated(state, message(5, 4, ME, {body: '', deleted: true, update_seq: 5}));
  store.applyMessage(state, message(5, 6), false);  // a send's ack copy: not new
  store.applyMessageUpdated(state, message(5, 6, BOB, {body: '', deleted: true, update_seq: 7}));
  assert.equal(state.rooms.get(5).unread, 1);
});
