"""Long-polling clients through a real nginx, configured with the shipped
deploy/nginx.conf, in front of two Postbox processes joined by Redis."""
import asyncio
import getpass
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from tests.kit import (FAST_REDIS_ENV, ROOT, RedisProcess, connect, free_port,
                       http, register, start_servers, stop_servers)

MAIN_CONF = """\
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/postbox.conf;
}}
"""


def site_config(upstreams, port) -> str:
    """The shipped deploy/nginx.conf with our processes and port."""
    text = (ROOT / 'deploy' / 'nginx.conf').read_text()
    servers = ''.join(f'    server 127.0.0.1:{p};\n' for p in upstreams)
    text, n = re.subn(r'(    server 127\.0\.0\.1:\d+;\n)+', servers, text)
    assert n == 1, 'upstream block not found in deploy/nginx.conf'
    text, n = re.subn(r'listen 80;', f'listen 127.0.0.1:{port};', text)
    assert n == 1, 'listen directive not found in deploy/nginx.conf'
    return text


class Nginx:
    def __init__(self, prefix, upstreams):
        self.prefix = prefix
        self.port = free_port()
        self.upstreams = upstreams
        self.proc = None

    @property
    def url(self):
        return f'http://127.0.0.1:{self.port}'

    def start(self):
        binary = shutil.which('nginx') or '/usr/sbin/nginx'
        assert os.path.exists(binary), 'nginx is not installed'
        self.prefix.mkdir(parents=True, exist_ok=True)
        # As root, nginx workers switch to `nobody`, who could not use our
        # temp dirs: keep them as the current user.
        user = f'user {getpass.getuser()};' if os.getuid() == 0 else ''
        (self.prefix / 'nginx.conf').write_text(
            MAIN_CONF.format(prefix=self.prefix, user=user))
        (self.prefix / 'postbox.conf').write_text(
            site_config(self.upstreams, self.port))
        args = [binary, '-p', str(self.prefix), '-c',
                str(self.prefix / 'nginx.conf'), '-e',
                str(self.prefix / 'error.log')]
        check = subprocess.run(args + ['-t'], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError('nginx exited: ' + self.log())
            try:
                with socket.create_connection(('127.0.0.1', self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError('nginx did not start: ' + self.log())

    def log(self):
        try:
            return (self.prefix / 'error.log').read_text()
        except FileNotFoundError:
            return ''

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    redis = RedisProcess(tmp_path_factory.mktemp('redis')).start()
    # A short ping interval: python-engineio answers a client's close of a
    # long-polling session only when the pending poll times out, which is
    # bounded by ping interval + ping timeout (45 s by default).
    try:
        servers = start_servers(tmp_path_factory.mktemp('behind-nginx'), 2, {
            'POSTBOX_REDIS_URL': redis.url, **FAST_REDIS_ENV,
            'POSTBOX_PING_INTERVAL': '3', 'POSTBOX_PING_TIMEOUT': '3'})
    except Exception:
        redis.stop()
        raise
    try:
        nginx = Nginx(tmp_path_factory.mktemp('nginx'),
                      [s.port for s in servers]).start()
    except Exception:
        stop_servers(servers)
        redis.stop()
        raise
    yield nginx, servers
    nginx.stop()
    codes = stop_servers(servers)
    redis.stop()
    assert codes == [0, 0], [s.read_log() for s in servers]


async def test_long_polling_clients_through_nginx(stack):
    nginx, (p1, p2) = stack
    status, body = await http(nginx.url, 'GET', '/readyz')
    assert status == 200 and body['checks']['redis'] is True
    alice, ta = await register(nginx.url)
    bob, tb = await register(nginx.url)
    carol, tc = await register(nginx.url)
    # Alice long-polls through nginx (a session of many requests that
    # must all reach one process); bob and carol sit on one process each,
    # so whichever process nginx picked, one of them is on the other.
    a = await connect(nginx.url, ta, transports=['polling'])
    a_too = await connect(nginx.url, ta, transports=['polling'])
    b = await connect(p1.url, tb)
    c = await connect(p2.url, tc)
    for user, client in ((bob, b), (carol, c)):
        ack = await a.call('send_dm', {'to': user['username'],
                                       'body': 'via nginx',
                                       'client_msg_id': user['username']})
        assert ack['ok'], ack
        got = await client.next('message')
        assert got['body'] == 'via nginx'
        assert (await a_too.next('message'))['id'] == got['id']
        reply = await client.call('send_dm', {'room_id': got['room_id'],
                                              'body': 'to a poller',
                                              'client_msg_id': 'r'})
        assert reply['ok']
        for poller in (a, a_too):
            back = await poller.next(
                'message', where=lambda m: m['room_id'] == got['room_id']
                and m['body'] == 'to a poller')
            assert back['sender']['id'] == user['id']
    # A websocket through nginx too (the upgrade headers).
    ws = await connect(nginx.url, tb)
    ack = await c.call('send_dm', {'to': bob['username'], 'body': 'ws',
                                   'client_msg_id': 'ws'})
    assert ack['ok']
    assert (await ws.next('message'))['body'] == 'ws'
    await asyncio.gather(*[client.close()
                           for client in (a, a_too, b, c, ws)])
