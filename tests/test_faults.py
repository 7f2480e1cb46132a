"""Fault drills against real servers: the database restarts, stops for 15 s
or fills its disk, the server itself is frozen (SIGSTOP), the writer is
blocked, the writer or reader pool is gone. Throughout, 10 pairs of users
send acked DMs the way a real client does (one at a time; `unavailable`
retried after its `retry_after` with the same client_msg_id); afterwards
everything is read back.

Each drill asserts what users and operators see: no acked message lost,
none stored twice, no seq gap, every send answered, service back without a
restart, `/healthz` 200 throughout (a database outage is no reason to
restart the process), `/readyz` 503 while the database is away and 200
once it is back, server memory bounded. Times (back within 2 s of the
database's return, `unavailable` within 1 s) are asserted with SLACK for
this shared 2-core machine; the measured values are logged at INFO
(``pytest -o log_cli=true --log-cli-level=INFO tests/test_faults.py``).
Loopback only; about 2 minutes in all.
"""
import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest
import socketio
from aiohttp import web

from tests.kit import (NO_RATE_LIMITS, ServerProcess, connect, free_port, http,
                       refused, register, rss_kib, unique_name)
from tests.kit.postgres import PostgresCluster

log = logging.getLogger(__name__)

PAIRS = 10
# Pause between a sender's acked DM and its next: 10 senders then offer
# a few hundred DMs a second on this 2-core machine.
SEND_PAUSE = 0.02
# A send whose ack has not come in this long is a missing ack. Longer than
# any freeze in these drills (SIGSTOP 3 s), far shorter than the test.
ACK_TIMEOUT = 15
# The targets (issue 20) and the factor the asserts allow on a machine
# shared with other test runs.
RESUME_SECONDS = 2.0
UNAVAILABLE_SECONDS = 1.0
SLACK = 2.5
# Server memory may grow this much over a drill (caches warming, the
# drill's own messages). Writes queueing without bound while the database
# is away grew it ~1.2 MB/s under an open-loop load.
RSS_GROWTH_MAX_KB = 48 * 1024

FAST = {**NO_RATE_LIMITS, 'POSTBOX_LOG_LEVEL': 'WARNING'}

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope='module')
def postgres():
    # Commits are flushed before COMMIT returns: `-m immediate` is a crash
    # of the server, and an acked message must survive it.
    cluster = PostgresCluster(synchronous_commit='on').start()
    yield cluster
    cluster.stop()


@contextlib.contextmanager
def running(data_dir, env):
    """A Postbox server process; it must exit cleanly (code 0) at the end
    (SIGTERM drains: every event in flight answered)."""
    server = ServerProcess(data_dir, env={**FAST, **env}).start()
    try:
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.read_log()


