"""Push to offline members through the outbox: how fast a group message
reaches every member's receiver, and what the outbox costs a send when
nobody is offline.

    python bench/push.py             # 5 repeats of each part
    python bench/push.py --quick     # 3 repeats, short runs
    python bench/run.py --only push  # the same, from the suite

- **offline**: one group of ``--members`` (1,000) offline members and a
  sender; every member has one subscription pointing at a receiver in this
  process on loopback (the bench server allows private addresses:
  ``POSTBOX_WEBHOOK_ALLOW_PRIVATE``). Two groups: one of Web Push
  subscriptions (each its own endpoint URL; payloads encrypted, the first
  of each run decrypted here with the subscription's keys), one of push
  gateway pushkeys (``POSTBOX_PUSH_GATEWAY_URL`` is the receiver), sent to
  alternately. Measured: seconds from the send to the last member's
  arrival, arrivals per member (duplicates) and the server's CPU.
- **online**: the closed-loop DM load of ``run.py`` on two servers in
  alternation, repeat by repeat: every user with a Web Push subscription
  (push on: the outbox looks for listeners on every send, and finds only
  connected members) and nobody with one (push off). Server CPU per
  delivered message.

Writes ``bench/results/push.md`` (unless ``--no-report``). A little over
400 lines: the receiver, both parts, the profile and their report share
one results dict.
"""
import asyncio
import base64
import collections
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import http_ece
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
from recovery import describe_load, load_mode, profiled_dm  # noqa: E402
from run import Server, free_port, log  # noqa: E402

RESULTS = BENCH / 'results'
GATEWAY_PATH = '/_matrix/push/v1/notify'


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


