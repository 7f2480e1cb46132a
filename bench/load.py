"""The load generator: user pairs exchanging DMs, idle connections, and a
group fan-out, against Postbox or a bare relay (``relay_server.py``,
``node_relay/relay.js``), over loopback only.

The clients speak Socket.IO v5 / Engine.IO v4 over websocket directly
(``RawClient`` of the test kit, tests/kit/wire.py): it is the same
wire protocol as ``socketio.AsyncClient`` with a fraction of its CPU per
packet (no task per event, no packet objects), so on a 2-core machine the
generator is less of a bottleneck. It offers per-message deflate like a
browser does, so each server compresses or not as its own settings say.

Load runs in worker processes (``--workers``, default 2); each worker owns
whole pairs, so a sender and its partner share one process and one clock
(``time.monotonic`` is system-wide anyway). Every run is bounded in time
(warm-up + duration + a short drain) and in count (``--max-messages``).

Modes
- closed: every user sends to its partner and keeps ``--window`` messages
  in flight (sent, not yet delivered to the partner): maximum throughput.
- open: a fixed total arrival rate (``--rate`` msg/s) spread over all
  senders; latency = receive time - scheduled send time (so a server that
  falls behind is charged for the wait: no coordinated omission).
- idle (``idle_memory``): N idle websocket clients, server RSS growth / N.
- fanout (``fanout``): one group, many members connected, a few senders.

Server CPU is read from ``/proc/<pid>/stat`` (utime + stime, all threads,
and the same of its child processes: Postbox's writer process) just before
and after the measured window.

Run alone: ``python bench/load.py --url http://127.0.0.1:8080 --kind postbox
--pairs 50 --mode closed --duration 10 --server-pid PID``.
"""
import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import string
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kit.wire import (  # noqa: E402,F401 (bench scripts use load.*)
    CallError, FastReceiver, RawClient, new_session)

CLK_TCK = os.sysconf('SC_CLK_TCK')
PAGE = os.sysconf('SC_PAGE_SIZE')


# --------------------------------------------------------------------------
# OS measurements

def _stat_cpu_seconds(path) -> float:
    """utime + stime, in seconds, from a /proc ``stat`` file (a process's
    or one thread's)."""
    with open(path) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    # Fields after the command: state is [0], utime [11], stime [12].
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_seconds(pid) -> float:
    """utime + stime of a process (all its threads) and of its live
    descendants (Postbox's writer process), in seconds; of all of them
    summed for a list of pids (several servers and Redis)."""
    if isinstance(pid, (list, tuple)):
        return sum(proc_cpu_seconds(p) for p in pid)
    return _stat_cpu_seconds(f'/proc/{pid}/stat') + _children_cpu(pid)


def _children_cpu(pid) -> float:
    return sum(_cpu_or_zero(child) for child in child_pids(pid))


def child_pids(pid) -> list:
    """The process's children, from every thread's children list."""
    found = []
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children') as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:  # gone meanwhile
        pass
    return found


def _cpu_or_zero(pid) -> float:
    try:
        return proc_cpu_seconds(pid)
    except OSError:  # ended meanwhile
        return 0.0


def cpu_parts(server_pids, redis_pids=()) -> dict:
    """CPU seconds so far by part, summed over the servers: their event
    loops (main threads), their other threads, their child processes
    (Postbox's writer process), and ``redis_pids``."""
    loops = main_thread_cpu_seconds(list(server_pids))
    own = sum(_stat_cpu_seconds(f'/proc/{pid}/stat') for pid in server_pids)
    return {'event loop': loops, 'other threads': own - loops,
            'writer process': sum(map(_children_cpu, server_pids)),
            'redis': sum(_cpu_or_zero(pid) for pid in redis_pids)}


def main_thread_cpu_seconds(pid) -> float:
    """utime + stime of the process's main thread (the event loop for
    Postbox and the python relay), from /proc/<pid>/task/<pid>/stat."""
    if isinstance(pid, (list, tuple)):
        return sum(main_thread_cpu_seconds(p) for p in pid)
    try:
        return _stat_cpu_seconds(f'/proc/{pid}/task/{pid}/stat')
    except OSError:
        return 0.0


def proc_rss_bytes(pid) -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return 0


