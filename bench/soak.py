"""Soak test: mixed traffic with reconnects against a real server on
loopback, bounded in time.

Starts ``python -m server`` on a free 127.0.0.1 port with a fresh data dir,
runs USERS clients that send dms and group messages, read history, list
rooms, type, mark read and sync, each dropping and reopening its socket
every so often. Every few seconds it samples the server's resident memory
and open file descriptors. At the end every user syncs from 0 and every
acked message must be there exactly once.

    python bench/soak.py --minutes 10

Prints memory and fd min/max/last, messages acked and lost (must be 0).
Exit status 1 if anything acked was lost or duplicated.
"""
import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import socketio  # noqa: E402

from tests.kit import ServerProcess, register  # noqa: E402

SAMPLE_SECONDS = 5


def rss_kib(pid) -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def open_fds(pid) -> int:
    return len(os.listdir(f'/proc/{pid}/fd'))


class User:
    def __init__(self, info, token):
        self.info = info
        self.token = token
        self.acked = {}  # message id -> room id
        self.sio = None
        self.seq = 0

    async def connect(self, base, polling_share=0.0):
        for attempt in range(50):
            sio = socketio.AsyncClient(reconnection=False)
            # Some reconnects use long-polling (as behind a proxy that
            # refuses websockets); note the client's disconnect then waits
            # for the pending poll.
            transport = ('polling' if random.random() < polling_share
                         else 'websocket')
            try:
                await sio.connect(base, auth={'token': self.token},
                                  transports=[transport], wait_timeout=10)
                self.sio = sio
                return
            except socketio.exceptions.ConnectionError:
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError('could not connect')

    async def close(self):
        if self.sio is not None:
            await self.sio.disconnect()
            self.sio = None


TIMEOUTS = {}


async def call(user, event, data):
    try:
        return await user.sio.call(event, data, timeout=15)
    except (socketio.exceptions.TimeoutError,
            socketio.exceptions.BadNamespaceError,
            socketio.exceptions.DisconnectedError) as exc:
        key = f'{event}:{type(exc).__name__}'
        TIMEOUTS[key] = TIMEOUTS.get(key, 0) + 1
        return None


async def user_loop(user, base, rooms, others, deadline, stats):
    await user.connect(base)
    next_drop = time.monotonic() + random.uniform(5, 30)
    while time.monotonic() < deadline:
        if time.monotonic() > next_drop:
            await user.close()
            stats['reconnects'] += 1
            await user.connect(base, polling_share=0.2)
            next_drop = time.monotonic() + random.uniform(5, 30)
        room_id = random.choice(rooms)
        roll = random.random()
        if roll < 0.5:
            user.seq += 1
            cmid = f'{user.info["id"]}-{user.seq}'
            data = {'room_id': room_id, 'client_msg_id': cmid,
                    'body': 'soak ' + 'x' * random.randint(1, 400)}
            if random.random() < 0.1:
                data = {'to': random.choice(others), 'client_msg_id': cmid,
                        'body': 'soak to'}
            ack = await call(user, 'send_dm', data)
            if ack is None:
                # Unknown outcome: the retry with the same client_msg_id
                # either stores it or returns the first copy.
                await user.close()
                await user.connect(base)
                ack = await call(user, 'send_dm', data)
            if ack and ack.get('ok'):
                user.acked[ack['message']['id']] = ack['message']['room_id']
                stats['acked'] += 1
            elif ack:
                stats['refused'][ack['error']['code']] = \
                    stats['refused'].get(ack['error']['code'], 0) + 1
        elif roll < 0.6:
            await call(user, 'history', {'room_id': room_id, 'limit': 50})
        elif roll < 0.7:
            await call(user, 'rooms', {})
        elif roll < 0.8:
            await call(user, 'typing', {'room_id': room_id, 'typing': True})
        elif roll < 0.9:
            await call(user, 'mark_read', {'room_id': room_id, 'seq': 1})
        else:
            await call(user, 'sync', {'rooms': {}})
        stats['events'] += 1
        # About 4 events a second per user: under the default rate limits.
        await asyncio.sleep(random.uniform(0.1, 0.4))
    await user.close()


