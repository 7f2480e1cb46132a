"""Connection state recovery: what a replay costs the server, and what
recovery costs live delivery.

    python bench/recovery.py            # replay + live A/B, 5 repeats
    python bench/recovery.py --quick    # 3 repeats, short runs
    python bench/run.py --only recovery # the same, from the suite

- **replay**: a socket opts in (``auth: {token, recover: true}``), takes
  its ``pid`` and offset, and closes; its partner sends it ``--events``
  (1,000) messages; it reconnects with ``pid`` and offset. Measured: the
  server's CPU time (every thread, from ``/proc/<pid>/task/*/schedstat``,
  nanoseconds) from the reconnect's first byte to the CONNECT reply (the
  replayed events come before it), and the same for a fresh opted-in
  connect with nothing missed (the connect's own cost), in alternation.
  The bench server allows a recovery of that size
  (``POSTBOX_RECOVERY_MAX_EVENTS`` and ``POSTBOX_SYNC_PAGE_SIZE``; the
  defaults recover at most 500 events, past that the client syncs).
- **live**: the closed-loop DM load of ``run.py`` on one server, three
  variants in alternation, repeat by repeat: nobody opted in; nobody of
  the load opted in while one idle opted-in socket is connected (every
  delivery goes through the recovery check); every load socket opted in
  (every delivery carries an offset). Server CPU per delivered message.

Writes ``bench/results/recovery.md`` (unless ``--no-report``). A little
over 400 lines: the replay, the live A/B, the profile and their report
share one server and one results dict.
"""
import asyncio
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
from run import Server, log  # noqa: E402

RESULTS = BENCH / 'results'
RECOVER = {'recover': True}


