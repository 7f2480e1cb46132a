"""The reference echo servers of the official Engine.IO and Socket.IO
conformance suites (``../shared/conformance/*/test-suite.js``), built on
either Postbox's transport classes or stock python-engineio /
python-socketio, so that tests/test_conformance.py can hold the first to
every test the second passes.

    python -m tests.conformance.echo_server {engine,socket} {postbox,stock} PORT

Configured as the suites' README asks: ping interval 300 ms, ping timeout
200 ms, max payload 1e6, CORS *, connect timeout 1000 ms; the Engine.IO
server echoes every message, the Socket.IO server emits ``auth`` with the
handshake's auth payload on ``/`` and ``/custom``, echoes ``message`` as
``message-back`` and acks ``message-with-ack`` with its arguments.
"""
import asyncio
import sys

import engineio
import socketio
from aiohttp import web

PING_INTERVAL = 0.3
PING_TIMEOUT = 0.2
MAX_PAYLOAD = 1_000_000
CONNECT_TIMEOUT = 1.0


def engine_app(kind) -> web.Application:
    options = dict(async_mode='aiohttp', cors_allowed_origins='*',
                   ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
                   max_http_buffer_size=MAX_PAYLOAD)
    if kind == 'postbox':
        from server.upstream.engineio_server import Engine
        eio = Engine(**options)
    else:
        eio = engineio.AsyncServer(**options)

    @eio.on('message')
    async def message(sid, data):
        await eio.send(sid, data)

    app = web.Application()
    eio.attach(app, engineio_path='engine.io')
    return app


def socket_app(kind) -> web.Application:
    options = dict(async_mode='aiohttp', cors_allowed_origins='*',
                   ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
                   max_http_buffer_size=MAX_PAYLOAD)
    if kind == 'postbox':
        from server.transport.backpressure import bound_send_queues
        from server.upstream.socketio_server import Server
        from server import fastjson
        from server.upstream.socketio_manager import LocalManager
        from server.upstream.socketio_packet import JsonPacket
        sio = Server(client_manager=LocalManager(), json=fastjson,
                     serializer=JsonPacket, **options)
        bound_send_queues(sio, 1000, 2.0)
    else:
        sio = socketio.AsyncServer(**options)
    for option in ('connect_timeout',):  # where the server has it
        if hasattr(sio.eio, option):
            setattr(sio.eio, option, CONNECT_TIMEOUT)

    async def send_auth(sid, auth, namespace):
        # After the CONNECT reply, as the reference server does it (its
        # connection handler runs once CONNECT is sent; python-socketio's
        # connect handler runs before), and not in the same write: the
        # suite reads one message per event-loop turn of its client.
        await asyncio.sleep(0.05)
        await sio.emit('auth', auth if auth is not None else {}, to=sid,
                       namespace=namespace)

    for namespace in ('/', '/custom'):
        @sio.on('connect', namespace=namespace)
        async def connect(sid, environ, auth=None, namespace=namespace):
            sio.start_background_task(send_auth, sid, auth, namespace)

    @sio.on('message')
    async def message(sid, *args):
        await sio.emit('message-back', args if len(args) != 1 else args[0],
                       to=sid)

    @sio.on('message-with-ack')
    async def message_with_ack(sid, *args):
        return args

    app = web.Application()
    sio.attach(app)
    return app


def main(argv):
    suite, kind, port = argv
    app = engine_app(kind) if suite == 'engine' else socket_app(kind)
    web.run_app(app, host='127.0.0.1', port=int(port), print=None)


if __name__ == '__main__':
    main(sys.argv[1:])
