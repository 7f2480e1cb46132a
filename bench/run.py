"""The Postbox benchmark suite: one command runs every scenario of issue 7.

    python bench/run.py            # full suite (3 repeats each)
    python bench/run.py --quick    # a short pass: 1 repeat, short runs
    python bench/run.py --only dm  # the issue-2 DM benchmark alone

Each scenario starts its servers itself, as subprocesses on free loopback
ports: Postbox (``python -m server``, temp data dir, SQLite default, one
process), the stock python-socketio relay (``bench/relay_server.py``) and,
when ``node`` and ``npm`` are present, the same relay on Node socket.io
(``bench/node_relay``). Numbers are medians over the repeats with min and
max; ratios are against the stock relay measured in the same invocation.
Writes ``bench/results/report.md``, ``bench/results/load.png`` and the raw
``bench/results/results.json``.

Scenarios (``--only`` takes a comma list):
  dm        closed-loop DM throughput, CPU per message, p50/p99 latency
  latency   open-loop sweep (25/50/75/100% of each server's max): the plot,
            and p99 at half the max
  idle      memory per idle websocket connection
  fanout    a 1,000-member group room, member deliveries per second
  sync      one client catching up on 10,000 missed events (Postbox only)
  redis     Postbox with Redis configured, all recipients local, vs without
  scaleout  CPU per delivered DM: one process, vs two processes (every pair
            split across them) + one Redis, vs two + a 3-primary Redis
            Cluster (CPU of the servers and Redis summed), alternating runs
  recovery  connection state recovery: a 1,000-event replay's server CPU,
            live DM CPU with and without opted-in sockets (bench/recovery.py)
  push      one message to 1,000 offline members' push receivers; the
            outbox's CPU with nobody offline, push on vs off (bench/push.py)
  profile   py-spy of Postbox under the closed-loop DM load (top self time)
"""
import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import load  # noqa: E402
from tests.kit import (Process, RedisProcess, ServerProcess,  # noqa: E402
                       free_port)

RESULTS = BENCH / 'results'
SCENARIOS = ['dm', 'latency', 'idle', 'fanout', 'sync', 'redis', 'scaleout',
             'recovery', 'push', 'profile']
LABELS = {'postbox': 'Postbox', 'relay': 'python-socketio relay',
          'node': 'Node socket.io relay', 'postbox+redis': 'Postbox + Redis'}

# Bench settings for Postbox: lift the abuse limits that a load generator
# on one address would hit (they are per user and per client address), keep
# every durability setting at its default.
POSTBOX_ENV = {
    'POSTBOX_SEND_RATE_PER_SECOND': '1000000',
    'POSTBOX_SEND_BURST': '1000000',
    'POSTBOX_EVENT_RATE_PER_SECOND': '1000000',
    'POSTBOX_EVENT_BURST': '1000000',
    'POSTBOX_MAX_CONNECTIONS_PER_IP': '1000000',
    'POSTBOX_MAX_CONNECTIONS_PER_USER': '1000000',
    'POSTBOX_GROUP_MAX_MEMBERS': '1000',
    'POSTBOX_LOG_LEVEL': 'WARNING',
    'POSTBOX_WORKERS': '1',
    'POSTBOX_SECRET': 'bench-secret-' + 'x' * 40,
}


def node_available() -> bool:
    return bool(shutil.which('node') and shutil.which('npm'))


def ensure_node_relay() -> bool:
    """npm install the Node relay's dependencies once; False when Node is
    missing or the install fails."""
    if not node_available():
        return False
    directory = BENCH / 'node_relay'
    if (directory / 'node_modules' / 'socket.io').is_dir():
        return True
    done = subprocess.run(['npm', 'install', '--no-audit', '--no-fund'],
                          cwd=directory, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=300)
    return done.returncode == 0


def Server(kind, workdir, pin=False, env=None):
    """A server of ``kind`` (postbox, postbox+redis, relay or node) on a
    free loopback port, its data and log in ``workdir``, not started yet
    (``with Server(...) as server`` starts and stops it): the test kit's
    process, ready when Postbox answers /healthz or a relay its Engine.IO
    handshake."""
    port = free_port()
    data = Path(workdir) / f'{kind}-{port}'
    if kind.startswith('postbox'):
        server = ServerProcess(data, env={**POSTBOX_ENV, **(env or {})},
                               port=port, pin=pin, ready_path='/healthz')
    else:
        argv, cwd = {
            'relay': ([sys.executable, BENCH / 'relay_server.py', '--port',
                       port], BENCH),
            'node': (['node', 'relay.js', port], BENCH / 'node_relay')}[kind]
        server = Process(argv, data / 'server.log', cwd=cwd, env=env,
                         port=port, pin=pin,
                         ready_path='/socket.io/?EIO=4&transport=polling')
    server.name = kind
    server.start_timeout = 60
    return server


def Redis(workdir):
    """A redis-server on a free port (``with Redis(dir) as redis``)."""
    return RedisProcess(Path(workdir) / f'redis-{free_port()}')


def postbox_has_redis() -> bool:
    # The settings were declared in config.py, now in defaults.yaml.
    settings = [ROOT / 'server' / name for name in ('config.py',
                                                   'defaults.yaml')]
    return (ROOT / 'server' / 'cluster').is_dir() and any(
        path.exists() and 'redis_url' in path.read_text()
        for path in settings)


# --------------------------------------------------------------------------
# Statistics

def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {'median': statistics.median(values), 'min': min(values),
            'max': max(values), 'n': len(values)}