def wait_idle(pid, threshold=0.05, interval=0.5, timeout=120.0) -> float:
    """Wait until the server uses under ``threshold`` of a core (it has
    worked off the backlog of the previous run: after an overloaded open
    loop that can take a while), at most ``timeout`` seconds. Returns the
    seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c0 = proc_cpu_seconds(pid)
        time.sleep(interval)
        if (proc_cpu_seconds(pid) - c0) / interval < threshold:
            break
    return time.monotonic() - start


def ab_parser(description, command):
    """The arguments the same-run A/B scripts share (``bench/push.py``,
    ``bench/recovery.py``); the caller adds its own and calls
    ``ab_args``."""
    p = argparse.ArgumentParser(description=description)
    p.set_defaults(command=command)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--repeats', type=int, help='5 (with --quick: 3)')
    p.add_argument('--duration', type=float,
                   help='seconds measured per run: 5 (with --quick: 3)')
    p.add_argument('--warmup', type=float, default=1.0)
    p.add_argument('--pairs', type=int, default=50)
    p.add_argument('--window', type=int, default=4)
    p.add_argument('--rate', type=float, default=0.0,
                   help='open loop at this many msg/s for the CPU A/B '
                        '(the same for each variant, so that write batches '
                        'are alike even when the machine is busy); 0: '
                        'closed loop')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--pin', action='store_true')
    p.add_argument('--note', default='')
    p.add_argument('--no-report', action='store_true')
    return p


def ab_args(parser, argv):
    """Parse ``argv``; ``--quick`` shortens what was not given (3 repeats
    of 3 s instead of 5 of 5 s)."""
    args = parser.parse_args(argv)
    args.argv = list(argv)
    for key, full, quick in (('repeats', 5, 3), ('duration', 5.0, 3.0)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def raise_nofile(want=65536) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


# --------------------------------------------------------------------------
# The clients: the test kit's raw Socket.IO client (tests/kit/wire.py)

async def gather_limited(coros, limit=64):
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))


# --------------------------------------------------------------------------
# Accounts: Postbox users are bot accounts of one registered owner (one
# argon2 hash instead of thousands); relay users are just names.

async def make_users(url, kind, count, prefix=None):
    """Returns [(username, token)] for ``count`` fresh users."""
    prefix = prefix or 'b' + uuid.uuid4().hex[:8]
    names = [f'{prefix}_{i}' for i in range(count)]
    if kind != 'postbox':
        return [(n, n) for n in names]
    async with new_session() as session:
        async with session.post(url + '/api/register', json={
                'username': prefix + '_owner',
                'password': 'bench-password'}) as resp:
            data = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f'register: {resp.status} {data}')
            owner_token = data['token']

        async def bot(name):
            for attempt in range(5):
                async with session.post(
                        url + '/api/bots', json={'username': name},
                        headers={'Authorization': 'Bearer ' + owner_token}
                ) as resp:
                    data = await resp.json()
                    if resp.status == 201:
                        return name, data['token']
                    if resp.status != 429:
                        raise RuntimeError(f'bot: {resp.status} {data}')
                await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError(f'bot {name}: rate limited')
        return await gather_limited([bot(n) for n in names], 32)


def make_body(size):
    return ''.join(random.choices(string.ascii_letters + ' ', k=size))


# --------------------------------------------------------------------------
# Worker processes

class Stats:
    def __init__(self, start, end):
        self.start, self.end = start, end  # the measured window (monotonic)
        self.delivered = 0  # partner deliveries received inside the window
        self.latencies = []  # seconds, of those deliveries
        self.sent = 0
        self.sent_in_window = 0
        self.errors = 0
        self.first_error = None
        self.echoes = 0  # the sender's own copy (Postbox sends it)

    def delivery(self, now, sent_at):
        if self.start <= now <= self.end:
            self.delivered += 1
            self.latencies.append(now - sent_at)

    def result(self):
        return {'delivered': self.delivered, 'latencies': self.latencies,
                'sent': self.sent, 'sent_in_window': self.sent_in_window,
                'errors': self.errors, 'first_error': self.first_error,
                'echoes': self.echoes}


async def _connect_all(session, url, tokens, deflate, **handlers):
    # A list of urls: client i connects to url i mod n (a DM pair's two
    # users, adjacent in ``tokens``, to two different processes).
    urls = url if isinstance(url, list) else [url]
    clients = [RawClient(session, urls[i % len(urls)], t, deflate, **handlers)
               for i, t in enumerate(tokens)]
    await gather_limited([c.connect() for c in clients], 64)
    return clients


async def _dm_worker(conn, spec):
    """Pairs exchanging DMs, closed or open loop."""
    pairs = spec['pairs']  # [(name_a, token_a, name_b, token_b)]
    body = make_body(spec['body_size'])
    run_id = uuid.uuid4().hex[:12]
    async with new_session() as session:
        users = []  # index -> dict(client, room_id, partner index, window)
        for a, ta, b, tb in pairs:
            users.append({'name': a, 'token': ta})
            users.append({'name': b, 'token': tb})
        stats = None

        def on_event(client, event, payload):
            if event != 'message':
                return
            now = time.monotonic()
            head = payload['body'].split(' ', 2)
            sender = int(head[1])
            if sender == client.index:
                stats.echoes += 1
                return
            stats.delivery(now, float(head[0]))
            window = users[sender].get('window')
            if window is not None:
                window.release()

        clients = await _connect_all(session, spec['url'],
                                     [u['token'] for u in users],
                                     spec['deflate'], on_event=on_event,
                                     auth=spec.get('auth'))
        for i, (user, client) in enumerate(zip(users, clients)):
            user['client'] = client
            client.index = i
        for i in range(0, len(users), 2):
            room = (await clients[i].call(
                'open_dm', {'username': users[i + 1]['name']}))['room']
            users[i]['room_id'] = users[i + 1]['room_id'] = room['id']
        conn.send('ready')
        t0 = conn.recv()
        warm, duration = spec['warmup'], spec['duration']
        stats = Stats(t0 + warm, t0 + warm + duration)
        stop_at = t0 + warm + duration
        max_messages = spec['max_messages']

        def on_ack(user):
            def handler(ack_id, response):
                if not response.get('ok'):
                    stats.errors += 1
                    stats.first_error = stats.first_error or response
                    user['window'].release()
            return handler

        async def send(i):
            user = users[i]
            now = time.monotonic()
            stats.sent += 1
            if stats.start <= now <= stats.end:
                stats.sent_in_window += 1
            await user['client'].emit('send_dm', {
                'room_id': user['room_id'],
                'body': f'{user.get("due", now):.6f} {i} {body}',
                # Unique per run: the same users run again, and Postbox
                # treats a repeated client_msg_id as a retry (no delivery).
                'client_msg_id': f'{run_id}-{i}-{stats.sent}'})

        async def closed_sender(i):
            window = users[i]['window'] = asyncio.Semaphore(spec['window'])
            users[i]['client'].ack_handler = on_ack(users[i])
            while time.monotonic() < stop_at and stats.sent < max_messages:
                await window.acquire()
                await send(i)

        async def open_scheduler():
            rate = spec['rate']
            n = len(users)
            def on_ack(ack_id, response):
                if not response.get('ok'):
                    stats.errors += 1
                    stats.first_error = stats.first_error or response
            for u in users:
                u['client'].ack_handler = on_ack
            k = 0
            while stats.sent < max_messages:
                now = time.monotonic()
                if now >= stop_at:
                    break
                due_count = int((now - t0) * rate) - k
                for _ in range(min(due_count, 1000)):
                    i = k % n
                    users[i]['due'] = t0 + k / rate
                    k += 1
                    await send(i)
                await asyncio.sleep(0.001)

        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0 = time.process_time()
        if spec['mode'] == 'closed':
            tasks = [closed_sender(i) for i in range(len(users))]
        else:
            tasks = [open_scheduler()]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks),
                                   warm + duration + 10)
        except asyncio.TimeoutError:
            pass
        # Let what is in flight arrive (not counted: outside the window),
        # so every run ends with a server that is idle again.
        gen_cpu = time.process_time() - cpu0
        gen_wall = time.monotonic() - t0
        await asyncio.sleep(min(2.0, max(0.2, spec['drain'])))
        result = stats.result()
        result['gen_cpu'] = gen_cpu
        result['gen_wall'] = gen_wall
        await asyncio.gather(*(c.close() for c in clients))
        conn.send(result)


async def _idle_worker(conn, spec):
    async with new_session() as session:
        clients = await _connect_all(session, spec['url'], spec['tokens'],
                                     spec['deflate'])
        conn.send(('ready', len(clients)))
        conn.recv()  # stop
        await gather_limited([c.close() for c in clients], 256)
        conn.send('closed')


async def _fanout_worker(conn, spec, done):
    """Group members that count deliveries and time them; the senders (in
    worker 0) keep ``window`` messages in flight, where a message leaves
    the window when every member in every worker has it. ``done`` is shared
    memory: ``done[w * senders + s]`` is the highest message number of
    sender ``s`` that all of worker ``w``'s members have received."""
    n_senders = spec['n_senders']
    n_workers = spec['n_workers']
    me = spec['index']
    members = len(spec['tokens'])
    pending = {}  # (sender, n) -> members of this worker that have it
    stats = None
    latencies = []
    counted = {'n': 0}

    def on_raw(client, text):
        # '42["message",{..."body":"<t> <sender> <n> ..."...}]': the body
        # is found without decoding the whole packet, to keep the
        # generator cheap per delivery.
        if not text.startswith('42["message"'):
            return
        now = time.monotonic()
        i = text.index('"body":') + 7
        head = text[i:i + 72].lstrip(' "').split(' ', 3)
        sender, n = int(head[1]), int(head[2])
        if stats is not None and stats.start <= now <= stats.end:
            counted['n'] += 1
            latencies.append(now - float(head[0]))
        key = (sender, n)
        got = pending.get(key, 0) + 1
        if got >= members:
            pending.pop(key, None)
            slot = me * n_senders + sender
            if n > done[slot]:
                done[slot] = n
        else:
            pending[key] = got

    async with new_session() as session:
        clients = [FastReceiver(spec['url'], t, spec['deflate'], on_raw)
                   for t in spec['tokens']]
        await gather_limited([c.connect() for c in clients], 64)
        senders = await _connect_all(session, spec['url'],
                                     spec.get('senders', []), spec['deflate'])
        conn.send('ready')
        t0 = conn.recv()
        warm, duration = spec['warmup'], spec['duration']
        stats = Stats(t0 + warm, t0 + warm + duration)
        stop_at = t0 + warm + duration
        body = make_body(spec['body_size'])

        async def sender(s, client):
            def on_ack(ack_id, response):
                if not response.get('ok'):
                    stats.errors += 1
                    stats.first_error = stats.first_error or response
            client.ack_handler = on_ack
            n = 0
            while time.monotonic() < stop_at and \
                    stats.sent < spec['max_messages']:
                delivered = min(done[w * n_senders + s]
                                for w in range(n_workers))
                if n - delivered >= spec['window']:
                    await asyncio.sleep(0.0005)
                    continue
                n += 1
                stats.sent += 1
                await client.emit('send_dm', {
                    'room_id': spec['room_id'],
                    'body': f'{time.monotonic():.6f} {s} {n} {body}',
                    'client_msg_id': f'f{s}-{n}-{uuid.uuid4().hex[:8]}'})

        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0 = time.process_time()
        tasks = [sender(s, c) for s, c in enumerate(senders)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks),
                                   warm + duration + 10)
        except asyncio.TimeoutError:
            pass
        remaining = stop_at - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
        gen_cpu = time.process_time() - cpu0
        await asyncio.sleep(1.0)
        result = {'member_deliveries': counted['n'], 'latencies': latencies,
                  'sent': stats.sent, 'errors': stats.errors,
                  'first_error': stats.first_error, 'gen_cpu': gen_cpu}
        await gather_limited([c.close() for c in clients + senders], 256)
        conn.send(result)


