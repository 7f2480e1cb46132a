"""The yardstick: a bare python-socketio relay with stock settings.

Default ``AsyncServer`` on aiohttp, stdlib ``json``, websocket compression
as aiohttp negotiates it by default, no auth, no storage. It speaks the
same event names and shapes as Postbox for what the benchmark uses, so one
load generator drives both:

- connect with ``auth: {token: <username>}`` (or ``?token=<username>``);
  the socket enters the room ``user:<username>``;
- ``open_dm {username}`` -> ``{ok, room}`` (the same room from either side);
- ``create_group {name, members: [username]}`` -> ``{ok, room}``;
- ``send_dm {room_id, body, client_msg_id}`` -> ``{ok, message}``, with a
  ``message`` emitted to every other member's ``user:`` room (the relay does
  not echo to the sender's sockets; Postbox does, by contract).

Usage: ``python bench/relay_server.py --port 8100``
"""
import argparse
import itertools
import time
from urllib.parse import parse_qs

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode='aiohttp')
app = web.Application()
sio.attach(app)

users = {}  # sid -> username
rooms = {}  # room id -> {'id', 'kind', 'name', 'members': [username]}
dm_rooms = {}  # frozenset of two usernames -> room id
room_ids = itertools.count(1)
message_ids = itertools.count(1)
seqs = {}  # room id -> last seq


def _room_payload(room):
    return {'id': room['id'], 'kind': room['kind'], 'name': room['name'],
            'members': [{'id': m, 'username': m} for m in room['members']],
            'last_seq': seqs.get(room['id'], 0)}


def _new_room(kind, name, members):
    room = {'id': next(room_ids), 'kind': kind, 'name': name,
            'members': list(dict.fromkeys(members))}
    rooms[room['id']] = room
    return room


@sio.event
async def connect(sid, environ, auth=None):
    token = (auth or {}).get('token') if isinstance(auth, dict) else None
    if not token:
        query = parse_qs(environ.get('QUERY_STRING', ''))
        token = (query.get('token') or [None])[0]
    if not token:
        raise socketio.exceptions.ConnectionRefusedError('unauthorized')
    users[sid] = token
    await sio.enter_room(sid, 'user:' + token)


@sio.event
async def disconnect(sid, reason=None):
    users.pop(sid, None)


@sio.event
async def open_dm(sid, data):
    me, other = users[sid], data['username']
    key = frozenset((me, other))
    if key not in dm_rooms:
        dm_rooms[key] = _new_room('dm', None, [me, other])['id']
    return {'ok': True, 'room': _room_payload(rooms[dm_rooms[key]])}


@sio.event
async def create_group(sid, data):
    room = _new_room('group', data.get('name'), [users[sid]] + data['members'])
    return {'ok': True, 'room': _room_payload(room)}


@sio.event
async def send_dm(sid, data):
    me = users[sid]
    room = rooms.get(data.get('room_id'))
    if room is None or me not in room['members']:
        return {'ok': False, 'error': {'code': 'not_found',
                                       'message': 'no such room'}}
    seq = seqs[room['id']] = seqs.get(room['id'], 0) + 1
    message = {'id': next(message_ids), 'room_id': room['id'], 'seq': seq,
               'sender': {'id': me, 'username': me}, 'body': data['body'],
               'client_msg_id': data.get('client_msg_id'),
               'created_at': time.strftime('%Y-%m-%dT%H:%M:%S.000Z',
                                           time.gmtime())}
    for member in room['members']:
        if member != me:
            await sio.emit('message', message, to='user:' + member)
    return {'ok': True, 'message': message}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=8100)
    args = parser.parse_args()
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == '__main__':
    main()