def fmt(s, digits=0, unit=''):
    if s is None:
        return 'n/a'
    if isinstance(s, (int, float)):
        return f'{s:,.{digits}f}{unit}'
    med = f'{s["median"]:,.{digits}f}'
    if s['n'] == 1:
        return med + unit
    return f'{med}{unit} ({s["min"]:,.{digits}f}-{s["max"]:,.{digits}f})'


def ratio(a, b):
    if not a or not b:
        return None
    return a['median'] / b['median']


# --------------------------------------------------------------------------
# Scenarios

def log(*args):
    print('[bench]', *args, flush=True)


def scenario_dm(args, kinds, results, workdir):
    """Closed-loop DM throughput for each server."""
    out = results.setdefault('dm', {})
    for kind in kinds:
        runs = []
        with Server(kind, workdir, args.pin) as server:
            users = load.asyncio.run(load.make_users(
                server.url, kind, 2 * args.pairs))
            for r in range(args.repeats):
                res = load.run_dm(server.url, kind, server.pid,
                                  pairs=args.pairs, mode='closed',
                                  window=args.window, duration=args.duration,
                                  warmup=args.warmup, workers=args.workers,
                                  deflate=not args.no_deflate, pin=args.pin,
                                  users=users)
                log(f'dm {kind} #{r + 1}: {res["rate"]:,.0f} msg/s, '
                    f'{fmt(res["cpu_us_per_msg"], 0)} us/msg CPU '
                    f'({fmt(res.get("main_thread_us_per_msg"), 0)} on the '
                    f'main thread), '
                    f'p99 {res["p99_ms"]} ms, server CPU '
                    f'{res["server_cpu_util"]:.0%}, gen CPU '
                    f'{res["gen_cpu_util"]:.0%}, errors {res["errors"]}')
                if res['errors']:
                    log('  first error:', res['first_error'])
                runs.append(res)
        out[kind] = runs


def scenario_latency(args, kinds, results, workdir):
    """Open-loop sweep at fractions of each server's closed-loop maximum."""
    out = results.setdefault('latency', {})
    for kind in kinds:
        closed = results.get('dm', {}).get(kind)
        if closed:
            top = statistics.median(r['rate'] for r in closed)
        else:
            top = args.assumed_max
        points = []
        with Server(kind, workdir, args.pin) as server:
            users = load.asyncio.run(load.make_users(
                server.url, kind, 2 * args.pairs))
            for fraction in args.fractions:
                reps = args.repeats if fraction == 0.5 else 1
                for r in range(reps):
                    offered = max(10.0, top * fraction)
                    res = load.run_dm(
                        server.url, kind, server.pid, pairs=args.pairs,
                        mode='open', rate=offered, duration=args.duration,
                        warmup=args.warmup, workers=args.workers,
                        deflate=not args.no_deflate, pin=args.pin,
                        users=users)
                    res['fraction'] = fraction
                    log(f'open {kind} {fraction:.0%} of max: offered '
                        f'{offered:,.0f}/s, delivered {res["rate"]:,.0f}/s, '
                        f'p50 {res["p50_ms"]} ms, p99 {res["p99_ms"]} ms'
                        f' (waited {res["idle_wait_s"]} s for an idle '
                        f'server first)')
                    points.append(res)
        out[kind] = points


def scenario_idle(args, kinds, results, workdir):
    """RSS per idle connection, with clients that offer per-message deflate
    (as browsers do: a server that accepts keeps zlib state per socket)
    and with clients that do not (as python-socketio's client)."""
    out = results.setdefault('idle', {})
    variants = [('deflate', True), ('plain', False)]
    if args.no_deflate:
        variants = [('plain', False)]
    for kind in kinds:
        for variant, deflate in variants:
            runs = []
            for r in range(args.idle_repeats):
                with Server(kind, workdir, args.pin) as server:
                    res = load.run_idle(server.url, kind, server.pid,
                                        count=args.idle_connections,
                                        workers=args.workers,
                                        deflate=deflate, pin=args.pin)
                    log(f'idle {kind} ({variant} clients) #{r + 1}: '
                        f'{res["connections"]} conns, '
                        f'{res["bytes_per_conn"] / 1024:.1f} KB each')
                    runs.append(res)
            out.setdefault(kind, {})[variant] = runs


def scenario_fanout(args, kinds, results, workdir):
    out = results.setdefault('fanout', {})
    for kind in kinds:
        runs = []
        with Server(kind, workdir, args.pin) as server:
            for r in range(args.repeats):
                res = load.run_fanout(server.url, kind, server.pid,
                                      members=args.fanout_members,
                                      senders=args.fanout_senders,
                                      window=args.fanout_window,
                                      duration=args.duration,
                                      warmup=args.warmup,
                                      workers=args.workers,
                                      deflate=not args.no_deflate,
                                      pin=args.pin)
                log(f'fanout {kind} #{r + 1}: {res["rate"]:,.0f} '
                    f'deliveries/s ({res["messages_per_s"]:,.1f} msg/s), '
                    f'p99 {res["p99_ms"]} ms, server CPU '
                    f'{res["server_cpu_util"]:.0%}, gen CPU '
                    f'{res["gen_cpu_util"]:.0%}, errors {res["errors"]}')
                if res['errors']:
                    log('  first error:', res['first_error'])
                runs.append(res)
        out[kind] = runs


def scenario_sync(args, kinds, results, workdir):
    with Server('postbox', workdir, args.pin) as server:
        res = load.run_sync(server.url, server.pid, events=args.sync_events,
                            repeats=args.repeats,
                            deflate=not args.no_deflate)
    log(f'sync: {res["events"]} events replayed in '
        + ', '.join(f'{s:.3f}' for s in res['seconds'])
        + f' s ({res["replayed"]} events, {res["pages"]} pages)')
    results['sync'] = res