def worker_main(conn, spec, *extra):
    """Entry point of a worker process."""
    raise_nofile()
    if spec.get('cpu') is not None:
        try:
            os.sched_setaffinity(0, {spec['cpu']})
        except OSError:
            pass
    fn = {'dm': _dm_worker, 'idle': _idle_worker,
          'fanout': _fanout_worker}[spec['kind_of_work']]
    try:
        asyncio.run(fn(conn, spec, *extra))
    except Exception as exc:  # report it to the orchestrator, not a hang
        conn.send({'error': f'{type(exc).__name__}: {exc}'})
        raise


class Workers:
    """Worker processes with a pipe each; every wait has a timeout."""

    def __init__(self, specs, timeout=120, extra=()):
        ctx = multiprocessing.get_context('spawn')
        self.timeout = timeout
        self.conns, self.procs = [], []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main,
                               args=(child, spec) + tuple(extra),
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def recv_all(self, timeout=None):
        out = []
        deadline = time.monotonic() + (timeout or self.timeout)
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.kill()
                raise RuntimeError('a load worker did not answer in time')
            msg = conn.recv()
            if isinstance(msg, dict) and 'error' in msg:
                self.kill()
                raise RuntimeError('load worker failed: ' + msg['error'])
            out.append(msg)
        return out

    def send_all(self, msg):
        for conn in self.conns:
            conn.send(msg)

    def join(self):
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()

    def kill(self):
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()


