"""The writer process: the batched send's SQL runs in a child process of
the server (``server/writer_process.py``). It must be invisible to
clients: sends acked after their commit, every message delivered live
once, and a writer process that dies or hangs is replaced while sends go
on, nothing lost and nothing twice."""
import asyncio
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import pytest

from server import writer_process
from server.config import load_config
from server.data.faults import ProcessLost
from server.errors import Forbidden, RateLimited
from server.services.sending import _redone
from server.store import Batched, _segments
from server.writer_process import WriterProcess
from tests.kit import (NO_RATE_LIMITS as FAST, ROOT, ServerProcess, connect,
                       http)
from tests.test_durability import check_stored, sender_loop, setup_room


def writer_processes(server_pid) -> list:
    """The pids of the server's writer processes."""
    found = []
    for task in os.listdir(f'/proc/{server_pid}/task'):
        with open(f'/proc/{server_pid}/task/{task}/children') as f:
            children = [int(c) for c in f.read().split()]
        for child in children:
            try:
                with open(f'/proc/{child}/cmdline', 'rb') as f:
                    argv = f.read().decode(errors='replace')
            except OSError:
                continue
            if 'server.writer_process' in argv:
                found.append(child)
    return found


async def metric(server, name) -> float:
    status, text = await http(server.url, 'GET', '/metrics')
    assert status == 200
    found = re.search(rf'^{name} (\S+)$', text, re.M)
    assert found, f'{name} not in /metrics'
    return float(found.group(1))


async def until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        await asyncio.sleep(0.05)


@pytest.fixture
def child_finds_tests(monkeypatch):
    monkeypatch.setenv('PYTHONPATH', str(ROOT))


@pytest.fixture
def child(tmp_path, child_finds_tests):
    """A started writer process on a fresh database, closed after the
    test."""
    config = load_config(env={'POSTBOX_DATA_DIR': str(tmp_path)})
    process = WriterProcess(config.effective_database_url, config)
    process.start()
    yield process
    process.close()


@pytest.fixture
def stop_later():
    """Servers given to it are stopped after the test, even a failed one
    (a server left running would load the rest of the run)."""
    servers = []
    yield servers.append
    for server in servers:
        server.stop()


async def test_killed_writer_process_loses_nothing_and_comes_back(
        tmp_path, stop_later):
    server = ServerProcess(tmp_path, env=FAST).start()
    stop_later(server)
    ta, tb, room = await setup_room(server.url)
    receiver = await connect(server.url, tb)
    senders = [await connect(server.url, ta) for _ in range(4)]
    acked, errors, stop = {}, {}, asyncio.Event()
    tasks = [asyncio.ensure_future(sender_loop(
        c, room['id'], f'c{n}', acked, errors, stop))
        for n, c in enumerate(senders)]
    await until(lambda: len(acked) >= 100, 30, '100 acks')
    (first,) = writer_processes(server.pid)
    assert await metric(server, 'postbox_writer_process_up') == 1
    assert await metric(server, 'postbox_writer_process_runs_total') > 0
    os.kill(first, signal.SIGKILL)
    # Sends go on (the writer thread takes them), then a new process.
    await until(lambda: len(acked) >= 300, 30, '300 acks')
    await until(lambda: writer_processes(server.pid) not in ([], [first]),
                30, 'a new writer process')
    runs = await metric(server, 'postbox_writer_process_runs_total')
    await until(lambda: len(acked) >= 450, 30, '450 acks')
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert errors == {}
    assert await metric(server, 'postbox_writer_process_failures_total') >= 1
    assert await metric(server, 'postbox_writer_process_up') == 1
    assert await metric(server, 'postbox_writer_process_runs_total') > runs
    # Stored once each, gapless; and each delivered live exactly once,
    # those the killed process had committed included.
    await check_stored(server.url, ta, room['id'], acked)
    received = []
    await until(lambda: received.extend(receiver.drain('message')) or
                len(received) >= len(acked), 30, 'live deliveries')
    ids = sorted(m['id'] for m in received)
    assert ids == sorted(acked.values())
    await receiver.nothing('message', 0.5)
    for c in senders + [receiver]:
        await c.close()
    assert 'writer process' in server.read_log()
    assert server.stop() == 0
    assert writer_processes_gone(first)