def scenario_redis(args, kinds, results, workdir):
    if not postbox_has_redis() or not shutil.which('redis-server'):
        log('redis: not available (no Redis support or no redis-server)')
        results['redis'] = {'available': False}
        return
    # The same server without Redis runs alternately with it, so that the
    # ratio compares runs made under the same machine conditions.
    runs, baseline = [], []
    with Redis(workdir) as redis:
        env = {'POSTBOX_REDIS_URL': f'redis://127.0.0.1:{redis.port}/0'}
        with Server('postbox+redis', workdir, args.pin, env) as server, \
                Server('postbox', workdir, args.pin) as plain:
            users = {s.url: load.asyncio.run(load.make_users(
                s.url, 'postbox', 2 * args.pairs)) for s in (server, plain)}
            for r in range(args.repeats):
                for name, target, out in (('redis', server, runs),
                                          ('no redis', plain, baseline)):
                    res = load.run_dm(
                        target.url, 'postbox', target.pid, pairs=args.pairs,
                        mode='closed', window=args.window,
                        duration=args.duration, warmup=args.warmup,
                        workers=args.workers, deflate=not args.no_deflate,
                        pin=args.pin, users=users[target.url])
                    log(f'{name} #{r + 1}: {res["rate"]:,.0f} msg/s, '
                        f'{fmt(res["cpu_us_per_msg"], 0)} us/msg, p99 '
                        f'{res["p99_ms"]} ms, errors {res["errors"]}')
                    out.append(res)
    results['redis'] = {'available': True, 'runs': runs,
                        'baseline': baseline}


def scenario_scaleout(args, kinds, results, workdir):
    """The same closed-loop DM load on one process, on two processes with
    one Redis and on two with a Redis Cluster, in alternating runs; every
    DM pair has a user on each process, so every message crosses Redis.
    A fourth setup, two processes with one Redis where each pair has both
    users on the same process, tells what crossing costs from what two
    busy processes on shared cores cost anyway. CPU per delivered message
    counts every server process and Redis."""
    if not postbox_has_redis() or not shutil.which('redis-cli') or \
            not shutil.which('redis-server'):
        log('scaleout: not available (no Redis support or no redis-server)')
        results['scaleout'] = {'available': False}
        return
    from tests.kit.redis_cluster import RedisCluster
    workdir = Path(workdir)
    cluster = RedisCluster(workdir / 'cluster', primaries=3, replicas=0)
    setups = {}
    try:
        cluster.start()
        with Redis(workdir) as redis:
            def two(name, url):
                db = workdir / f'{name}.db'
                env = {'POSTBOX_REDIS_URL': url,
                       'POSTBOX_DATABASE_URL': f'sqlite:///{db}'}
                return [Server('postbox+redis', workdir, args.pin, env)
                        for _ in range(2)]
            setups['one process'] = ([Server('postbox', workdir, args.pin)],
                                     [])
            setups['two + redis'] = (
                two('redis', f'redis://127.0.0.1:{redis.port}/0'),
                [redis.proc.pid])
            setups['two + cluster'] = (two('cluster', cluster.url),
                                       [n.proc.pid for n in cluster.nodes])
            # The same servers as "two + redis", each pair on one process.
            setups[LOCAL_PAIRS] = setups['two + redis']
            for name, (servers, _) in setups.items():
                if name != LOCAL_PAIRS:
                    for server in servers:
                        server.start()
            runs = {name: [] for name in setups}
            users = {name: load.asyncio.run(load.make_users(
                servers[0].url, 'postbox', 2 * args.pairs))
                for name, (servers, _) in setups.items()}
            order = list(setups.items())
            for r in range(args.repeats):
                # ABBA: every other round runs the setups in reverse.
                for name, (servers, redis_pids) in (
                        order if r % 2 == 0 else order[::-1]):
                    urls = [s.url for s in servers]
                    if name == LOCAL_PAIRS:
                        # Client i goes to urls[i % 4]: a pair's two users
                        # (adjacent) to the same process.
                        urls = [u for u in urls for _ in range(2)]
                    res = load.run_dm(
                        urls if len(urls) > 1 else urls[0], 'postbox',
                        [s.pid for s in servers], redis_pids=redis_pids,
                        pairs=args.pairs, mode='closed', window=args.window,
                        duration=args.duration, warmup=args.warmup,
                        workers=args.workers, deflate=not args.no_deflate,
                        pin=args.pin, users=users[name])
                    log(f'scaleout {name} #{r + 1}: {res["rate"]:,.0f} '
                        f'msg/s, {fmt(res["cpu_us_per_msg"], 0)} us/msg CPU '
                        f'(all processes: ' + ', '.join(
                            f'{part} {fmt(v, 0)}' for part, v in
                            (res['parts_us_per_msg'] or {}).items()) +
                        f'), p99 {res["p99_ms"]} ms, errors {res["errors"]}')
                    runs[name].append(res)
    finally:
        for name, (servers, _) in setups.items():
            if name != LOCAL_PAIRS:
                for server in servers:
                    server.stop()
        cluster.stop()
    base = [r['cpu_us_per_msg'] for r in runs['one process']]
    ratios = {name: [a['cpu_us_per_msg'] / b for a, b in zip(rs, base)
                     if a['cpu_us_per_msg'] and b]
              for name, rs in runs.items() if name != 'one process'}
    for name, values in ratios.items():
        log(f'scaleout {name}: CPU per message / one process, per '
            f'alternation: {", ".join(f"{v:.2f}" for v in values)}')
    results['scaleout'] = {'available': True, 'runs': runs,
                           'ratios': ratios}