class Drill:
    """PAIRS senders, each sending acked DMs to its partner in their dm
    room, plus monitors sampling /healthz, /readyz, the write queue gauge
    and the server's RSS. ``await drill.finish()`` stops the senders, reads
    every room back and returns the numbers."""

    def __init__(self, server):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.acked = {}     # (room id, client_msg_id) -> (message id, seq)
        self.sent = set()   # (room id, client_msg_id) of every send made
        self.unavailable = []  # (time answered, seconds it took)
        self.errors = []    # any other error ack or failure
        self.missing = 0    # acks that did not come within ACK_TIMEOUT
        self.ok_at = []     # time of every ok ack
        self.samples = []   # (time, /healthz status, /readyz status, body)
        self.rss = []       # (time, KB)
        self.queue = []     # (time, postbox_store_write_queue)
        self.stopping = asyncio.Event()
        self.rooms = []     # (room id, sender client, reader token)
        self.tasks = []
        self.monitors = []
        self.hashing = 0

    async def start(self):
        # Bots, which have no password: 20 argon2 hashes take a while.
        async with self.passwords():
            _, owner = await register(self.server.url)
        for _ in range(PAIRS):
            _, ta = await new_bot(self.server.url, owner)
            bob, tb = await new_bot(self.server.url, owner)
            sender = await connect(self.server.url, ta)
            ack = await sender.call('open_dm', {'username': bob['username']})
            assert ack['ok'], ack
            self.rooms.append((ack['room']['id'], sender, tb))
        self.monitors = [asyncio.create_task(self._probe_http()),
                         asyncio.create_task(self._probe_rss())]
        self.tasks = [asyncio.create_task(self._send_loop(sender, room_id))
                      for room_id, sender, _ in self.rooms]
        await self.wait_acks(3 * PAIRS)
        await asyncio.sleep(0.2)
        self.rss_before = rss_kib(self.server.pid)
        return self

    async def wait_acks(self, count, after=None, timeout=30):
        """Wait until ``count`` ok acks arrived (after time ``after``);
        returns the time of the first of them."""
        deadline = self.loop.time() + timeout
        while True:
            times = [t for t in self.ok_at if after is None or t >= after]
            if len(times) >= count:
                return times[0]
            assert self.loop.time() < deadline, \
                (f'{len(times)} of {count} acks', self.errors[-3:],
                 self.server.read_log()[-3000:])
            await asyncio.sleep(0.02)

    async def wait_ready(self, timeout=30):
        deadline = self.loop.time() + timeout
        while True:
            status, body = await http(self.server.url, 'GET', '/readyz')
            if status == 200:
                return self.loop.time()
            assert self.loop.time() < deadline, (status, body)
            await asyncio.sleep(0.05)

    async def wait_ready_status(self, status, since, timeout=10):
        """Wait for a /readyz sample with ``status`` taken after
        ``since``."""
        deadline = self.loop.time() + timeout
        while not any(s[2] == status for s in self.samples if s[0] > since):
            assert self.loop.time() < deadline, self.samples[-3:]
            await asyncio.sleep(0.02)

    async def _send_loop(self, client, room_id):
        tag = unique_name('c')
        n = 0
        while not self.stopping.is_set():
            n += 1
            if not await self.send(client, room_id, f'{tag}-{n}'):
                return
            await asyncio.sleep(SEND_PAUSE)

    async def send(self, client, room_id, cmid) -> bool:
        """One DM, retried after `unavailable` until acked. False if it
        got any other answer (recorded in ``errors``)."""
        self.sent.add((room_id, cmid))
        missed = 0
        while True:
            started = self.loop.time()
            try:
                ack = await client.call('send_dm', {
                    'room_id': room_id, 'body': f'body {cmid}',
                    'client_msg_id': cmid}, timeout=ACK_TIMEOUT)
            except socketio.exceptions.TimeoutError:
                self.missing += 1
                missed += 1
                if missed == 3:
                    self.errors.append(f'{cmid}: no ack 3 times')
                    return False
                continue
            except Exception as exc:  # disconnected
                self.errors.append(f'{cmid}: {exc!r}')
                return False
            now = self.loop.time()
            if ack.get('ok'):
                message = ack['message']
                self.acked[(room_id, cmid)] = (message['id'], message['seq'])
                self.ok_at.append(now)
                return True
            error = ack['error']
            if error['code'] != 'unavailable' or 'retry_after' not in error:
                self.errors.append(f'{cmid}: {error}')
                return False
            self.unavailable.append((now, now - started))
            await asyncio.sleep(error['retry_after'])

    async def _probe_http(self):
        timeout = aiohttp.ClientTimeout(total=ACK_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                statuses = []
                for path in ('/healthz', '/readyz'):
                    async with session.get(self.server.url + path) as resp:
                        statuses.append((resp.status, await resp.json()))
                async with session.get(self.server.url + '/metrics') as resp:
                    text = await resp.text()
                found = re.search(r'^postbox_store_write_queue (\S+)$', text,
                                  re.M)
                now = self.loop.time()
                self.queue.append((now, float(found.group(1))))
                self.samples.append((now, statuses[0][0], statuses[1][0],
                                     statuses[1][1]))
                await asyncio.sleep(0.05)

    async def _probe_rss(self):
        while True:
            if not self.hashing:
                self.rss.append((self.loop.time(),
                                 rss_kib(self.server.pid)))
            await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def passwords(self):
        """Around registrations and logins: each password hash (argon2)
        takes 64 MiB for a moment, which is not what the RSS samples are
        for, so none are taken meanwhile."""
        self.hashing += 1
        try:
            yield
        finally:
            await asyncio.sleep(0.2)  # the hash's memory is given back
            self.hashing -= 1

    def ready_between(self, start, end):
        """/readyz statuses sampled between two times."""
        return [s[2] for s in self.samples if start <= s[0] <= end]

    async def finish(self) -> dict:
        self.stopping.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 3 * ACK_TIMEOUT)
        for task in self.monitors:
            task.cancel()
        await asyncio.gather(*self.monitors, return_exceptions=True)
        stored = {}
        for room_id, sender, reader_token in self.rooms:
            await sender.close()
            reader = await connect(self.server.url, reader_token)
            stored[room_id] = await read_room(reader, room_id)
            await reader.close()
        return self.check(stored)

    def check(self, stored) -> dict:
        """Assert the read-back against what was acked; return numbers."""
        assert self.errors == []
        assert self.missing == 0
        for room_id, messages in stored.items():
            cmids = [m['client_msg_id'] for m in messages]
            assert len(cmids) == len(set(cmids)), 'a message stored twice'
            assert [m['seq'] for m in messages] == \
                list(range(1, len(messages) + 1)), 'a seq gap'
            for cmid in cmids:
                assert (room_id, cmid) in self.sent
            by_cmid = {m['client_msg_id']: (m['id'], m['seq'])
                       for m in messages}
            for (acked_room, cmid), got in self.acked.items():
                if acked_room == room_id:
                    assert by_cmid.get(cmid) == got, f'acked {cmid} lost'
        assert all(s[1] == 200 for s in self.samples), \
            [s for s in self.samples if s[1] != 200][:3]
        peak = max(kb for _, kb in self.rss)
        assert peak - self.rss_before < RSS_GROWTH_MAX_KB, \
            (self.rss_before, peak)
        return {
            'acked': len(self.acked),
            'unavailable': len(self.unavailable),
            'unavailable_max_s': round(max(
                (took for _, took in self.unavailable), default=0), 3),
            'queue_peak': max((q for _, q in self.queue), default=0),
            'rss_before_mb': round(self.rss_before / 1024, 1),
            'rss_peak_mb': round(peak / 1024, 1)}