def _cpu_for(index, pin):
    # With --pin, the server has CPU 0 and the generators CPU 1.
    return (1 if os.cpu_count() > 1 else 0) if pin else None


# --------------------------------------------------------------------------
# Scenarios, as functions the orchestrator (run.py) calls

def run_dm(url, kind, server_pid, pairs=50, mode='closed', window=4,
           rate=1000.0, duration=10.0, warmup=1.0, workers=2, body_size=100,
           deflate=True, max_messages=2_000_000, pin=False, users=None,
           auth=None, redis_pids=()):
    """N pairs exchanging DMs. Returns a dict: delivered/s, latency
    percentiles (ms), server CPU s per 1000 deliveries and µs/message,
    and that CPU split by part (``parts_us_per_msg``). ``auth``: more
    CONNECT auth fields for every client. ``redis_pids``: Redis servers
    whose CPU counts too (their own part)."""
    server_pids = list(server_pid) if isinstance(server_pid, (list, tuple)) \
        else [server_pid]
    if users is None:
        users = asyncio.run(make_users(url, kind, 2 * pairs))
    pair_list = [(users[2 * i][0], users[2 * i][1],
                  users[2 * i + 1][0], users[2 * i + 1][1])
                 for i in range(pairs)]
    workers = max(1, min(workers, pairs))
    idle_wait = wait_idle(server_pids + list(redis_pids))
    specs = []
    for w in range(workers):
        specs.append({
            'kind_of_work': 'dm', 'url': url, 'pairs': pair_list[w::workers],
            'mode': mode, 'window': window, 'rate': rate / workers,
            'duration': duration, 'warmup': warmup, 'drain': 2.0,
            'body_size': body_size, 'deflate': deflate,
            'max_messages': max_messages // workers, 'cpu': _cpu_for(w, pin),
            'auth': auth})
    pool = Workers(specs, timeout=120 + pairs)
    try:
        pool.recv_all()
        t0 = time.monotonic() + 0.5
        pool.send_all(t0)
        start, end = t0 + warmup, t0 + warmup + duration
        time.sleep(max(0.0, start - time.monotonic()))
        parts0 = cpu_parts(server_pids, redis_pids)
        time.sleep(max(0.0, end - time.monotonic()))
        parts1 = cpu_parts(server_pids, redis_pids)
        results = pool.recv_all(timeout=duration + warmup + 60)
    finally:
        pool.join()
    delivered = sum(r['delivered'] for r in results)
    parts = {name: parts1[name] - parts0[name] for name in parts0}
    main_cpu = parts['event loop']
    latencies = [x for r in results for x in r['latencies']]
    cpu = sum(parts.values())
    out = {
        'kind': kind, 'mode': mode, 'pairs': pairs, 'window': window,
        'offered': rate if mode == 'open' else None,
        'duration': duration,
        'delivered': delivered,
        'rate': delivered / duration,
        'sent_rate': sum(r['sent_in_window'] for r in results) / duration,
        'p50_ms': _ms(percentile(latencies, 50)),
        'p99_ms': _ms(percentile(latencies, 99)),
        'max_ms': _ms(max(latencies) if latencies else None),
        'server_cpu_s': cpu,
        'server_cpu_util': cpu / duration,
        'cpu_s_per_1000': 1000 * cpu / delivered if delivered else None,
        'cpu_us_per_msg': 1e6 * cpu / delivered if delivered else None,
        # The event loop's thread alone; the rest is the other threads
        # (Postbox: the writer, the readers, the executor).
        'main_thread_us_per_msg': 1e6 * main_cpu / delivered if delivered
        else None,
        'parts_us_per_msg': {name: 1e6 * value / delivered
                             for name, value in parts.items()}
        if delivered else None,
        # Cores' worth of CPU the generator processes used while sending
        # (1.0 = one core busy): near the core count, the load is the limit.
        'gen_cpu_util': sum(r['gen_cpu'] for r in results) /
        max(r['gen_wall'] for r in results),
        'errors': sum(r['errors'] for r in results),
        'first_error': next((r['first_error'] for r in results
                             if r['first_error']), None),
        'echoes': sum(r['echoes'] for r in results),
        'idle_wait_s': round(idle_wait, 1),
    }
    return out


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def run_idle(url, kind, server_pid, count=2000, workers=2, deflate=True,
             settle=2.0, warm=100, pin=False):
    """Open ``count`` idle websocket clients; returns the server's RSS
    growth per connection (bytes), measured after ``warm`` connections so
    one-time allocations are not charged to each connection."""
    raise_nofile(2 * count + 1024)
    users = asyncio.run(make_users(url, kind, count + warm))
    tokens = [t for _, t in users]
    warm_pool = Workers([{'kind_of_work': 'idle', 'url': url,
                          'tokens': tokens[:warm], 'deflate': deflate,
                          'cpu': _cpu_for(0, pin)}])
    try:
        warm_pool.recv_all()
        time.sleep(settle)
        rss0 = proc_rss_bytes(server_pid)
        workers = max(1, workers)
        rest = tokens[warm:]
        pool = Workers([{'kind_of_work': 'idle', 'url': url,
                         'tokens': rest[w::workers], 'deflate': deflate,
                         'cpu': _cpu_for(w, pin)} for w in range(workers)],
                       timeout=120 + count / 50)
        try:
            opened = sum(n for _, n in pool.recv_all())
            time.sleep(settle)
            rss1 = proc_rss_bytes(server_pid)
            pool.send_all('stop')
            pool.recv_all()
        finally:
            pool.join()
        warm_pool.send_all('stop')
        warm_pool.recv_all()
    finally:
        warm_pool.join()
    return {'kind': kind, 'connections': opened, 'rss_before': rss0,
            'rss_after': rss1, 'bytes_per_conn': (rss1 - rss0) / opened}