# The scale-out setup whose pairs do not cross Redis.
LOCAL_PAIRS = 'two + redis, pairs on one process'


def _scaleout_parts(runs_by_setup):
    """The report's table of where each setup's CPU per message goes."""
    parts = ['event loop', 'other threads', 'writer process', 'redis']
    lines = ['', 'Where that CPU goes, in us per delivered message (medians; '
             'summed over both processes): the event loops, the servers\' '
             'other threads (the writer thread, the search indexer, the '
             'checkpoint), their writer processes, and Redis. Two processes '
             'on two shared cores with the load generator: what each part '
             'adds is partly its own work (Redis: publish, listen, decode; '
             'the writers: half the batch per commit) and partly the '
             'cost of more busy processes than cores.', '',
             '| setup | ' + ' | '.join(parts) + ' |',
             '|---|' + '---|' * len(parts)]
    rows = []
    for name, runs in runs_by_setup.items():
        split = [r.get('parts_us_per_msg') or {} for r in runs]
        if any(split):  # not in results from before the split was kept
            rows.append(f'| {name} | ' + ' | '.join(
                fmt(summary([s.get(part, 0.0) for s in split]), 0)
                for part in parts) + ' |')
    return lines + rows + [''] if rows else ['']


def scenario_recovery(args, kinds, results, workdir):
    import recovery  # bench/recovery.py (it imports this module)
    recovery.scenario(args, results, workdir)


def scenario_push(args, kinds, results, workdir):
    import push  # bench/push.py (it imports this module)
    push.scenario(args, results, workdir)