async def full_sync(user, base):
    """Every message event the user can see: {message id: count}."""
    await user.connect(base)
    seen = {}
    known = {}
    while True:
        ack = await user.sio.call('sync', {'rooms': known}, timeout=30)
        assert ack['ok'], ack
        for event in ack['events']:
            known[str(event['room_id'])] = event['seq']
            if event['type'] == 'message':
                mid = event['message']['id']
                seen[mid] = seen.get(mid, 0) + 1
        if not ack['has_more']:
            break
    await user.close()
    return seen


async def sampler(pid, samples, stop, stats):
    started = time.monotonic()
    while not stop.is_set():
        samples.append((rss_kib(pid), open_fds(pid)))
        print(f'{time.monotonic() - started:6.0f}s rss {samples[-1][0]} KiB '
              f'fds {samples[-1][1]} acked {stats["acked"]} '
              f'events {stats["events"]}', file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
        except asyncio.TimeoutError:
            pass


async def soak(minutes, users_count):
    data_dir = tempfile.mkdtemp(prefix='postbox-soak-')
    server = ServerProcess(data_dir).start()
    base = server.url
    try:
        users = [User(*await register(base)) for _ in range(users_count)]
        names = [u.info['username'] for u in users]
        # Rooms: a ring of dms plus two groups, so every user has several.
        rooms_of = {u.info['id']: [] for u in users}
        setup = users[0]
        for i, user in enumerate(users):
            await user.connect(base)
            peer = users[(i + 1) % len(users)]
            ack = await user.sio.call('open_dm',
                                      {'username': peer.info['username']})
            for member in (user, peer):
                rooms_of[member.info['id']].append(ack['room']['id'])
            await user.close()
        await setup.connect(base)
        half = len(users) // 2
        for members in (users[1:half], users[half:]):
            ack = await setup.sio.call('create_group', {
                'name': 'soak', 'members': [m.info['username']
                                            for m in members]})
            for member in [setup] + members:
                if ack['room']['id'] not in rooms_of[member.info['id']]:
                    rooms_of[member.info['id']].append(ack['room']['id'])
        await setup.close()

        samples = []
        stop = asyncio.Event()
        stats = {'acked': 0, 'events': 0, 'reconnects': 0, 'refused': {}}
        sample_task = asyncio.create_task(
            sampler(server.proc.pid, samples, stop, stats))
        deadline = time.monotonic() + minutes * 60
        await asyncio.gather(*[
            user_loop(u, base, rooms_of[u.info['id']],
                      [n for n in names if n != u.info['username']],
                      deadline, stats)
            for u in users])
        stop.set()
        await sample_task

        lost = duplicated = 0
        for user in users:
            seen = await full_sync(user, base)
            for mid in user.acked:
                count = seen.get(mid, 0)
                lost += count == 0
                duplicated += count > 1
    finally:
        code = server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    rss = [s[0] for s in samples]
    fds = [s[1] for s in samples]
    print(f'soak: {minutes} min, {users_count} users, '
          f'{len(samples)} samples every {SAMPLE_SECONDS}s')
    print(f'memory (RSS MiB): min {min(rss) / 1024:.1f} '
          f'max {max(rss) / 1024:.1f} last {rss[-1] / 1024:.1f} '
          f'(first {rss[0] / 1024:.1f})')
    quarters = [rss[min(len(rss) - 1, len(rss) * q // 4)] / 1024
                for q in (1, 2, 3, 4)]
    print('memory at 1/4, 1/2, 3/4, end of the run (MiB): '
          + ', '.join(f'{q:.1f}' for q in quarters))
    print(f'open fds: min {min(fds)} max {max(fds)} last {fds[-1]} '
          f'(first {fds[0]})')
    print(f'events {stats["events"]}, reconnects {stats["reconnects"]}, '
          f'refused {stats["refused"]}')
    print(f'calls without an ack: {TIMEOUTS}')
    print(f'messages acked: {stats["acked"]}')
    print(f'lost: {lost}, duplicated: {duplicated}')
    print(f'server exit code: {code}')
    return 0 if lost == 0 and duplicated == 0 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--minutes', type=float, default=10.0)
    parser.add_argument('--users', type=int, default=20)
    args = parser.parse_args()
    return asyncio.run(soak(args.minutes, args.users))


if __name__ == '__main__':
    sys.exit(main())