def run_fanout(url, kind, server_pid, members=1000, senders=2, window=4,
               duration=10.0, warmup=1.0, workers=2, body_size=100,
               deflate=True, max_messages=1_000_000, pin=False):
    """A group of ``members`` users (the senders among them), all
    connected; ``senders`` send to the group, each keeping ``window``
    messages in flight (a message is in flight until every member has it).
    Returns member deliveries per second (the senders' own copies are not
    counted) and the delivery latency over every member."""
    users = asyncio.run(make_users(url, kind, members))
    sender_users = users[:senders]
    others = users[senders:]

    async def create():
        async with new_session() as session:
            client = await RawClient(session, url, sender_users[0][1],
                                     deflate).connect()
            room = (await client.call('create_group', {
                'name': 'bench fan-out',
                'members': [n for n, _ in users[1:]]}, timeout=120))['room']
            await client.close()
            return room
    room = asyncio.run(create())
    wait_idle(server_pid)
    done = multiprocessing.get_context('spawn').Array(
        'q', workers * senders, lock=False)
    specs = []
    for w in range(workers):
        spec = {'kind_of_work': 'fanout', 'url': url, 'index': w,
                'n_workers': workers, 'n_senders': senders,
                'tokens': [t for _, t in others[w::workers]],
                'room_id': room['id'], 'window': window,
                'duration': duration, 'warmup': warmup,
                'body_size': body_size, 'deflate': deflate,
                'max_messages': max_messages, 'cpu': _cpu_for(w, pin)}
        if w == 0:
            spec['senders'] = [t for _, t in sender_users]
        specs.append(spec)
    pool = Workers(specs, timeout=120 + members / 20, extra=(done,))
    try:
        pool.recv_all()
        t0 = time.monotonic() + 0.5
        pool.send_all(t0)
        start, end = t0 + warmup, t0 + warmup + duration
        time.sleep(max(0.0, start - time.monotonic()))
        cpu0 = proc_cpu_seconds(server_pid)
        time.sleep(max(0.0, end - time.monotonic()))
        cpu1 = proc_cpu_seconds(server_pid)
        results = pool.recv_all(timeout=duration + warmup + 60)
    finally:
        pool.join()
    delivered = sum(r['member_deliveries'] for r in results)
    latencies = [x for r in results for x in r['latencies']]
    cpu = cpu1 - cpu0
    return {'kind': kind, 'members': members, 'senders': senders,
            'delivered': delivered, 'rate': delivered / duration,
            'messages_per_s': delivered / len(others) / duration,
            'p50_ms': _ms(percentile(latencies, 50)),
            'p99_ms': _ms(percentile(latencies, 99)),
            'server_cpu_util': cpu / duration,
            'cpu_us_per_delivery': 1e6 * cpu / delivered if delivered
            else None,
            'gen_cpu_util': sum(r['gen_cpu'] for r in results) /
            (duration + warmup),
            'errors': sum(r['errors'] for r in results),
            'first_error': next((r['first_error'] for r in results
                                 if r['first_error']), None)}