def scenario_profile(args, kinds, results, workdir):
    """py-spy (raw collapsed stacks) of Postbox during one closed-loop DM
    run; the top functions by self time go into the report."""
    spy = shutil.which('py-spy')
    if not spy:
        log('profile: py-spy not installed (pip install py-spy)')
        results['profile'] = {'available': False}
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    folded = RESULTS / 'postbox-profile.txt'
    with Server('postbox', workdir, args.pin) as server:
        users = load.asyncio.run(load.make_users(
            server.url, 'postbox', 2 * args.pairs))
        seconds = max(2, int(args.duration))
        spy_proc = subprocess.Popen(
            [spy, 'record', '--pid', str(server.pid), '--duration',
             str(seconds), '--rate', '200', '--format', 'raw', '--threads',
             '--subprocesses', '--nonblocking', '--output', str(folded)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        res = load.run_dm(server.url, 'postbox', server.pid, pairs=args.pairs,
                          mode='closed', window=args.window,
                          duration=seconds, warmup=0.5, workers=args.workers,
                          deflate=not args.no_deflate, pin=args.pin,
                          users=users)
        try:
            _, err = spy_proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            err = b'timeout'
    if spy_proc.returncode != 0 or not folded.exists():
        log('profile: py-spy failed:', err.decode(errors='replace')[-500:])
        results['profile'] = {'available': False}
        return
    folded.write_text(_name_processes(folded.read_text()))
    results['profile'] = {'available': True, 'rate': res['rate'],
                          **summarize_profile(folded)}
    log(f'profile: {results["profile"]["samples"]} samples at '
        f'{res["rate"]:,.0f} msg/s; top self time:')
    for name, share in results['profile']['self'][:15]:
        log(f'  {share:6.1%}  {name}')
    log('  by thread: ' + ', '.join(
        f'{name} {share:.0%}' for name, share in
        results['profile']['threads']))


def _name_processes(text):
    """py-spy names each process by its command line, which holds this
    machine's paths: name them by role instead."""
    def name(match):
        role = ('writer process' if 'writer_process' in match.group(2)
                else 'postbox')
        return f'process {match.group(1)}:"{role}"'
    return re.sub(r'process (\d+):"([^"]*)"', name, text)


def summarize_profile(path, top=25):
    """Self time (leaf frame) and inclusive time per function from
    py-spy's collapsed stacks (``frame;frame;... count`` per line)."""
    self_time = collections.Counter()
    inclusive = collections.Counter()
    threads = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(' ')
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(';')
        total += n
        where = ''
        while frames and frames[0].startswith(('process ', 'thread ')):
            if 'writer process' in frames[0]:  # see _name_processes
                where = 'writer process '
            if frames[0].startswith('thread '):
                # "thread (1234): pb-writer" -> "pb-writer"
                threads[where + frames[0].split(': ', 1)[-1]] += n
            frames = frames[1:]
        if not frames:
            continue
        self_time[_frame(frames[-1])] += n
        for name in set(_frame(f) for f in frames):
            inclusive[name] += n
    total = total or 1
    return {'samples': total,
            'self': [(k, v / total) for k, v in self_time.most_common(top)],
            'inclusive': [(k, v / total)
                          for k, v in inclusive.most_common(top)],
            'inclusive_own': [(k, v / total)
                              for k, v in inclusive.most_common()
                              if _own(k)][:top],
            'threads': [(k, v / total) for k, v in threads.most_common(8)
                        if v]}


def _own(name):
    # Postbox's frames: "fn (server/x.py)", "fn (services/x.py)", ...
    where = name.rsplit(' (', 1)[-1]
    return where.startswith(('server/', 'services/', 'transport/',
                             'models/')) and '__main__' not in where and \
        not name.startswith(('main ', 'serve ', '<module>'))


def _frame(frame):
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(' (')
    where = where.rstrip(')')
    file = where.rsplit(':', 1)[0]
    parts = Path(file).parts
    short = '/'.join(parts[-2:]) if len(parts) >= 2 else file
    return f'{name} ({short})'


# --------------------------------------------------------------------------
# Report

def build_report(args, kinds, results):
    lines = ['# Postbox benchmark report', '',
             f'Generated by `python bench/run.py {" ".join(args.argv)}` on '
             f'{results.get("finished") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.', '',
             f'Machine: {os.cpu_count()} cores, Python '
             f'{sys.version.split()[0]}'
             + (', Node ' + _node_version() if 'node' in kinds else '')
             + f'. Load: {args.pairs} user pairs, {args.workers} generator '
             f'processes, window {args.window} per sender (closed loop), '
             f'{args.duration:g} s measured after {args.warmup:g} s warm-up, '
             f'{args.repeats} repeat(s); per-message deflate offered by the '
             f'clients: {"no" if args.no_deflate else "yes"}; pinned '
             f'(server CPU 0, load CPU 1): {"yes" if args.pin else "no"}.',
             '']
    if getattr(args, 'note', ''):
        lines += ['Note: ' + args.note, '']
    if 'loadavg_start' in results:
        lines += [f'1-minute load average at the start and end of the run: '
                  f'{results["loadavg_start"]:.1f} / '
                  f'{results.get("loadavg_end", 0):.1f} (on {os.cpu_count()} '
                  f'cores: anything else running makes the numbers noisy).',
                  '']
    lines += ['Cells are median (min-max) over the repeats. Server CPU is '
             'utime+stime of the server process and its children (the '
             'writer process) from /proc over the '
             'measured window. Latency is receive time minus send time '
             '(open loop: minus the scheduled send time).', '']
    dm = results.get('dm', {})
    relay = dm.get('relay')
    relay_rate = summary([r['rate'] for r in relay]) if relay else None
    relay_cpu = summary([r['cpu_us_per_msg'] for r in relay]) \
        if relay else None
    if dm:
        lines += ['## Persisted DMs, closed loop (issue 2 / issue 7)', '',
                  '| server | delivered msg/s | vs relay | server CPU us/msg '
                  '| of which main thread | CPU s per 1000 | vs relay | '
                  'p50 ms | p99 ms | server CPU | load CPU | errors |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|']
        for kind in kinds:
            runs = dm.get(kind)
            if not runs:
                continue
            rate = summary([r['rate'] for r in runs])
            cpu = summary([r['cpu_us_per_msg'] for r in runs])
            per1000 = summary([r['cpu_s_per_1000'] for r in runs])
            lines.append(
                f'| {LABELS[kind]} | {fmt(rate)} | '
                f'{fmt(ratio(rate, relay_rate), 2, "x")} | {fmt(cpu)} | '
                f'{fmt(summary([r.get("main_thread_us_per_msg") for r in runs]))} | '
                f'{fmt(per1000, 3)} | {fmt(ratio(cpu, relay_cpu), 2, "x")} | '
                f'{fmt(summary([r["p50_ms"] for r in runs]), 1)} | '
                f'{fmt(summary([r["p99_ms"] for r in runs]), 1)} | '
                f'{fmt(summary([100 * r["server_cpu_util"] for r in runs]), 0, "%")} | '
                f'{fmt(summary([100 * r["gen_cpu_util"] for r in runs]), 0, "%")} | '
                f'{sum(r["errors"] for r in runs)} |')
        lines += ['', 'Postbox also sends each message to the sender\'s own '
                  'socket (the contract); the relays do not. Deliveries '
                  'counted are the partner\'s only.', '']
    latency = results.get('latency', {})
    if latency:
        lines += ['## Open loop: delivered rate and latency vs offered load',
                  '', '![throughput and p99 vs offered load](load.png)', '',
                  '| server | % of max | offered/s | delivered/s | p50 ms | '
                  'p99 ms |', '|---|---|---|---|---|---|']
        for kind in kinds:
            for fraction in args.fractions:
                pts = [p for p in latency.get(kind, [])
                       if p['fraction'] == fraction]
                if not pts:
                    continue
                lines.append(
                    f'| {LABELS[kind]} | {fraction:.0%} | '
                    f'{fmt(summary([p["offered"] for p in pts]))} | '
                    f'{fmt(summary([p["rate"] for p in pts]))} | '
                    f'{fmt(summary([p["p50_ms"] for p in pts]), 1)} | '
                    f'{fmt(summary([p["p99_ms"] for p in pts]), 1)} |')
        lines.append('')
    idle = results.get('idle', {})
    if idle:
        lines += ['## Idle websocket connections', '',
                  'Server RSS growth per connection, measured after 100 '
                  'warm-up connections. "deflate" clients offer '
                  'per-message deflate as browsers do; "plain" ones do not '
                  '(as the python-socketio client).', '',
                  '| server | connections | KB/conn, deflate clients | '
                  'vs relay | KB/conn, plain clients | vs relay |',
                  '|---|---|---|---|---|---|']
        relay_idle = idle.get('relay', {})
        base = {v: summary([r['bytes_per_conn'] / 1024
                            for r in relay_idle.get(v, [])])
                for v in ('deflate', 'plain')}
        for kind in kinds:
            variants = idle.get(kind)
            if not variants:
                continue
            cells = []
            count = 0
            for v in ('deflate', 'plain'):
                runs = variants.get(v, [])
                mem = summary([r['bytes_per_conn'] / 1024 for r in runs])
                count = count or (runs[0]['connections'] if runs else 0)
                cells += [fmt(mem, 1), fmt(ratio(mem, base[v]), 2, 'x')]
            lines.append(f'| {LABELS[kind]} | {count:,} | '
                         + ' | '.join(cells) + ' |')
        lines.append('')
    fan = results.get('fanout', {})
    if fan:
        lines += [f'## Fan-out: one group of {args.fanout_members} members, '
                  f'{args.fanout_senders} sender(s), window '
                  f'{args.fanout_window}', '',
                  '| server | member deliveries/s | messages/s | p99 ms '
                  '(all members) | server CPU | errors |',
                  '|---|---|---|---|---|---|']
        for kind in kinds:
            runs = fan.get(kind)
            if not runs:
                continue
            lines.append(
                f'| {LABELS[kind]} | {fmt(summary([r["rate"] for r in runs]))} | '
                f'{fmt(summary([r["messages_per_s"] for r in runs]), 1)} | '
                f'{fmt(summary([r["p99_ms"] for r in runs]), 1)} | '
                f'{fmt(summary([100 * r["server_cpu_util"] for r in runs]), 0, "%")} | '
                f'{sum(r["errors"] for r in runs)} |')
        lines.append('')
    sync = results.get('sync')
    if sync:
        lines += ['## Catch-up', '',
                  f'`sync` replaying {sync["events"]:,} missed events to one '
                  f'fresh socket, paging until `has_more` is false: '
                  f'{fmt(summary(sync["seconds"]), 3, " s")} '
                  f'({sync["pages"]} pages, events received: '
                  f'{sync["replayed"]}).', '']
    scaleout = results.get('scaleout')
    if scaleout and scaleout.get('available'):
        lines += ['## Two processes: one Redis and a Redis Cluster', '',
                  'Every DM pair has a user on each process, so every '
                  'message crosses Redis, except in the last setup ("pairs '
                  'on one process": the same two servers and Redis, each '
                  'pair on one of them), which shows what two busy '
                  'processes on these shared cores cost without crossing. '
                  'CPU per delivered message sums the servers and Redis '
                  '(all cluster nodes: 3 primaries, no replicas); ratios are '
                  'against one process in the same alternation (every other '
                  'round in reverse order).', '',
                  '| setup | msg/s | us/msg CPU | x one process | p99 ms |',
                  '|---|---|---|---|---|']
        for name, runs in scaleout['runs'].items():
            ratios = scaleout['ratios'].get(name)
            lines.append(
                f'| {name} | {fmt(summary([r["rate"] for r in runs]))} | '
                f'{fmt(summary([r["cpu_us_per_msg"] for r in runs]))} | '
                f'{fmt(summary(ratios), 2) if ratios else "1"} | '
                f'{fmt(summary([r["p99_ms"] for r in runs]), 1)} |')
        lines += _scaleout_parts(scaleout['runs'])
    redis = results.get('redis')
    if redis:
        lines += ['## Redis configured, all recipients local', '']
        if not redis.get('available'):
            lines += ['Not available: the server has no Redis support or '
                      'redis-server is missing.', '']
        else:
            rr = summary([r['rate'] for r in redis['runs']])
            plain = redis.get('baseline') or dm.get('postbox', [])
            base = summary([r['rate'] for r in plain])
            lines += [f'Closed-loop DMs with `POSTBOX_REDIS_URL` set: '
                      f'{fmt(rr)} msg/s, '
                      f'{fmt(summary([r["cpu_us_per_msg"] for r in redis["runs"]]))} '
                      f'us/msg CPU, p99 '
                      f'{fmt(summary([r["p99_ms"] for r in redis["runs"]]), 1)} ms; '
                      f'without Redis, run alternately with it: {fmt(base)} '
                      f'msg/s, '
                      f'{fmt(summary([r["cpu_us_per_msg"] for r in plain]))} '
                      f'us/msg CPU; ratio {fmt(ratio(rr, base), 2, "x")}.',
                      '']
    lines += targets(args, results)
    prof = results.get('profile')
    if prof and prof.get('available'):
        lines += ['## Profile: Postbox under the closed-loop DM load', '',
                  f'py-spy, {prof["samples"]:,} samples at 200 Hz (all '
                  f'threads, idle excluded), while delivering '
                  f'{prof["rate"]:,.0f} msg/s. Share of samples:', '',
                  '| self time | function |', '|---|---|']
        lines += [f'| {share:.1%} | `{name}` |'
                  for name, share in prof['self'][:20]]
        lines += ['', 'Samples by thread: ' + ', '.join(
            f'{name} {share:.0%}' for name, share in prof['threads']) + '. '
            '`run_app (aiohttp/web.py)` as a leaf is time inside the C event '
            'loop (uvloop: polling, socket reads and writes), below any '
            'Python frame.']
        lines += ['', 'Inclusive time, Postbox\'s own functions:', '',
                  '| inclusive | function |', '|---|---|']
        lines += [f'| {share:.1%} | `{name}` |'
                  for name, share in prof['inclusive_own'][:20]]
        lines += ['', 'Raw stacks: `bench/results/postbox-profile.txt` '
                  '(py-spy collapsed format; feed it to a flame graph tool).',
                  '']
    return '\n'.join(lines) + '\n'


def targets(args, results):
    """Issue 7's targets, each with the measured median and met or not."""
    dm = results.get('dm', {})

    def med(runs, key):
        s = summary([r[key] for r in runs or []])
        return s['median'] if s else None
    rows = []
    pb, relay, node = dm.get('postbox'), dm.get('relay'), dm.get('node')
    if pb and relay:
        r = med(pb, 'rate') / med(relay, 'rate')
        rows.append(('DM throughput >= 1.0x stock relay', f'{r:.2f}x',
                     r >= 1.0))
        c = med(pb, 'cpu_us_per_msg') / med(relay, 'cpu_us_per_msg')
        rows.append(('server CPU per DM <= 1.0x stock relay', f'{c:.2f}x',
                     c <= 1.0))
    if pb and node:
        r = med(pb, 'rate') / med(node, 'rate')
        rows.append(('DM throughput >= 0.5x Node relay', f'{r:.2f}x',
                     r >= 0.5))
    half = [p for p in results.get('latency', {}).get('postbox', [])
            if p['fraction'] == 0.5]
    if half:
        p99 = med(half, 'p99_ms')
        rows.append(('p99 at half max rate <= 25 ms', f'{p99:.1f} ms',
                     p99 <= 25))
    idle_variants = results.get('idle', {}).get('postbox', {})
    idle = idle_variants.get('deflate') or idle_variants.get('plain')
    if idle:
        kb = max(med(runs, 'bytes_per_conn')
                 for runs in idle_variants.values() if runs) / 1024
        n = idle[0]['connections']
        rows.append((f'idle connection <= 20 KB (measured at {n:,})',
                     f'{kb:.1f} KB', kb <= 20))
    fan = results.get('fanout', {}).get('postbox')
    if fan:
        rate = med(fan, 'rate')
        rows.append(('1,000-member fan-out >= 20,000 deliveries/s',
                     f'{rate:,.0f}/s', rate >= 20000))
    sync = results.get('sync')
    if sync:
        s = statistics.median(sync['seconds'])
        ok = s < 1 and min(sync['replayed']) >= sync['events']
        rows.append((f'sync of {sync["events"]:,} events < 1 s',
                     f'{s:.3f} s', ok))
    redis = results.get('redis')
    if redis and redis.get('available') and (redis.get('baseline') or pb):
        r = med(redis['runs'], 'rate') / med(redis.get('baseline') or pb,
                                              'rate')
        rows.append(('Redis, all local >= 0.9x single process', f'{r:.2f}x',
                     r >= 0.9))
    elif redis:
        rows.append(('Redis, all local >= 0.9x single process',
                     'not available', False))
    if not rows:
        return []
    out = ['## Issue 7 targets', '', '| target | measured (median) | met |',
           '|---|---|---|']
    out += [f'| {t} | {m} | {"yes" if ok else "**no**"} |'
            for t, m, ok in rows]
    return out + ['']


def _node_version():
    try:
        return subprocess.run(['node', '--version'], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return '?'


def plot(results, kinds, path):
    """Delivered rate and p99 latency vs offered load (open loop)."""
    latency = results.get('latency', {})
    series = {}
    for kind in kinds:
        pts = collections.defaultdict(list)
        for p in latency.get(kind, []):
            pts[p['fraction']].append(p)
        xs = sorted(pts)
        if not xs:
            continue
        series[kind] = [
            (statistics.median(p['offered'] for p in pts[x]),
             statistics.median(p['rate'] for p in pts[x]),
             statistics.median(p['p99_ms'] or 0 for p in pts[x]))
            for x in xs]
    if not series:
        return False
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(series, path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, pts in series.items():
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker='o', label=LABELS[kind])
        ax2.plot(xs, [p[2] for p in pts], marker='o', label=LABELS[kind])
    top = max(p[0] for pts in series.values() for p in pts)
    ax1.plot([0, top], [0, top], color='grey', linestyle=':', linewidth=1,
             label='delivered = offered')
    ax1.set_xlabel('offered load (msg/s)')
    ax1.set_ylabel('delivered (msg/s)')
    ax1.set_title('Throughput vs offered load')
    ax2.set_xlabel('offered load (msg/s)')
    ax2.set_ylabel('p99 delivery latency (ms)')
    ax2.set_yscale('log')
    ax2.axhline(25, color='red', linestyle='--', linewidth=1,
                label='25 ms target')
    ax2.set_title('p99 latency vs offered load')
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_pillow(series, path):
    from PIL import Image, ImageDraw
    width, height, pad = 1000, 420, 50
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728']
    top_x = max(p[0] for pts in series.values() for p in pts) or 1
    top_y = max(max(p[1] for p in pts) for pts in series.values()) or 1
    top_l = max(max(p[2] for p in pts) for pts in series.values()) or 1
    half = width // 2
    for panel, (index, top) in enumerate(((1, top_y), (2, top_l))):
        x0 = panel * half + pad
        draw.rectangle([x0, pad, x0 + half - 2 * pad, height - pad],
                       outline='black')
        draw.text((x0, 15), ['delivered msg/s vs offered',
                             'p99 ms vs offered'][panel], fill='black')
        for c, (kind, pts) in enumerate(series.items()):
            xy = [(x0 + p[0] / top_x * (half - 2 * pad),
                   height - pad - p[index] / top * (height - 2 * pad))
                  for p in pts]
            draw.line(xy, fill=colors[c % 4], width=2)
            draw.text((x0 + 5, pad + 5 + 12 * c), LABELS[kind],
                      fill=colors[c % 4])
    img.save(path)
    return True


# --------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description='Postbox benchmark suite (issue 7); loopback only.')
    p.add_argument('--quick', action='store_true',
                   help='short pass: 1 repeat, 3 s runs, 500 idle conns')
    p.add_argument('--only', default=','.join(SCENARIOS),
                   help='comma list of: ' + ', '.join(SCENARIOS))
    p.add_argument('--servers', default='postbox,relay,node',
                   help='comma list of postbox, relay, node')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--duration', type=float, default=10.0,
                   help='measured seconds per run')
    p.add_argument('--warmup', type=float, default=1.0)
    p.add_argument('--pairs', type=int, default=50)
    p.add_argument('--window', type=int, default=4,
                   help='messages in flight per sender (closed loop)')
    p.add_argument('--workers', type=int, default=2,
                   help='load generator processes')
    p.add_argument('--fractions', default='0.25,0.5,0.75,1.0',
                   help='open-loop offered loads, as fractions of max')
    p.add_argument('--assumed-max', type=float, default=2000.0,
                   help='max rate for the open-loop sweep when dm did '
                        'not run')
    p.add_argument('--idle-connections', type=int, default=2000,
                   help='idle websocket clients (up to 10,000 or so)')
    p.add_argument('--idle-repeats', type=int, default=None)
    p.add_argument('--fanout-members', type=int, default=1000)
    p.add_argument("--fanout-senders", type=int, default=2)
    p.add_argument('--fanout-window', type=int, default=4)
    p.add_argument('--sync-events', type=int, default=10_000)
    p.add_argument('--pin', action='store_true',
                   help='pin the server to CPU 0 and the load to CPU 1')
    p.add_argument('--no-deflate', action='store_true',
                   help='clients do not offer per-message deflate')
    p.add_argument('--no-report', action='store_true',
                   help='print only; leave bench/results/ alone')
    p.add_argument('--note', default='',
                   help='a line of text for the report (machine state...)')
    p.add_argument('--report-from', metavar='JSON',
                   help='rebuild report.md and load.png from a saved '
                        'results.json (and the profile text), run nothing')
    args = p.parse_args(argv)
    args.argv = list(argv)
    args.command = 'run.py'  # the scenarios of push.py and recovery.py
    if args.quick:
        defaults = {'repeats': 1, 'duration': 3.0, 'warmup': 0.5,
                    'idle_connections': 500}
        for key, value in defaults.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.idle_repeats is None:
        args.idle_repeats = 1 if args.quick else min(args.repeats, 2)
    args.fractions = [float(f) for f in args.fractions.split(',')]
    if 0.5 not in args.fractions:
        args.fractions.append(0.5)
    args.only = [s.strip() for s in args.only.split(',') if s.strip()]
    for s in args.only:
        if s not in SCENARIOS:
            p.error(f'unknown scenario {s!r}')
    return args


def rebuild_report(path, note=''):
    results = json.loads(path.read_text())
    args = argparse.Namespace(**results['args'])
    if note:
        args.note = note
    kinds = [k for k in ('postbox', 'relay', 'node')
             if any(k in results.get(s, {}) for s in ('dm', 'idle',
                                                       'fanout', 'latency'))]
    prof = results.get('profile')
    folded = RESULTS / 'postbox-profile.txt'
    if prof and prof.get('available') and folded.exists():
        prof.update(summarize_profile(folded))
    report = build_report(args, kinds, results)
    (RESULTS / 'report.md').write_text(report)
    plot(results, kinds, RESULTS / 'load.png')
    print(report)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_from:
        return rebuild_report(Path(args.report_from), args.note)
    load.raise_nofile(65536)
    kinds = [k.strip() for k in args.servers.split(',') if k.strip()]
    if 'node' in kinds and not ensure_node_relay():
        log('node relay: not available (no node/npm or npm install failed)')
        kinds.remove('node')
    log(f'servers: {", ".join(kinds)}; scenarios: {", ".join(args.only)}; '
        f'{os.cpu_count()} cores; pinned: {args.pin}')
    results = {'args': {k: v for k, v in vars(args).items()},
               'loadavg_start': os.getloadavg()[0]}
    runners = {'dm': scenario_dm, 'latency': scenario_latency,
               'idle': scenario_idle, 'fanout': scenario_fanout,
               'sync': scenario_sync, 'redis': scenario_redis,
               'scaleout': scenario_scaleout,
               'recovery': scenario_recovery, 'push': scenario_push,
               'profile': scenario_profile}
    with tempfile.TemporaryDirectory(prefix='postbox-bench-') as workdir:
        for name in SCENARIOS:
            if name not in args.only:
                continue
            log(f'--- {name}')
            t = time.monotonic()
            try:
                runners[name](args, kinds, results, Path(workdir))
            except Exception as exc:  # keep the other scenarios' numbers
                log(f'{name} failed: {type(exc).__name__}: {exc}')
                results.setdefault('failed', {})[name] = str(exc)
            log(f'{name} took {time.monotonic() - t:.0f} s')
    results['loadavg_end'] = os.getloadavg()[0]
    results['finished'] = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    report = build_report(args, kinds, results)
    if results.get('failed'):
        report += '\n## Failed scenarios\n\n' + '\n'.join(
            f'- {k}: {v}' for k, v in results['failed'].items()) + '\n'
    print()
    print(report)
    if not args.no_report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / 'report.md').write_text(report)
        (RESULTS / 'results.json').write_text(
            json.dumps(results, indent=1, default=str))
        if plot(results, kinds, RESULTS / 'load.png'):
            log('wrote', RESULTS / 'report.md', 'and', RESULTS / 'load.png')
        else:
            log('wrote', RESULTS / 'report.md')
    return 1 if results.get('failed') else 0


if __name__ == '__main__':
    sys.exit(main())