def writer_processes_gone(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_writer_process_ends_with_the_server(tmp_path, stop_later):
    server = ServerProcess(tmp_path, env=FAST).start()
    stop_later(server)
    ta, tb, room = await setup_room(server.url)
    (child,) = writer_processes(server.pid)
    assert server.stop() == 0  # SIGTERM: the server closes it
    await until(lambda: writer_processes_gone(child), 10, 'its end')
    server.start()
    (child,) = writer_processes(server.pid)
    server.kill()  # SIGKILL of the server alone: the child sees the pipe
    await until(lambda: writer_processes_gone(child), 10, 'its end')


class _Item(NamedTuple):
    ctx: object
    value: int


def _double(items):
    return [(item.value * 2, True) for item in items]


# A portable operation for the tests below: the writer process imports
# this module and runs it, as it runs the batched send (``child_finds_tests``
# lets it find this module, which an installed server would not).
_double_op = Batched.in_writer_process(lambda results, since: results)(
    _double)


def test_hung_writer_process_is_killed(child, monkeypatch):
    """A writer process that stops answering (here SIGSTOP) fails the run
    as lost after ANSWER_SECONDS and is killed; the writer thread then runs
    the sends itself until it may start a new one."""
    assert child.run(_double_op, [_Item(None, 3), _Item(None, 4)],
                     ctx=None) == [((6, True), None), ((8, True), None)]
    (pid,) = writer_processes(os.getpid())
    monkeypatch.setattr(writer_process, 'ANSWER_SECONDS', 1.0)
    os.kill(pid, signal.SIGSTOP)
    # A run bigger than the socket's buffers: even its sending must
    # not wait past the limit.
    big = [_Item(None, 'x' * 4096 * n) for n in range(1, 200)]
    with pytest.raises(ProcessLost) as lost:
        child.run(_double_op, big, ctx=None)
    assert lost.value.prepared is None  # it never got that far
    assert writer_processes_gone(pid) or _zombie(pid)
    assert not child.up and child.failures == 1
    # Not started again at once: the writer thread has the sends.
    assert child.run(_double_op, [_Item(None, 1)], ctx=None) is None


def test_an_answer_the_parent_does_not_know_is_a_lost_child(
        child, monkeypatch):
    """A reply the parent cannot read as an answer fails the run as lost
    (the child stopped, the writer thread takes the sends, with what the
    child had prepared) instead of escaping as an error that would trip
    the breaker and refuse every write."""
    real_recv = writer_process.Channel.recv

    def recv(channel, timeout=None):
        real_recv(channel, timeout)  # the child's real 'committed'
        return ('committed?',)

    monkeypatch.setattr(writer_process.Channel, 'recv', recv)
    with pytest.raises(ProcessLost) as lost:
        child.run(_double_op, [_Item(None, 3), _Item(None, 4)], ctx=None)
    # It had committed: its prepared outcomes come from the memory
    # file it shares with the parent.
    assert lost.value.prepared == [((6, True), None), ((8, True), None)]
    assert not child.up and child.failures == 1


def _zombie(pid) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def test_a_lost_run_redone_answers_its_own_messages_as_new():
    """The writer process prepared a run, committed it and died before
    saying so; the writer thread ran it again and found the messages
    stored. Those the process had made are this run's own: the first send
    of each is new (delivered live); a client's retry of an older message,
    and a second send of the same message, stay retries."""
    def message(id, seq):
        return {'id': id, 'room_id': 1, 'seq': seq,
                'created_at': f'2026-12-03T10:00:0{seq}.000Z'}

    mine, older, new = message(7, 3), message(5, 1), message(8, 4)
    # Stored by another process under the id the lost run had rolled back.
    other = message(9, 6)
    mine_id_reused = message(9, 5)
    refused = Forbidden('no')
    def made(message, created, members=None):
        return message, created, members  # None: a dm's, or a retry's

    # The process read mine's group members with it; the thread's run
    # found it stored (a retry: no members read).
    members = (1, 2, 3)
    prepared = [(made(mine, True, members), None),
                (made(older, False), None), (None, refused),
                (made(mine, False), None), (made(new, True), None),
                (made(mine_id_reused, True), None)]
    results = [('f1', made(mine, False), None),
               ('f2', made(older, False), None), ('f3', None, refused),
               ('f4', made(mine, False), None), ('f5', made(new, True), None),
               ('f6', made(other, False), None)]
    assert _redone(results, prepared) == [
        ('f1', made(mine, True, members), None),
        ('f2', made(older, False), None), ('f3', None, refused),
        ('f4', made(mine, False), None), ('f5', made(new, True), None),
        ('f6', made(other, False), None)]


def test_refusals_cross_the_pipe_whole():
    """A refusal from the writer process reaches the client as it was
    raised: code, message and extra fields (retry_after)."""
    for error in (Forbidden('this user does not accept your messages'),
                  RateLimited(1.25)):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error)
        assert back.to_dict() == error.to_dict()
        assert str(back) == str(error)
    assert pickle.loads(pickle.dumps(RateLimited(2))).retry_after == 2


