// The Node yardstick: the same bare DM relay as bench/relay_server.py on
// socket.io 4.x with its stock settings (no auth, no storage).
// Usage: node relay.js PORT [HOST]
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || 8101);
const host = process.argv[3] || '127.0.0.1';
const server = http.createServer();
const io = new Server(server);

const rooms = new Map(); // room id -> {id, kind, name, members: [username]}
const dmRooms = new Map(); // "a\u0000b" (sorted) -> room id
const seqs = new Map();
let nextRoom = 1;
let nextMessage = 1;

function roomPayload(room) {
  return {
    id: room.id, kind: room.kind, name: room.name,
    members: room.members.map((m) => ({ id: m, username: m })),
    last_seq: seqs.get(room.id) || 0,
  };
}

function newRoom(kind, name, members) {
  const room = { id: nextRoom++, kind, name, members: [...new Set(members)] };
  rooms.set(room.id, room);
  return room;
}

io.on('connection', (socket) => {
  const token = (socket.handshake.auth && socket.handshake.auth.token) ||
    socket.handshake.query.token;
  if (!token) {
    socket.disconnect(true);
    return;
  }
  const me = String(token);
  socket.join('user:' + me);

  socket.on('open_dm', (data, ack) => {
    const key = [me, data.username].sort().join('\u0000');
    if (!dmRooms.has(key)) dmRooms.set(key, newRoom('dm', null, [me, data.username]).id);
    ack({ ok: true, room: roomPayload(rooms.get(dmRooms.get(key))) });
  });

  socket.on('create_group', (data, ack) => {
    const room = newRoom('group', data.name || null, [me, ...data.members]);
    ack({ ok: true, room: roomPayload(room) });
  });

  socket.on('send_dm', (data, ack) => {
    const room = rooms.get(data.room_id);
    if (!room || !room.members.includes(me)) {
      ack({ ok: false, error: { code: 'not_found', message: 'no such room' } });
      return;
    }
    const seq = (seqs.get(room.id) || 0) + 1;
    seqs.set(room.id, seq);
    const message = {
      id: nextMessage++, room_id: room.id, seq,
      sender: { id: me, username: me }, body: data.body,
      client_msg_id: data.client_msg_id, created_at: new Date().toISOString(),
    };
    for (const member of room.members) {
      if (member !== me) io.to('user:' + member).emit('message', message);
    }
    ack({ ok: true, message });
  });
});

server.listen(port, host);