def run_sync(url, server_pid, events=10_000, repeats=3, deflate=True):
    """Postbox only: one user misses ``events`` messages in a dm, then a
    fresh socket pages through ``sync``. Returns the seconds per replay."""
    async def go():
        (a, ta), (b, tb) = await make_users(url, 'postbox', 2)
        async with new_session() as session:
            sender = await RawClient(session, url, ta, deflate).connect()
            room = (await sender.call('open_dm', {'username': b}))['room']
            window = asyncio.Semaphore(64)
            failures = []

            def on_ack(ack_id, response):
                if not response.get('ok'):
                    failures.append(response)
                window.release()
            sender.ack_handler = on_ack
            body = make_body(100)
            t = time.monotonic()
            for n in range(events):
                await window.acquire()
                await sender.emit('send_dm', {'room_id': room['id'],
                                              'body': body,
                                              'client_msg_id': f's{n}'})
            for _ in range(64):
                await asyncio.wait_for(window.acquire(), 60)
            fill_seconds = time.monotonic() - t
            if failures:
                raise RuntimeError(f'sync fill failed: {failures[0]}')
            await sender.close()
            times, counts = [], []
            for _ in range(repeats):
                client = await RawClient(session, url, tb, deflate).connect()
                t = time.monotonic()
                known, got, pages = {}, 0, 0
                while pages < 1000:
                    reply = await client.call('sync', {'rooms': known},
                                              timeout=60)
                    pages += 1
                    for event in reply['events']:
                        got += 1
                        key = str(event['room_id'])
                        known[key] = max(known.get(key, 0), event['seq'])
                    if not reply.get('has_more'):
                        break
                times.append(time.monotonic() - t)
                counts.append(got)
                await client.close()
            return {'events': events, 'replayed': counts, 'seconds': times,
                    'pages': pages, 'fill_seconds': fill_seconds}
    return asyncio.run(go())


def main():
    parser = argparse.ArgumentParser(
        description='Postbox bench load generator (one DM run)')
    parser.add_argument('--url', required=True)
    parser.add_argument('--kind', default='postbox',
                        choices=['postbox', 'relay', 'node'])
    parser.add_argument('--server-pid', type=int, required=True)
    parser.add_argument('--pairs', type=int, default=50)
    parser.add_argument('--mode', default='closed', choices=['closed', 'open'])
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--rate', type=float, default=1000.0)
    parser.add_argument('--duration', type=float, default=10.0)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--no-deflate', action='store_true')
    args = parser.parse_args()
    result = run_dm(args.url, args.kind, args.server_pid, pairs=args.pairs,
                    mode=args.mode, window=args.window, rate=args.rate,
                    duration=args.duration, workers=args.workers,
                    deflate=not args.no_deflate)
    for key, value in result.items():
        print(f'{key:>16}: {value}')


if __name__ == '__main__':
    main()