def test_a_server_that_exits_without_closing_its_store_does_not_hang(
        tmp_path):
    """The writer process ignores SIGTERM (the group's signal is for its
    parent), so an exit that skipped Store.close must still end it."""
    env = {'POSTBOX_DATA_DIR': str(tmp_path)}
    script = (
        'import sys, time; sys.path.insert(0, ".")\n'
        'from server.config import load_config\n'
        'from server.writer_process import WriterProcess\n'
        f'config = load_config(env={env!r})\n'
        'process = WriterProcess(config.effective_database_url, config)\n'
        'process.start()\n'
        'time.sleep(1)\n'
        'print(process._process.pid, flush=True)\n')
    done = subprocess.run([sys.executable, '-c', script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not writer_processes_gone(child):
        assert time.monotonic() < deadline, 'writer process left running'
        time.sleep(0.05)


def test_a_batch_splits_into_at_most_four_commits_and_only_sends_move():
    """Sends interleaved with other writes (read markers, say) commit in at
    most four transactions per batch, in queue order, and only runs of one
    portable operation go to the writer process: the mixed rest is
    committed by the writer thread."""
    def other():
        pass

    ops = {'S': _double_op, 'M': other}

    def split(pattern):
        batch = [(ops[c], (), None) for c in pattern]
        return [(in_process, ''.join('S' if fn is _double_op else 'M'
                                     for fn, _, _ in items))
                for in_process, items in _segments(batch)]

    assert split('SSS') == [(True, 'SSS')]
    assert split('SSMSS') == [(True, 'SS'), (False, 'M'), (True, 'SS')]
    assert split('SMSMSMSMS') == [(True, 'S'), (False, 'M'), (True, 'S'),
                                  (False, 'MSMSMS')]
    assert split('MSMSMSMS') == [(False, 'M'), (True, 'S'), (False, 'M'),
                                 (False, 'SMSMS')]


def test_a_child_that_fails_for_no_database_reason_hands_over(child):
    """A run that fails in the child for a reason of its own (a bug, code
    changed on disk under a running server) is not a database fault: the
    child is stopped and the writer thread takes the sends, instead of
    every send being refused as if the database were down."""
    def not_in_the_child(items):  # the child cannot find it by name
        return [(None, True) for _ in items]

    unknown = Batched.in_writer_process(lambda results, prepared: results)(
        not_in_the_child)
    with pytest.raises(ProcessLost) as lost:
        child.run(unknown, [_Item(None, 1)], ctx=None)
    assert lost.value.prepared is None
    assert not child.up and child.failures == 1
    assert child.run(_double_op, [_Item(None, 1)], ctx=None) is None


async def test_writer_process_ignores_the_current_directory(tmp_path,
                                                            stop_later):
    """Started from a directory with its own ``models.py``, the server and
    its writer process import their own modules."""
    here = tmp_path / 'elsewhere'
    here.mkdir()
    (here / 'models.py').write_text(
        "raise SystemExit('imported the wrong models')\n")
    server = ServerProcess(tmp_path / 'data',
                           env={**FAST, 'PYTHONPATH': str(ROOT)})
    server.argv = [sys.executable, '-P', '-m', 'server']
    server.cwd = here
    server.start()
    stop_later(server)
    ta, tb, room = await setup_room(server.url)
    sender = await connect(server.url, ta)
    for n in range(5):
        ack = await sender.call('send_dm', {
            'room_id': room['id'], 'body': f'hi {n}',
            'client_msg_id': f'm{n}'})
        assert ack['ok'], ack
    await sender.close()
    assert await metric(server, 'postbox_writer_process_runs_total') >= 5
    assert await metric(server, 'postbox_writer_process_failures_total') == 0
    assert 'wrong models' not in server.read_log()
    assert server.stop() == 0


async def test_a_run_lost_after_its_commit_is_answered_as_new(
        tmp_path, monkeypatch):
    """The writer process commits a run of sends and dies before saying
    so: the writer thread runs them again, finds them stored, and answers
    them as new (so they are delivered live), each stored once."""
    from models import Message, User
    from server.data.database import open_database
    from server.services import messages, rooms
    from server.services.context import Context
    from server.services.live import Typing
    from server.store import Store

    config = load_config(env={'POSTBOX_DATA_DIR': str(tmp_path)})
    url = config.effective_database_url
    process = WriterProcess(url, config)
    store = Store(open_database(url, config), process=process)
    store.start()
    ctx = Context(store, config, 'x' * 32, typing=Typing(2.0))
    try:
        def people():
            return [User.create(username=f'user{i}', display_name='x',
                                created_at=0).id for i in range(2)]
        alice, _ = await store.write(people)
        room, _ = await rooms.open_dm(ctx, alice, 'user1')
        first = await messages.send_message(ctx, alice, 'before', 'c0',
                                            room_id=room['id'])
        assert first.created and process.runs >= 1

        # The child's word after its COMMIT never arrives: it is killed
        # once that word is on its way (so the COMMIT has happened).
        real_recv = writer_process.Channel.recv

        def recv(channel, timeout=None):
            answer = real_recv(channel, timeout)
            if answer[0] == 'committed':
                process._process.kill()
                raise EOFError('the writer process died')
            return answer

        monkeypatch.setattr(writer_process.Channel, 'recv', recv)
        sent = await messages.send_message(ctx, alice, 'lost', 'c1',
                                           room_id=room['id'])
        assert process.failures == 1
        assert sent.created  # delivered live, not taken for a retry
        assert sent.message['body'] == 'lost' and sent.message['seq'] == 2
        stored = await store.read(lambda: [
            (m.client_msg_id, m.seq) for m in Message.select().order_by(
                Message.seq)])
        assert stored == [('c0', 1), ('c1', 2)]
        # A real retry of it afterwards is a retry.
        again = await messages.send_message(ctx, alice, 'lost', 'c1',
                                            room_id=room['id'])
        assert not again.created and again.message['id'] == \
            sent.message['id']
    finally:
        await store.close()