class Receiver:
    """A push service and a push gateway on one loopback port, on a thread
    of its own: counts arrivals per Web Push endpoint and per pushkey."""

    def __init__(self):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.keys = {'p256dh': _b64url(self.key.public_key().public_bytes(
            serialization.Encoding.X962,
            serialization.PublicFormat.UncompressedPoint)),
            'auth': _b64url(self.auth)}
        self.lock = threading.Lock()
        self.reset()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def reset(self):
        with self.lock:
            self.arrivals = collections.Counter()
            self.last = 0.0
            self.first_body = None

    def _arrived(self, key, body=None):
        with self.lock:
            self.arrivals[key] += 1
            self.last = time.monotonic()
            if body is not None and self.first_body is None:
                self.first_body = body

    async def _webpush(self, request):
        self._arrived(('webpush', request.match_info['n']),
                      await request.read())
        return web.Response(status=201)

    async def _gateway(self, request):
        data = await request.json()
        for device in data['notification']['devices']:
            self._arrived(('gateway', device['pushkey']))
        return web.json_response({'rejected': []})

    def _serve(self):
        async def main():
            app = web.Application()
            app.router.add_post('/wp/{n}', self._webpush)
            app.router.add_post(GATEWAY_PATH, self._gateway)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, '127.0.0.1', self.port).start()
            self.ready.set()
            await asyncio.Event().wait()
        asyncio.run(main())

    def start(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def decrypt_first(self) -> dict:
        """The first Web Push payload of the run, decrypted with the
        subscription's keys (as the browser would)."""
        with self.lock:
            body = self.first_body
        plain = http_ece.decrypt(body, private_key=self.key,
                                 auth_secret=self.auth, version='aes128gcm')
        return json.loads(plain)

    def subscription(self, kind, n):
        if kind == 'webpush':
            return {'kind': 'webpush', 'endpoint': f'{self.url}/wp/{n}',
                    'keys': self.keys}
        return {'kind': 'gateway', 'app_id': 'bench', 'pushkey': f'pk{n}'}


def failed_attempts(url) -> float:
    """The server's count of failed outbox delivery attempts so far."""
    with urllib.request.urlopen(url + '/metrics', timeout=10) as resp:
        return sum(float(line.rsplit(' ', 1)[1]) for line in
                   resp.read().decode().splitlines()
                   if line.startswith('postbox_outbox_failed_total'))


async def subscribe_all(url, users, receiver, kind, tag):
    """One subscription of ``kind`` for each of ``users``."""
    async with load.new_session() as session:
        async def one(i, token):
            async with session.post(
                    url + '/api/push/subscriptions',
                    json=receiver.subscription(kind, f'{tag}{i}'),
                    headers={'Authorization': 'Bearer ' + token}) as resp:
                if resp.status != 201:
                    raise RuntimeError(f'subscribe: {resp.status} '
                                       f'{await resp.text()}')
        await load.gather_limited(
            [one(i, t) for i, (_, t) in enumerate(users)], 32)


def run_offline(url, pid, receiver, members=1000, repeats=5, timeout=30.0):
    """Alternating webpush and gateway groups: one message each time."""
    async def go():
        users = await load.make_users(url, 'postbox', 2 * members + 1)
        sender_name, sender_token = users[0]
        groups = {'webpush': users[1:members + 1],
                  'gateway': users[members + 1:]}
        for kind, group in groups.items():
            await subscribe_all(url, group, receiver, kind, kind[0])
        out = {kind: [] for kind in groups}
        async with load.new_session() as session:
            sender = await load.RawClient(session, url,
                                          sender_token).connect()
            rooms = {}
            for kind, group in groups.items():
                rooms[kind] = (await sender.call('create_group', {
                    'name': f'bench push {kind}',
                    'members': [n for n, _ in group]}, timeout=120))['room']
            for r in range(repeats):
                for kind in groups:
                    load.wait_idle(pid, interval=0.2)
                    receiver.reset()
                    failed0 = failed_attempts(url)
                    c0 = load.proc_cpu_seconds(pid)
                    t0 = time.monotonic()
                    await sender.call('send_dm', {
                        'room_id': rooms[kind]['id'],
                        'body': f'push bench {r}',
                        'client_msg_id': f'push-{kind}-{r}'})
                    acked = time.monotonic() - t0
                    while len(receiver.arrivals) < members and \
                            time.monotonic() - t0 < timeout:
                        await asyncio.sleep(0.01)
                    c1 = load.proc_cpu_seconds(pid)
                    # Late duplicates would come within the claim period
                    # only after a failure; a short look for early ones.
                    await asyncio.sleep(1.0)
                    with receiver.lock:
                        counts = dict(receiver.arrivals)
                        last = receiver.last
                    res = {'reached': len(counts),
                           'arrivals': sum(counts.values()),
                           'seconds': last - t0 if counts else None,
                           'ack_ms': acked * 1000, 'cpu_s': c1 - c0,
                           'failed': failed_attempts(url) - failed0,
                           'loadavg': os.getloadavg()[0]}
                    if kind == 'webpush' and counts:
                        payload = receiver.decrypt_first()
                        res['decrypted'] = payload.get('body') == \
                            f'push bench {r}'
                    log(f'offline {kind} #{r + 1}: {res["reached"]} members '
                        f'reached ({res["arrivals"]} arrivals) in '
                        f'{res["seconds"] or 0:.2f} s, server CPU '
                        f'{res["cpu_s"]:.2f} s, {res["failed"]:.0f} failed '
                        f'attempts, load average {res["loadavg"]:.1f}' + (
                            f', payload decrypted: {res["decrypted"]}'
                            if 'decrypted' in res else ''))
                    out[kind].append(res)
            await sender.close()
        return out
    return asyncio.run(go())


def run_online(servers, receiver, args):
    """``servers``: {'push on': Server, 'push off': Server}."""
    users = {}
    for name, server in servers.items():
        users[name] = asyncio.run(load.make_users(server.url, 'postbox',
                                                  2 * args.pairs))
        if name == 'push on':
            asyncio.run(subscribe_all(server.url, users[name], receiver,
                                      'webpush', 'online'))
    runs = {name: [] for name in servers}
    order = list(servers.items())
    for r in range(args.repeats):
        # ABBA: every other round starts with the other server.
        for name, server in (order if r % 2 == 0 else order[::-1]):
            res = load.run_dm(server.url, 'postbox', server.pid,
                              pairs=args.pairs, window=args.window,
                              duration=args.duration, warmup=args.warmup,
                              workers=args.workers, users=users[name],
                              **load_mode(args))
            log(f'online {name} #{r + 1}: {res["rate"]:,.0f} msg/s, '
                f'{res["cpu_us_per_msg"]:.0f} us/msg CPU, errors '
                f'{res["errors"]}')
            runs[name].append(res)
    ratios = [a['cpu_us_per_msg'] / b['cpu_us_per_msg']
              for a, b in zip(runs['push on'], runs['push off'])]
    return {'runs': runs, 'ratios': ratios,
            'pushes': sum(receiver.arrivals.values()),
            'users': users['push on']}


OUTBOX_FRAME = 'queue_messages ('  # the outbox's part of a send


def run_profile(server, users, args, workdir):
    """py-spy of the "push on" server during a closed-loop run: the share
    of its CPU samples in the outbox's write path (a measure that does not
    move with the machine's load as CPU per message does). None without
    py-spy."""
    stacks = profiled_dm(server.url, server.pid, args, workdir, users)
    if stacks is None:
        return None
    total = sum(count for _, count in stacks)
    outbox = sum(count for stack, count in stacks if OUTBOX_FRAME in stack)
    log(f'profile: {total} samples, the outbox write path '
        f'{outbox / total:.2%} of them')
    return {'samples': total, 'outbox_share': outbox / total}


def scenario(args, results, workdir):
    members = getattr(args, 'members', 1000)  # run.py's args have none
    receiver = Receiver().start()
    env = {'POSTBOX_WEBHOOK_ALLOW_PRIVATE': 'true',
           'POSTBOX_GROUP_MAX_MEMBERS': str(members + 1),
           'POSTBOX_PUSH_GATEWAY_URL': receiver.url + GATEWAY_PATH}
    out = results.setdefault('push', {'members': members})
    with Server('postbox', workdir, args.pin, env) as server:
        out['offline'] = run_offline(server.url, server.pid, receiver,
                                     members, args.repeats)
    receiver.reset()
    with Server('postbox', workdir, args.pin, env) as on, \
            Server('postbox', workdir, args.pin, env) as off:
        out['online'] = run_online({'push on': on, 'push off': off},
                                   receiver, args)
        out['profile'] = run_profile(on, out['online'].pop('users'), args,
                                     workdir)
    if not getattr(args, 'no_report', False):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / 'push.md').write_text(report(out, args,
                                                getattr(args, 'note', '')))
    return out


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float('nan')