async def new_bot(base, owner_token):
    """A bot account of the owner's: (user, token)."""
    status, body = await http(base, 'POST', '/api/bots', token=owner_token,
                              json={'username': unique_name('b')})
    assert status == 201, body
    return body['user'], body['token']


async def read_room(client, room_id) -> list:
    """Every message of a room, in seq order, paging through history."""
    messages = []
    after = 0
    while True:
        page = await client.call('history', {'room_id': room_id,
                                             'after': after, 'limit': 100},
                                 timeout=30)
        assert page['ok'], page
        messages += page['messages']
        if not page['has_more'] or not page['messages']:
            return messages
        after = page['messages'][-1]['seq']


async def run_blocking(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def assert_resumed(numbers, back, resumed, ready):
    numbers['resume_s'] = round(resumed - back, 3)
    numbers['ready_s'] = round(ready - back, 3)
    log.info('drill numbers: %s', numbers)
    assert numbers['resume_s'] < RESUME_SECONDS * SLACK, numbers
    assert numbers['unavailable_max_s'] < UNAVAILABLE_SECONDS * SLACK, \
        numbers


# -- PostgreSQL ------------------------------------------------------------

@pytest.mark.parametrize('mode', ['fast', 'immediate'])
async def test_postgres_restart_under_load(postgres, tmp_path, mode):
    """``pg_ctl restart -m fast|immediate`` while 10 pairs send: the writer
    and every reader reconnect by themselves."""
    env = {'POSTBOX_DATABASE_URL': postgres.create_database()}
    with running(tmp_path, env) as server:
        drill = await Drill(server).start()
        await run_blocking(postgres.restart, mode)
        back = drill.loop.time()
        resumed = await drill.wait_acks(PAIRS, after=back)
        ready = await drill.wait_ready()
        # Readers too: logins and new connections work, and reads on
        # every reader thread.
        await check_reads_work(drill)
        await drill.wait_acks(3 * PAIRS, after=back)
        numbers = await drill.finish()
        assert_resumed(numbers, back, resumed, ready)


async def test_postgres_stopped_for_15_seconds(postgres, tmp_path):
    """The database stops for 15 s under load, plus an open-loop flood of
    300 sends a second: every write is answered `unavailable` at once with
    retry_after (the queue does not grow, memory stays flat), reads too;
    logins fail with 503 and new connections are refused with
    {code: 'unavailable'}; /readyz says 503 with the reason, /healthz stays
    200; all of it comes back by itself."""
    env = {'POSTBOX_DATABASE_URL': postgres.create_database(),
           'POSTBOX_PRESENCE_GRACE_SECONDS': '1'}
    with running(tmp_path, env) as server:
        drill = await Drill(server).start()
        async with drill.passwords():
            user, token = await register(server.url)
            other, other_token = await register(server.url)
        flooder = await connect(server.url, token)
        ack = await flooder.call('open_dm', {'username': other['username']})
        flood_room = ack['room']['id']
        reader = await connect(server.url, token)
        leaver = await connect(server.url, other_token)
        await run_blocking(postgres.pause, 'fast')
        stopped = drill.loop.time()
        try:
            # A contact goes offline while the database is away (its
            # last-seen time cannot be stored: logged, not a task error).
            await leaver.close()
            flood = asyncio.create_task(
                flood_sends(drill, flooder, flood_room, 300, 12))
            await drill.wait_ready_status(503, stopped)
            status, body = await http(server.url, 'GET', '/readyz')
            assert status == 503 and body['checks']['database'] is False
            assert 'connection' in body['errors']['database'], body
            # No token needed here: the driver's own words (host, port,
            # user) are for the log only.
            assert 'server at' not in str(body) and \
                'postgres' not in str(body).lower(), body
            async with drill.passwords():
                status, body = await http(
                    server.url, 'POST', '/api/login', json={
                        'username': user['username'],
                        'password': 'correct horse'})
            assert status == 503, body
            assert body['error']['code'] == 'unavailable', body
            refusal = await refused(server.url, token)
            assert refusal['data']['code'] == 'unavailable', refusal
            ack = await reader.call('sync', {'rooms': {}})
            assert not ack['ok'] and ack['error']['code'] == 'unavailable'
            answered, unanswered = await flood
            assert unanswered == 0
            await asyncio.sleep(max(0.0, stopped + 15 - drill.loop.time()))
        finally:
            started = drill.loop.time()
            await run_blocking(postgres.resume)
        back = drill.loop.time()
        # Honest readiness: never 200 while the database was stopped.
        assert 200 not in drill.ready_between(stopped + 0.5, started)
        resumed = await drill.wait_acks(PAIRS, after=back)
        ready = await drill.wait_ready()
        await check_reads_work(drill)
        ack = await reader.call('sync', {'rooms': {}})
        assert ack['ok'], ack
        for client in (flooder, reader):
            await client.close()
        await drill.wait_acks(3 * PAIRS, after=back)
        numbers = await drill.finish()
        numbers['flood_answered'] = answered
        assert_resumed(numbers, back, resumed, ready)
        assert 'never retrieved' not in server.read_log()
        # Writes were refused, not queued: the queue never held more than
        # the PAIRS senders' own sends, the flood's 300/s notwithstanding.
        outage = [q for t, q in drill.queue if stopped + 1 < t < started]
        assert outage and max(outage) <= PAIRS, numbers


async def flood_sends(drill, client, room_id, rate, seconds):
    """Open loop: ``rate`` sends a second for ``seconds``, not waiting for
    acks. Returns (answered, unanswered after ACK_TIMEOUT); acked ones
    join the drill's accounting."""
    loop = asyncio.get_running_loop()
    answers = []
    tag = unique_name('f')

    def answer(cmid, started):
        def callback(ack):
            took = loop.time() - started
            if ack.get('ok'):
                drill.acked[(room_id, cmid)] = (ack['message']['id'],
                                                ack['message']['seq'])
            elif ack['error']['code'] == 'unavailable':
                drill.unavailable.append((loop.time(), took))
            else:
                drill.errors.append(ack['error'])
            answers.append(took)
        return callback

    began = loop.time()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, began + n / rate - loop.time()))
        cmid = f'{tag}-{n}'
        drill.sent.add((room_id, cmid))
        await client.sio.emit('send_dm', {
            'room_id': room_id, 'body': 'flood', 'client_msg_id': cmid},
            callback=answer(cmid, loop.time()))
    total = int(rate * seconds)
    deadline = loop.time() + ACK_TIMEOUT
    while len(answers) < total and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return len(answers), total - len(answers)