def server_cpu_ns(pid) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (the
    scheduler's own count: finer than the 10 ms ticks of /proc/pid/stat)."""
    total = 0
    for path in glob.glob(f'/proc/{pid}/task/*/schedstat'):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


async def connect_counting(session, url, auth, deflate=True):
    """Open a Socket.IO connection with ``auth`` and read until the CONNECT
    reply. Returns (ws, CONNECT data, the events before it as (event,
    args...), the last offset seen)."""
    ws = await session.ws_connect(
        url.replace('http://', 'ws://', 1) +
        '/socket.io/?EIO=4&transport=websocket',
        compress=15 if deflate else 0, max_msg_size=0)
    opened = await asyncio.wait_for(ws.receive(), 30)
    if not str(opened.data).startswith('0'):
        raise RuntimeError(f'no engine.io open packet: {opened.data!r}')
    await ws.send_str('40' + orjson.dumps(auth).decode())
    before = []
    while True:
        text = str((await asyncio.wait_for(ws.receive(), 30)).data)
        if text.startswith('40'):
            return ws, orjson.loads(text[2:]), before
        if text.startswith('42'):
            before.append(orjson.loads(text[2:]))
        elif text != '2':
            raise RuntimeError(f'connection refused: {text!r}')


async def _read_offsets(ws, state):
    """Keep the last offset of a connected opted-in socket in ``state``."""
    async for msg in ws:
        text = str(msg.data)
        if text == '2':
            await ws.send_str('3')
        elif text.startswith('42'):
            args = orjson.loads(text[2:])
            if len(args) > 1 and isinstance(args[-1], str):
                state['offset'] = args[-1]


async def _fill(client, room_id, events, tag):
    """``events`` messages to ``room_id``, 64 in flight, all acked."""
    window = asyncio.Semaphore(64)
    failures = []

    def on_ack(ack_id, response):
        if not response.get('ok'):
            failures.append(response)
        window.release()
    client.ack_handler = on_ack
    body = load.make_body(100)
    for n in range(events):
        await window.acquire()
        await client.emit('send_dm', {'room_id': room_id, 'body': body,
                                      'client_msg_id': f'{tag}-{n}'})
    for _ in range(64):
        await asyncio.wait_for(window.acquire(), 60)
    if failures:
        raise RuntimeError(f'fill failed: {failures[0]}')


def run_replay(url, pid, events=1000, repeats=5, deflate=True):
    """Alternating: a fresh opted-in connect, then a recovery of
    ``events`` missed messages. Server CPU ms of each."""
    async def go():
        (a, ta), (b, tb) = await load.make_users(url, 'postbox', 2)
        out = {'recover_ms': [], 'connect_ms': [], 'recover_wall_ms': [],
               'replayed': [], 'recovered': []}
        async with load.new_session() as session:
            sender = await load.RawClient(session, url, ta, deflate).connect()
            room = (await sender.call('open_dm', {'username': b}))['room']
            auth = {'token': tb, **RECOVER}
            for r in range(repeats):
                # A fresh opted-in connect: the connect's own cost.
                load.wait_idle(pid, interval=0.2)
                c0 = server_cpu_ns(pid)
                ws, reply, before = await connect_counting(
                    session, url, auth, deflate)
                out['connect_ms'].append((server_cpu_ns(pid) - c0) / 1e6)
                state = {'offset': None}
                for args in before:
                    if len(args) > 1 and isinstance(args[-1], str):
                        state['offset'] = args[-1]
                reader = asyncio.ensure_future(_read_offsets(ws, state))
                await ws.close()
                await reader
                # Let the server freeze the session before the fill.
                load.wait_idle(pid, interval=0.2)
                await _fill(sender, room['id'], events, f'r{r}')
                load.wait_idle(pid, interval=0.2)
                t0 = time.monotonic()
                c0 = server_cpu_ns(pid)
                ws, again, missed = await connect_counting(
                    session, url, {**auth, 'pid': reply['pid'],
                                   'offset': state['offset']}, deflate)
                cpu = (server_cpu_ns(pid) - c0) / 1e6
                wall = (time.monotonic() - t0) * 1000
                await ws.close()
                recovered = again.get('pid') == reply['pid']
                count = sum(1 for e in missed if e[0] == 'message')
                out['recover_ms'].append(cpu)
                out['recover_wall_ms'].append(wall)
                out['replayed'].append(count)
                out['recovered'].append(recovered)
                log(f'replay #{r + 1}: recovered {recovered}, {count} '
                    f'messages replayed, server CPU {cpu:.1f} ms '
                    f'(a fresh connect {out["connect_ms"][-1]:.1f} ms), '
                    f'{wall:.0f} ms to the CONNECT reply')
            await sender.close()
        return out
    return asyncio.run(go())


class OptedInSocket:
    """One idle opted-in socket, held open on a thread of its own (so the
    server has a live recovery session during a run)."""

    def __init__(self, url, token):
        self.url, self.token = url, token
        self.ready, self.stop = threading.Event(), None
        self.thread = threading.Thread(target=lambda: asyncio.run(
            self._hold()), daemon=True)

    async def _hold(self):
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with load.new_session() as session:
            client = await load.RawClient(session, self.url, self.token,
                                          auth=RECOVER).connect()
            self.ready.set()
            await self.stop.wait()
            await client.close()

    def __enter__(self):
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError('the opted-in socket did not connect')
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def load_mode(args) -> dict:
    """run_dm's mode arguments: open loop at ``--rate`` if given (run.py's
    args have none: closed loop)."""
    rate = getattr(args, 'rate', 0)
    return {'mode': 'open', 'rate': rate} if rate else {'mode': 'closed'}


def describe_load(args) -> str:
    rate = getattr(args, 'rate', 0)
    how = (f'open loop at {rate:,.0f} msg/s' if rate else
           f'closed loop, {args.window} in flight per sender')
    return f'DMs ({args.pairs} pairs, {how}, {args.duration:g} s runs)'


VARIANTS = ('nobody opted in', 'one idle socket opted in',
            'every socket opted in')


def run_live(url, pid, args):
    users = asyncio.run(load.make_users(url, 'postbox', 2 * args.pairs))
    (_, holder), = asyncio.run(load.make_users(url, 'postbox', 1))
    runs = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        # ABBA: every other round runs the variants in reverse, so what
        # drifts over a run (the database grows) does not favour the first.
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            kwargs = dict(pairs=args.pairs, window=args.window,
                          duration=args.duration, warmup=args.warmup,
                          workers=args.workers, users=users,
                          **load_mode(args))
            if variant == VARIANTS[1]:
                with OptedInSocket(url, holder):
                    res = load.run_dm(url, 'postbox', pid, **kwargs)
            else:
                res = load.run_dm(url, 'postbox', pid, **kwargs, auth=(
                    RECOVER if variant == VARIANTS[2] else None))
            log(f'live {variant} #{r + 1}: {res["rate"]:,.0f} msg/s, '
                f'{res["cpu_us_per_msg"]:.0f} us/msg CPU, errors '
                f'{res["errors"]}')
            runs[variant].append(res)
    base = runs[VARIANTS[0]]
    ratios = {v: [a['cpu_us_per_msg'] / b['cpu_us_per_msg']
                  for a, b in zip(runs[v], base)] for v in VARIANTS[1:]}
    return {'runs': runs, 'ratios': ratios}


# Frames of the recovery path, and the send it ends in (the same work a
# socket that did not opt in costs).
RECOVERY_FRAME = 'Recovery.deliver ('
SEND_FRAME = '_send_eio_packet ('


def profiled_dm(url, pid, args, workdir, users, auth=None):
    """The stacks ``(frames, samples)`` of py-spy's record of the server
    during a closed-loop dm run of ``users``; None without py-spy."""
    spy = shutil.which('py-spy')
    if not spy:
        log('profile: py-spy not installed (pip install py-spy)')
        return None
    folded = Path(workdir) / f'profile-{pid}.txt'
    seconds = max(5, int(args.duration))
    # From before the load's workers start (a few seconds) to its end:
    # idle time takes no samples.
    proc = subprocess.Popen(
        [spy, 'record', '--pid', str(pid), '--duration', str(seconds + 10),
         '--rate', '200', '--format', 'raw', '--nonblocking',
         '--subprocesses', '--output', str(folded)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load.run_dm(url, 'postbox', pid, pairs=args.pairs, mode='closed',
                window=args.window, duration=seconds, warmup=0.5,
                workers=args.workers, users=users, auth=auth)
    proc.wait(seconds + 70)
    return [(stack, int(count)) for stack, _, count in
            (line.rpartition(' ') for line in
             folded.read_text().splitlines())]


def run_profile(url, pid, args, workdir):
    """py-spy of the server during a closed-loop run where every socket
    opted in: the share of the server's CPU samples spent in the recovery
    path beyond the send itself (a measure that does not move with the
    machine's load as CPU per message does). None without py-spy."""
    users = asyncio.run(load.make_users(url, 'postbox', 2 * args.pairs))
    stacks = profiled_dm(url, pid, args, workdir, users, RECOVER)
    if stacks is None:
        return None
    total = recovery = send = 0
    for stack, count in stacks:
        total += count
        if RECOVERY_FRAME in stack:
            recovery += count
            if SEND_FRAME in stack.split(RECOVERY_FRAME, 1)[1]:
                send += count
    out = {'samples': total, 'recovery_share': recovery / total,
           'beyond_send_share': (recovery - send) / total}
    log(f'profile: {total} samples; the recovery path '
        f'{out["recovery_share"]:.1%} of them, '
        f'{out["beyond_send_share"]:.1%} beyond the send itself')
    return out


def scenario(args, results, workdir):
    """Both parts on one server; ``results['recovery']``."""
    events = getattr(args, 'events', 1000)  # run.py's args have none
    env = {'POSTBOX_RECOVERY_MAX_EVENTS': str(max(500, events)),
           'POSTBOX_SYNC_PAGE_SIZE': str(max(500, events))}
    loadavg = [os.getloadavg()[0]]
    with Server('postbox', workdir, args.pin, env) as server:
        replay = run_replay(server.url, server.pid, events, args.repeats)
        loadavg.append(os.getloadavg()[0])
        live = run_live(server.url, server.pid, args)
        loadavg.append(os.getloadavg()[0])
        profile = run_profile(server.url, server.pid, args, workdir)
    results['recovery'] = {'replay': replay, 'live': live, 'events': events,
                           'loadavg': loadavg, 'profile': profile}
    if not getattr(args, 'no_report', False):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / 'recovery.md').write_text(report(
            results['recovery'], args, getattr(args, 'note', '')))
    return results['recovery']


def _med(values):
    return statistics.median(values) if values else float('nan')


def report(res, args, note=''):
    replay, live = res['replay'], res['live']
    rec, con = replay['recover_ms'], replay['connect_ms']
    lines = [
        '# Connection state recovery: bench results', '',
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; '
        f'`python bench/{args.command} {" ".join(args.argv)}`', '',
        note, '',
        '1-minute load average at the start, between the parts and at the '
        'end: ' + ' / '.join(f'{x:.1f}' for x in res['loadavg']) +
        ' (2 cores).', '',
        f'## Replaying {res["events"]:,} missed events', '',
        f'Server CPU (all threads) from the reconnect to its CONNECT reply, '
        f'{len(rec)} recoveries, each of {res["events"]:,} messages, '
        f'alternating with a fresh opted-in connect:', '',
        '| | median | min-max |', '|---|---|---|',
        f'| recovery, server CPU | {_med(rec):.1f} ms | '
        f'{min(rec):.1f}-{max(rec):.1f} ms |',
        f'| a fresh connect, server CPU | {_med(con):.1f} ms | '
        f'{min(con):.1f}-{max(con):.1f} ms |',
        f'| recovery, wall time to the CONNECT reply | '
        f'{_med(replay["recover_wall_ms"]):.0f} ms | '
        f'{min(replay["recover_wall_ms"]):.0f}-'
        f'{max(replay["recover_wall_ms"]):.0f} ms |', '',
        f'Recovered: {sum(replay["recovered"])} of {len(rec)}; messages '
        f'replayed per recovery: {sorted(set(replay["replayed"]))}. Target '
        f'under 100 ms of server time: '
        f'{"met" if _med(rec) < 100 else "missed"}.', '',
        '## Live delivery: CPU per message', '',
        f'{describe_load(args)}, the three variants alternating on one '
        f'server, {args.repeats} rounds (every other one in reverse '
        'order):', '',
        '| variant | msg/s | us CPU/msg | / nobody opted in (per round) |',
        '|---|---|---|---|']
    for variant in VARIANTS:
        runs = live['runs'][variant]
        ratios = live['ratios'].get(variant)
        lines.append(
            f'| {variant} | {_med([r["rate"] for r in runs]):,.0f} | '
            f'{_med([r["cpu_us_per_msg"] for r in runs]):.0f} | ' + (
                f'{_med(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})'
                if ratios else '1') + ' |')
    idle = _med(live['ratios'][VARIANTS[1]])
    every = _med(live['ratios'][VARIANTS[2]])
    lines += ['', f'Targets: sockets that did not opt in cost no more '
              f'(median ratio {idle:.3f}); opted-in sockets at most 10% '
              f'more CPU per message (median ratio {every:.3f}: '
              f'{"met" if every <= 1.10 else "missed"} by this measure). '
              f'There is no switch that turns recovery off; "nobody opted '
              f'in" is the path without it (no recovery session: the '
              f'per-recipient check is skipped).', '']
    prof = res.get('profile')
    if prof:
        lines += [
            '## Where an opted-in socket\'s extra CPU goes', '',
            f'py-spy of the server during a closed-loop run with every '
            f'socket opted in ({prof["samples"]:,} samples): the recovery '
            f'path (`Recovery.deliver`) is {prof["recovery_share"]:.1%} of '
            f'the server\'s CPU samples, of which all but '
            f'{prof["beyond_send_share"]:.1%} is the websocket send that '
            f'every socket costs. The rest (the offset, the log key of the '
            f'event, a packet encoded per socket instead of once per emit) '
            f'is the extra CPU per message an opted-in socket costs, by '
            f'this measure: {prof["beyond_send_share"]:.1%} (target 10%: '
            f'{"met" if prof["beyond_send_share"] <= 0.10 else "missed"}).',
            '']
    return '\n'.join(lines)


def parse_args(argv):
    p = load.ab_parser(__doc__.split('\n')[0], 'recovery.py')
    p.add_argument('--events', type=int, default=1000)
    return load.ab_args(p, argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load.raise_nofile(65536)
    results = {}
    with tempfile.TemporaryDirectory(prefix='postbox-bench-') as workdir:
        res = scenario(args, results, Path(workdir))
    print(report(res, args, args.note))
    return 0


if __name__ == '__main__':
    sys.exit(main())