def report(res, args, note=''):
    members = res['members']
    lines = [
        '# Push through the outbox: bench results', '',
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; '
        f'`python bench/{args.command} {" ".join(args.argv)}`', '',
        note, '',
        f'## One message to {members:,} offline members', '',
        'From the send to the last arrival at the receiver (loopback), one '
        'subscription per member:', '',
        '| subscriptions | seconds to all | min-max | members reached | '
        'arrivals | failed attempts | server CPU |',
        '|---|---|---|---|---|---|---|']
    verdicts = []
    for kind, runs in res['offline'].items():
        secs = [r['seconds'] for r in runs]
        reached = min(r['reached'] for r in runs)
        dupes = sum(r['arrivals'] - r['reached'] for r in runs)
        ok = reached == members and dupes == 0 and \
            max(s or 1e9 for s in secs) < 5
        verdicts.append(f'{kind} {"met" if ok else "missed"}')
        lines.append(
            f'| {kind} | {_med(secs):.2f} s | {min(s or 0 for s in secs):.2f}'
            f'-{max(s or 0 for s in secs):.2f} s | '
            f'{reached:,} (fewest of {len(runs)} runs) | '
            f'{sum(r["arrivals"] for r in runs):,} in {len(runs)} runs | '
            f'{sum(r["failed"] for r in runs):.0f} | '
            f'{_med([r["cpu_s"] for r in runs]):.2f} s |')
    decrypted = [r.get('decrypted') for r in res['offline'].get('webpush', [])]
    lines += ['', f'Web Push payloads decrypted with the subscription keys: '
              f'{sum(bool(d) for d in decrypted)} of {len(decrypted)} '
              f'checked. Target (every member once, within 5 s, every run): '
              + '; '.join(verdicts) + '. 1-minute load average during '
              'these runs: ' + ', '.join(
                  f'{r["loadavg"]:.1f}' for runs in res['offline'].values()
                  for r in runs) + ' (2 cores: the time to all is the '
              'share of the cores the server got).', '']
    online = res['online']
    lines += [
        '## Nobody offline: CPU per message, push on vs off', '',
        f'{describe_load(args)}, two servers alternating, '
        f'{args.repeats} rounds (every other one starting with the other '
        f'server); on "push on" every user has a Web Push '
        f'subscription and is connected:', '',
        '| server | msg/s | us CPU/msg |', '|---|---|---|']
    for name, runs in online['runs'].items():
        lines.append(f'| {name} | {_med([r["rate"] for r in runs]):,.0f} | '
                     f'{_med([r["cpu_us_per_msg"] for r in runs]):.0f} |')
    ratios = online['ratios']
    lines += ['', f'Push on / push off, per round: '
              + ', '.join(f'{x:.3f}' for x in ratios)
              + f'; median {_med(ratios):.3f}. Target at most 1.05: '
              f'{"met" if _med(ratios) <= 1.05 else "missed"}. Pushes sent '
              f'meanwhile: {online["pushes"]} (everyone was connected).', '']
    prof = res.get('profile')
    if prof:
        lines += [
            f'py-spy of the "push on" server during one more run '
            f'({prof["samples"]:,} samples): the outbox\'s write path '
            f'(`queue_messages`: the listener look-ups of each write batch) '
            f'is {prof["outbox_share"]:.2%} of its CPU samples, the extra CPU '
            f'per message push costs by this measure (target 5%: '
            f'{"met" if prof["outbox_share"] <= 0.05 else "missed"}).', '']
    return '\n'.join(lines)


def parse_args(argv):
    p = load.ab_parser(__doc__.split('\n')[0], 'push.py')
    p.add_argument('--members', type=int, default=1000)
    return load.ab_args(p, argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load.raise_nofile(65536)
    with tempfile.TemporaryDirectory(prefix='postbox-bench-') as workdir:
        res = scenario(args, {}, Path(workdir))
    print(report(res, args, args.note))
    return 0


if __name__ == '__main__':
    sys.exit(main())