async def check_reads_work(drill):
    """A registration, a login, a new socket and enough concurrent reads
    to use every reader thread all succeed."""
    server = drill.server
    async with drill.passwords():
        user, token = await register(server.url)
        status, body = await http(server.url, 'POST', '/api/login', json={
            'username': user['username'], 'password': 'correct horse'})
    assert status == 200, body
    client = await connect(server.url, token)
    acks = await asyncio.gather(*[client.call('rooms', {})
                                  for _ in range(16)])
    assert all(ack['ok'] for ack in acks), acks
    await client.close()


# -- SQLite on a full disk -------------------------------------------------

@contextlib.contextmanager
def small_filesystem(size='8m'):
    """A real, small filesystem (tmpfs) of its own, so that filling it
    fills only it. Needs root (or password-less sudo) to mount."""
    path = Path(tempfile.mkdtemp(prefix='postbox-full-'))
    if os.getuid() == 0:
        sudo = []
    elif shutil.which('sudo') and subprocess.run(
            ['sudo', '-n', 'true'], capture_output=True).returncode == 0:
        sudo = ['sudo', '-n']
    else:
        path.rmdir()
        pytest.skip('mounting a small tmpfs needs root or sudo')
    subprocess.run(sudo + ['mount', '-t', 'tmpfs', '-o',
                           f'size={size},mode=1777', 'tmpfs', str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(sudo + ['umount', str(path)],
                          capture_output=True).returncode != 0:
            subprocess.run(sudo + ['umount', '-l', str(path)],
                           capture_output=True)
        path.rmdir()


def fill(path) -> int:
    """Write a file of zeros into ``path`` until its filesystem is full;
    returns the bytes written."""
    written = 0
    chunk = b'\0' * 65536
    with open(path, 'wb') as f:
        try:
            while True:
                written += os.write(f.fileno(), chunk)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    for size in (4096, 512, 1):  # the last odd bytes too
        try:
            with open(path, 'ab') as f:
                while True:
                    written += os.write(f.fileno(), b'\0' * size)
        except OSError:
            pass
    return written


async def test_sqlite_full_disk(tmp_path):
    """SQLite on a filesystem that fills up: sends are answered
    `unavailable` (nothing acked is lost), the log says 'disk is full'
    once, /readyz says 503 with the reason; freeing space brings writes
    and readiness back by themselves."""
    with small_filesystem() as mount:
        env = {'POSTBOX_DATABASE_URL': f'sqlite:///{mount}/postbox.db'}
        with running(tmp_path, env) as server:
            drill = await Drill(server).start()
            filler = mount / 'filler'
            await run_blocking(fill, filler)
            full = drill.loop.time()
            # Writes fail once SQLite needs a page the disk does not have
            # (the WAL reuses its space for a while).
            deadline = full + 60
            while not [t for t, _ in drill.unavailable if t > full]:
                assert drill.loop.time() < deadline, 'writes never failed'
                await asyncio.sleep(0.05)
            await drill.wait_ready_status(503, full)
            status, body = await http(server.url, 'GET', '/readyz')
            assert status == 503, body
            assert body['checks'] == {'database': True, 'disk': False}, body
            assert 'disk full' in body['errors']['disk'], body
            await asyncio.sleep(1)  # a few probes and refused sends more
            filler.unlink()
            back = drill.loop.time()
            resumed = await drill.wait_acks(PAIRS, after=back)
            ready = await drill.wait_ready()
            await drill.wait_acks(3 * PAIRS, after=back)
            numbers = await drill.finish()
            assert_resumed(numbers, back, resumed, ready)
            assert 200 not in drill.ready_between(
                min(t for t, _ in drill.unavailable if t > full) + 0.5,
                back)
        # One clear line from the store, however many writes failed, and
        # a handful in all (readiness changes, the recovery).
        lines = server.read_log().splitlines()
        full_lines = [line for line in lines
                      if 'server.store' in line and 'disk is full' in line]
        assert len(full_lines) == 1, full_lines
        assert 'no transaction is active' not in '\n'.join(lines)
        assert len(lines) < 12, lines


# -- the server frozen -----------------------------------------------------

async def test_server_frozen_by_sigstop(tmp_path):
    """SIGSTOP for 3 s under load, then SIGCONT: every send is answered,
    nothing is lost, and the server goes on as before."""
    with running(tmp_path, {}) as server:
        drill = await Drill(server).start()
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        back = drill.loop.time()
        resumed = await drill.wait_acks(PAIRS, after=back)
        ready = await drill.wait_ready()
        await drill.wait_acks(3 * PAIRS, after=back)
        numbers = await drill.finish()
        assert_resumed(numbers, back, resumed, ready)


# -- a blocked writer: the bounded queue -----------------------------------

async def test_write_queue_is_bounded(tmp_path):
    """While the writer is blocked (another process holds SQLite's write
    lock), at most write_queue_max writes wait; the others are answered
    `unavailable` with retry_after at once, not after the block. When the
    lock goes, every waiting write commits and is acked."""
    queue_max = 50
    with running(tmp_path, {'POSTBOX_WRITE_QUEUE_MAX': str(queue_max)}) \
            as server:
        _, ta = await register(server.url)
        bob, _ = await register(server.url)
        client = await connect(server.url, ta)
        ack = await client.call('open_dm', {'username': bob['username']})
        room_id = ack['room']['id']
        blocker = sqlite3.connect(tmp_path / 'postbox.db', timeout=30)
        blocker.execute('BEGIN IMMEDIATE')
        loop = asyncio.get_running_loop()
        try:
            sends = [asyncio.create_task(timed_send(client, room_id, n))
                     for n in range(300)]
            # Wait for the refusals: they must not wait for the lock.
            deadline = loop.time() + 10
            while sum(t.done() for t in sends) < 300 - queue_max:
                assert loop.time() < deadline, \
                    f'{sum(t.done() for t in sends)} answered while blocked'
                await asyncio.sleep(0.02)
            status, text = await http(server.url, 'GET', '/metrics')
            waiting = float(re.search(r'^postbox_store_write_queue (\S+)$',
                                      text, re.M).group(1))
            assert waiting <= queue_max
        finally:
            blocker.rollback()
            blocker.close()
        results = await asyncio.gather(*sends)
        ok = {cmid: ack['message']['seq'] for cmid, ack, _ in results
              if ack['ok']}
        refused_now = [(ack['error'], took) for _, ack, took in results
                       if not ack['ok']]
        assert 0 < len(ok) <= queue_max
        assert len(refused_now) == 300 - len(ok)
        for error, took in refused_now:
            assert error['code'] == 'unavailable' and 'retry_after' in error
        stored = await read_room(client, room_id)
        assert {m['client_msg_id']: m['seq'] for m in stored} == ok
        assert [m['seq'] for m in stored] == list(range(1, len(ok) + 1))
        # Service goes on.
        ack = await client.call('send_dm', {'room_id': room_id, 'body': 'x',
                                            'client_msg_id': 'after'})
        assert ack['ok'], ack
        await client.close()


async def timed_send(client, room_id, n):
    started = asyncio.get_running_loop().time()
    ack = await client.call('send_dm', {'room_id': room_id, 'body': f'{n}',
                                        'client_msg_id': f'q{n}'},
                            timeout=ACK_TIMEOUT)
    return f'q{n}', ack, asyncio.get_running_loop().time() - started


# -- a dead writer or reader pool ------------------------------------------

async def test_healthz_fails_when_the_writer_or_readers_are_gone(tmp_path):
    """/healthz is 503 naming the part once the writer thread or the
    reader pool has stopped (a process that cannot store must be
    restarted); a send is then answered `unavailable` at once instead of
    waiting forever."""
    from server.app import create_app
    from server.config import load_config
    from server.transport import http as http_views

    config = load_config(env={}, data_dir=str(tmp_path), port=free_port(),
                         secret='test-secret-' + 'x' * 32)
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', config.port).start()
    base = f'http://127.0.0.1:{config.port}'
    store = app[http_views.CTX].store
    try:
        assert (await http(base, 'GET', '/healthz'))[0] == 200
        alice, ta = await register(base)
        bob, _ = await register(base)
        client = await connect(base, ta)
        # The writer leaves its loop, as it does when the store closes.
        store._queue.put(None)
        await run_blocking(store._writer.join, 10)
        status, body = await http(base, 'GET', '/healthz')
        assert status == 503 and body['checks'] == {
            'writer': False, 'readers': True}, body
        ack = await client.call('send_dm', {'to': bob['username'],
                                            'body': 'x',
                                            'client_msg_id': 'w1'})
        assert not ack['ok'] and ack['error']['code'] == 'unavailable', ack
        await client.close()
        store._readers.shutdown()
        status, body = await http(base, 'GET', '/healthz')
        assert status == 503 and body['checks']['readers'] is False, body
    finally:
        await runner.cleanup()
