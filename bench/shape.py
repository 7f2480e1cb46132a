"""The real-world-shape benchmark: every documented path on a big database.

    python bench/shape.py            # seed (cached) + every path, 3 repeats
    python bench/shape.py --quick    # a small database, 1 repeat
    python bench/shape.py --only send_room,send_to,rooms_whale

Seeds a SQLite database shaped like a social app a few months in (default:
100,000 users, 1,000,000 messages, dms and groups of up to 256 members, one
"whale" user in 5,000 rooms, one "searcher" in 500 rooms), starts Postbox
on a copy of it (``python -m server``, default durability), and drives each
documented path with real Socket.IO / HTTP clients on loopback. Prints, per
path: operations per second, server CPU per operation (utime + stime of the
server process, all threads, and of its writer process), and
client-observed latency p50/p99. The read paths and the other writes and
events (read markers, edits, deletes, reactions, typing, presence, group
changes, mutes, blocks) run one request at a time, so their latency is the
server's time plus a loopback round trip; the send paths keep
``--inflight`` sends in flight (the same for every send path, so their CPU
per message compares). Every answer is checked: a path whose answers are
wrong shows as FAILED, not as fast.

The seeded database is cached under ``bench/.cache/`` (keyed by its shape
and the schema version), so later runs skip the seeding (about a minute at
the default shape). Writes ``bench/results/shape.md`` and ``shape.json``.
"""
import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import jwt

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import load  # noqa: E402
from run import POSTBOX_ENV, Server  # noqa: E402

CACHE = BENCH / '.cache'
RESULTS = BENCH / 'results'
SECRET = POSTBOX_ENV['POSTBOX_SECRET']
WHALE = 1      # the user in --whale-rooms rooms
SEARCHER = 2   # the user in --searcher-rooms rooms

# Words in several scripts, so bodies look like chat in several languages
# (and give search something real to find).
WORDS = ('hello thanks tomorrow meeting lunch photo weekend project deadline '
         'coffee birthday train airport invoice concert holiday running '
         'Straße Grüße Überraschung Mädchen schön Frühstück Käse '
         'café naïve résumé façade déjà '
         '東京 会議 明日 写真 ありがとう 週末 '
         '안녕하세요 회의 내일 사진 감사합니다 '
         'ok yes no lol sure great maybe later soon now').split()


# --------------------------------------------------------------------------
# Seeding

def _insert(conn, model, rows, fields):
    """Bulk insert tuples ``rows`` (columns ``fields``, by field name) with
    every other column at its Python default."""
    index = {name: i for i, name in enumerate(fields)}
    names, getters = [], []
    for field in model._meta.sorted_fields:
        if field.name == 'id' and 'id' not in index:
            continue
        names.append(field.column_name)
        if field.name in index:
            getters.append(('row', index[field.name]))
        else:
            default = field.default
            getters.append(('const',
                            default() if callable(default) else default))
    sql = (f'INSERT INTO "{model._meta.table_name}" '
           f'({", ".join(chr(34) + n + chr(34) for n in names)}) '
           f'VALUES ({", ".join("?" * len(names))})')

    def shaped():
        for row in rows:
            yield tuple(row[v] if kind == 'row' else v for kind, v in getters)
    conn.executemany(sql, shaped())


def _group_size(rng):
    r = rng.random()
    if r < 0.70:
        return rng.randint(3, 10)
    if r < 0.95:
        return rng.randint(11, 50)
    return rng.randint(51, 256)


def seed(path, users, messages, whale_rooms, searcher_rooms, dms_per_user,
         groups, seed_value=7):
    """Create the schema with Postbox's own migrations, then fill it."""
    import peewee

    import models
    from models import search
    from models.migrations import migrate
    from models.trigrams import TrigramFile
    rng = random.Random(seed_value)
    database = peewee.SqliteDatabase(str(path), pragmas={
        'journal_mode': 'wal', 'synchronous': 'OFF', 'foreign_keys': 0})
    models.db.initialize(database)
    database.connect()
    migrate(database)
    database.close()
    conn = sqlite3.connect(str(path), isolation_level=None)
    # The search index's triggers call the fold (models/search.py); new
    # messages' text is written below, as the send path does.
    conn.create_function('pb_fold', 1, search.fold, deterministic=True)
    conn.execute('PRAGMA synchronous=OFF')
    conn.execute('PRAGMA foreign_keys=OFF')
    conn.execute('BEGIN')
    t0 = time.time() * 1000 - 90 * 86400 * 1000  # 90 days ago

    _insert(conn, models.User, (
        (i, f'user{i}', f'User {i}', int(t0)) for i in range(1, users + 1)),
        ('id', 'username', 'display_name', 'created_at'))

    rooms = []  # (kind, name, member ids, dm_key)
    seen_pairs = set()

    def add_dm(a, b):
        key = (min(a, b), max(a, b))
        if a == b or key in seen_pairs:
            return False
        seen_pairs.add(key)
        rooms.append(('dm', None, key, f'{key[0]}:{key[1]}'))
        return True

    def add_group(first, size):
        members = {first}
        while len(members) < size:
            members.add(rng.randint(1, users))
        members.discard(first)
        rooms.append(('group', f'group {len(rooms)}',
                      (first, *sorted(members)), None))

    # The whale: 80% dms, 20% groups.
    whale_groups = whale_rooms // 5
    other = 3
    while sum(1 for r in rooms if WHALE in r[2]) < whale_rooms - whale_groups:
        add_dm(WHALE, other)
        other += 1
    for _ in range(whale_groups):
        add_group(WHALE, _group_size(rng))
    # The searcher: a dm with the whale, then dms and groups.
    add_dm(SEARCHER, WHALE)
    count = 1
    while count < searcher_rooms * 4 // 5:
        count += add_dm(SEARCHER, rng.randint(3, users))
    for _ in range(searcher_rooms - count):
        add_group(SEARCHER, _group_size(rng))
    # Everyone else.
    for _ in range(users * dms_per_user // 2):
        add_dm(rng.randint(1, users), rng.randint(1, users))
    for _ in range(groups):
        add_group(rng.randint(3, users), _group_size(rng))

    # Messages: a heavy-tailed share per room (a few busy rooms, many
    # quiet ones), every room at least one message.
    weights = [rng.paretovariate(1.2) for _ in rooms]
    picks = list(range(len(rooms)))
    extra = rng.choices(picks, weights=weights, k=max(0, messages - len(rooms)))
    order = picks + extra
    rng.shuffle(order)
    step = (90 * 86400 * 1000) / max(1, len(order))
    last_seq = [0] * len(rooms)
    last_msg = [None] * len(rooms)
    last_at = [int(t0)] * len(rooms)

    def message_rows():
        for n, r in enumerate(order):
            last_seq[r] += 1
            at = int(t0 + n * step)
            last_msg[r] = n + 1
            last_at[r] = at
            members = rooms[r][2]
            sender = members[rng.randrange(len(members))]
            body = ' '.join(rng.choices(WORDS, k=rng.randint(2, 14)))
            yield (n + 1, r + 1, last_seq[r], sender, body,
                   uuid.UUID(int=rng.getrandbits(128)).hex, at, last_seq[r])

    msgs = list(message_rows())
    room_rows = ((i + 1, kind, name, key, members[0], int(t0), last_seq[i],
                  last_msg[i], last_at[i])
                 for i, (kind, name, members, key) in enumerate(rooms))
    _insert(conn, models.Room, room_rows,
            ('id', 'kind', 'name', 'dm_key', 'created_by', 'created_at',
             'last_seq', 'last_message_id', 'last_activity_at'))
    if 'owner' in models.Room._meta.fields:
        conn.execute('UPDATE "room" SET "owner_id" = "created_by_id" '
                     'WHERE "kind" = \'group\'')

    def membership_rows():
        for i, (_, _, members, _) in enumerate(rooms):
            for user in members:
                read = rng.randint(max(0, last_seq[i] - 5), last_seq[i])
                yield (i + 1, user, read, int(t0))
    _insert(conn, models.Membership, membership_rows(),
            ('room', 'user', 'last_read_seq', 'joined_at'))
    _insert(conn, models.Message, msgs,
            ('id', 'room', 'seq', 'sender', 'body', 'client_msg_id',
             'created_at', 'update_seq'))
    conn.executemany('INSERT INTO "message_text" VALUES (?, ?, ?)',
                     ((m[1], m[0], search.fold(m[4])) for m in msgs))
    conn.execute('COMMIT')
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.execute('ANALYZE')
    conn.close()
    # The trigram file, as the server's indexer would have filled it.
    trigrams = TrigramFile(trigram_path(path), str(path))
    while max(trigrams.step(50_000)) == 50_000:
        pass
    trigrams.close()
    return {'users': users, 'rooms': len(rooms), 'messages': len(msgs)}


def trigram_path(path) -> str:
    """The trigram file of the SQLite database at ``path`` (it is made
    and copied with the database)."""
    from models.trigrams import path_of
    return path_of(str(path))


def seeded_database(args) -> Path:
    """The cached seeded database for this shape, made if missing."""
    from models.migrations import CURRENT_VERSION
    key = (f'shape-u{args.users}-m{args.messages}-w{args.whale_rooms}'
           f'-s{args.searcher_rooms}-d{args.dms_per_user}-g{args.groups}'
           f'-v{CURRENT_VERSION}')
    path = CACHE / f'{key}.db'
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix('.tmp')
    for leftover in CACHE.glob(f'{key}.tmp*'):
        leftover.unlink()
    started = time.monotonic()
    print(f'seeding {path.name} ...', flush=True)
    shape = seed(tmp, args.users, args.messages, args.whale_rooms,
                 args.searcher_rooms, args.dms_per_user, args.groups)
    for suffix in ('-wal', '-shm', '-search-wal', '-search-shm'):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    Path(trigram_path(tmp)).rename(trigram_path(path))
    tmp.rename(path)
    print(f'seeded {shape} in {time.monotonic() - started:.0f} s '
          f'({path.stat().st_size / 2**20:.0f} MiB)', flush=True)
    return path


def token(user_id):
    now = time.time()
    return jwt.encode({'sub': str(user_id), 'iat': round(now, 3),
                       'exp': int(now) + 86400}, SECRET, algorithm='HS256')


def name(user_id) -> str:
    """The seeded username of a user id."""
    return f'user{user_id}'


def expect(condition, what):
    """A wrong answer fails the path (RuntimeError) instead of timing it."""
    if not condition:
        raise RuntimeError(what)


def in_room(room, user_id) -> bool:
    return any(m['id'] == user_id for m in room['members'])


def search_query(i) -> str:
    return f'{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]}'


# --------------------------------------------------------------------------
# The paths

class Bench:
    """One running server on a copy of the seeded database, with the
    users and rooms the paths need."""

    def __init__(self, server, db_path, args):
        self.server = server
        self.url = server.url
        self.db_path = db_path
        self.args = args
        self.session = None
        self.rng = random.Random(11)
        self.picks = random.Random(13)  # strangers (group members to be)
        self.tokens = {}

    def query(self, sql, params=()):
        conn = sqlite3.connect(f'file:{self.db_path}?mode=ro', uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def members(self, room, limit):
        """The room's first ``limit`` members (a group's owner first)."""
        return [u for (u,) in self.query(
            'SELECT user_id FROM membership WHERE room_id = ? '
            'ORDER BY id LIMIT ?', (room, limit))]

    def bearer(self, user):
        if user not in self.tokens:
            self.tokens[user] = token(user)
        return self.tokens[user]

    async def client(self, user):
        """A connected client of ``user``, connected on first use."""
        if user not in self.clients:
            self.clients[user] = await load.RawClient(
                self.session, self.url, self.bearer(user),
                deflate=False).connect()
        return self.clients[user]

    async def http(self, method, path, user, status=200, **kwargs):
        """One HTTP request as ``user`` (``json=``, ``params=``): the body,
        bytes. RuntimeError unless the status is ``status``."""
        async with self.session.request(
                method, self.url + path, **kwargs,
                headers={'Authorization': 'Bearer ' + self.bearer(user)}
        ) as r:
            body = await r.read()
            if r.status != status:
                raise RuntimeError(f'{method} {path}: {r.status} '
                                   f'{body[:200]!r}')
            return body

    def dm_partners(self, user, limit):
        """Users with whom ``user`` has a dm."""
        return [u for (u,) in self.query(
            'SELECT b.user_id FROM membership a JOIN room r ON r.id = '
            "a.room_id AND r.kind = 'dm' JOIN membership b ON b.room_id = "
            'r.id AND b.user_id != a.user_id WHERE a.user_id = ? LIMIT ?',
            (user, limit))]

    async def setup(self):
        self.session = load.new_session()
        # Senders: users with a dm each (not the whale), one client each.
        rows = self.query(
            'SELECT r.id, a.user_id, b.user_id FROM room r '
            'JOIN membership a ON a.room_id = r.id '
            'JOIN membership b ON b.room_id = r.id AND b.user_id > a.user_id '
            "WHERE r.kind = 'dm' AND a.user_id > 2 AND r.id % 97 = 0 "
            'LIMIT ?', (self.args.senders,))
        self.pairs = [(room, a, b) for room, a, b in rows]
        self.groups = [r for (r,) in self.query(
            "SELECT r.id FROM room r WHERE r.kind = 'group' AND "
            '(SELECT COUNT(*) FROM membership m WHERE m.room_id = r.id) '
            '>= 200 LIMIT ?', (self.args.senders,))]
        self.group_members = {g: self.members(g, 1) for g in self.groups}
        self.clients = {}
        for _, a, _ in self.pairs:
            await self.client(a)
        for g in self.groups:
            await self.client(self.group_members[g][0])
        self.whale = await load.RawClient(
            self.session, self.url, token(WHALE), deflate=False).connect()
        self.searcher = await load.RawClient(
            self.session, self.url, token(SEARCHER), deflate=False).connect()
        self.whale_rooms = [r for (r,) in self.query(
            'SELECT room_id FROM membership WHERE user_id = ?', (WHALE,))]
        self.typical = self.pairs[0][1]
        self.attachments = {}

    async def close(self):
        for c in [*self.clients.values(), self.whale, self.searcher]:
            await c.close()
        await self.session.close()

    # -- sends: one coroutine per sender, --inflight in flight overall --

    def _send_specs(self, path):
        """(client, payload-maker) per sender for a send path."""
        specs = []
        for room, a, b in self.pairs:
            client = self.clients[a]
            if path == 'send_room':
                specs.append((client, lambda i, r=room: {'room_id': r}))
            elif path == 'send_to':
                specs.append((client, lambda i, b=b: {'to': f'user{b}'}))
            elif path == 'send_reply':
                reply = self.query('SELECT id FROM message WHERE room_id = ? '
                                   'ORDER BY seq DESC LIMIT 1', (room,))[0][0]
                specs.append((client, lambda i, r=room, x=reply:
                              {'room_id': r, 'reply_to': x}))
            elif path == 'send_attach':
                ids = self.attachments[a]
                specs.append((client, lambda i, r=room, ids=ids:
                              {'room_id': r, 'attachments': [ids[i]]}))
            elif path == 'send_http':
                specs.append((a, lambda i, r=room:
                              (f'/api/rooms/{r}/messages', {})))
            elif path == 'send_http_to':
                specs.append((a, lambda i, b=b:
                              ('/api/messages', {'to': name(b)})))
        if path == 'send_group':
            for g in self.groups:
                client = self.clients[self.group_members[g][0]]
                specs.append((client, lambda i, g=g: {'room_id': g}))
        return specs

    async def upload_attachments(self, per_sender):
        """Uploads done before the measured window of send_attach."""
        async def upload(user):
            data = aiohttp.FormData()
            data.add_field('file', b'meeting notes\n' * 150,
                           filename='notes.txt', content_type='text/plain')
            async with self.session.post(
                    self.url + '/api/attachments', data=data,
                    headers={'Authorization': 'Bearer ' + token(user)}) as r:
                body = await r.json()
                if r.status != 201:
                    raise RuntimeError(f'upload: {r.status} {body}')
                return body['attachment']['id']
        for _, a, _ in self.pairs:
            self.attachments[a] = [await upload(a) for _ in range(per_sender)]

    async def run_sends(self, path, count):
        specs = self._send_specs(path)
        per = max(1, count // len(specs))
        inflight = max(1, self.args.inflight // len(specs))
        latencies = []
        body = 'real-world shape ' * 3

        async def one_socket(client, payload, i):
            data = {**payload(i), 'body': body,
                    'client_msg_id': uuid.uuid4().hex}
            start = time.perf_counter()
            await client.call('send_dm', data)
            latencies.append(time.perf_counter() - start)

        async def one_http(user, payload, i):
            url, fields = payload(i)
            start = time.perf_counter()
            await self.http('POST', url, user, 201, json={
                **fields, 'body': body, 'client_msg_id': uuid.uuid4().hex})
            latencies.append(time.perf_counter() - start)

        async def sender(client, payload):
            sem = asyncio.Semaphore(inflight)

            async def slot(i):
                async with sem:
                    if path in HTTP_SENDS:
                        await one_http(client, payload, i)
                    else:
                        await one_socket(client, payload, i)
            await asyncio.gather(*(slot(i) for i in range(per)))
        return await self._measure(
            lambda: asyncio.gather(*(sender(c, p) for c, p in specs)),
            per * len(specs), latencies)

    # -- reads: one request at a time ---------------------------------

    async def run_reads(self, path, count):
        whale_rooms = self.whale_rooms
        known = None
        if path in ('sync_whale',):
            # A reconnecting client that is current except for 20 rooms.
            rows = self.query('SELECT r.id, r.last_seq FROM room r JOIN '
                              'membership m ON m.room_id = r.id '
                              'WHERE m.user_id = ?', (WHALE,))
            known = {str(r): s for r, s in rows}
            for r in self.rng.sample(list(known), 20):
                known[r] = max(0, known[r] - 1)

        async def op(i):
            room = whale_rooms[i % len(whale_rooms)]
            if path == 'rooms_whale':
                return await self.whale.call('rooms', {})
            if path == 'rooms_whale_page':
                return await self.whale.call('rooms', {'limit': 50})
            if path == 'rooms_typical':
                return await self.clients[self.typical].call('rooms', {})
            if path == 'rooms_http':
                return await self.http('GET', '/api/rooms', WHALE)
            if path == 'history':
                return await self.whale.call('history', {'room_id': room})
            if path == 'history_http':
                return await self.http('GET', f'/api/rooms/{room}/messages',
                                       WHALE)
            if path == 'join_room':
                return await self.whale.call('join_room', {'room_id': room})
            if path == 'open_dm':
                other = partners[i % len(partners)]
                return await self.whale.call('open_dm',
                                             {'username': f'user{other}'})
            if path == 'sync_whale':
                return await self.whale.call('sync', {'rooms': known})
            if path == 'sync_fresh':
                return await self.clients[self.typical].call(
                    'sync', {'rooms': {}})
            if path == 'search':
                return await self.searcher.call(
                    'search', {'query': search_query(i)})
            if path == 'search_http':
                return await self.http('GET', '/api/search', SEARCHER,
                                       params={'q': search_query(i)})
            raise ValueError(path)

        partners = self.dm_partners(WHALE, count) if path == 'open_dm' \
            else []
        return await self._sequential(op, count)

    async def _sequential(self, op, count):
        """Measure ``op(i)`` for i in range(count), one at a time."""
        latencies = []

        async def work():
            for i in range(count):
                start = time.perf_counter()
                await op(i)
                latencies.append(time.perf_counter() - start)
        return await self._measure(work, count, latencies)

    # -- other writes and events: one at a time, every answer checked --
    #
    # prepare_<path>(count) does a path's setup (not measured) and returns
    # its op(i), i in range(count). Writes can be repeated: each marks,
    # edits or deletes another message, reactions, mutes and blocks go on
    # and off in turn, each add or removal is of another user.

    async def run_writes(self, path, count):
        op = await getattr(self, 'prepare_' + path)(count)
        return await self._sequential(op, count)

    def big_group(self, k):
        """The k-th group of 200+ members that ``setup`` found, and its
        owner (connected). Each path that adds members has a group of its
        own; the others use group 0, which keeps its seeded members."""
        group = self.groups[k % len(self.groups)]
        return group, self.group_members[group][0]

    def busiest_big_group(self):
        """The group of 200+ members with the most messages."""
        return self.query(
            "SELECT r.id FROM room r WHERE r.kind = 'group' AND "
            '(SELECT COUNT(*) FROM membership m WHERE m.room_id = r.id) '
            '>= 200 ORDER BY r.last_seq DESC LIMIT 1')[0][0]

    def strangers(self, count, exclude=()):
        """``count`` distinct random users outside ``exclude`` (never the
        whale or the searcher: they are in too many rooms to be added)."""
        taken = {WHALE, SEARCHER, *exclude}
        found = []
        while len(found) < count:
            user = self.picks.randint(1, self.args.users)
            if user not in taken:
                taken.add(user)
                found.append(user)
        return found

    async def _fill(self, user, room, count):
        """``user`` sends ``count`` messages to ``room``: their seqs."""
        client = await self.client(user)
        acks = await load.gather_limited([client.call('send_dm', {
            'room_id': room, 'body': f'unread {i}',
            'client_msg_id': uuid.uuid4().hex}) for i in range(count)],
            self.args.inflight)
        return sorted(a['message']['seq'] for a in acks)

    async def _mark_read(self, room, writer, reader, count):
        """``writer`` sends ``count`` messages; then each op is ``reader``,
        with the room open, reading one more of them (the marker moves and
        ``read`` goes out every time)."""
        seqs = await self._fill(writer, room, count)
        client = await self.client(reader)
        await client.call('join_room', {'room_id': room})

        async def op(i):
            r = await client.call('mark_read', {'room_id': room,
                                                'seq': seqs[i]})
            expect(r['seq'] == seqs[i] and r['unread'] == count - 1 - i,
                   f'mark_read to {seqs[i]}: {r}')
        return op

    async def prepare_mark_read_dm(self, count):
        room, writer, reader = self.pairs[0]
        return await self._mark_read(room, writer, reader, count)

    async def prepare_mark_read_group(self, count):
        group, _ = self.big_group(0)
        writer, reader = self.members(group, 2)
        return await self._mark_read(group, writer, reader, count)

    def biggest_room(self):
        """The room with the most messages (a dm, in the seeded shape) and
        its first two members."""
        room = self.query('SELECT id FROM room ORDER BY last_seq DESC '
                          'LIMIT 1')[0][0]
        return room, self.members(room, 2)

    def own_messages(self, room, sender, count):
        """``sender``'s latest ``count`` messages in ``room``, newest
        first."""
        ids = [m for (m,) in self.query(
            'SELECT id FROM message WHERE room_id = ? AND sender_id = ? '
            'AND deleted = 0 ORDER BY seq DESC LIMIT ?',
            (room, sender, count))]
        expect(len(ids) == count, f'room {room} has {len(ids)} messages '
               f'of user{sender}, {count} wanted')
        return ids

    async def prepare_edit_message(self, count):
        room, (editor, _) = self.biggest_room()
        ids = self.own_messages(room, editor, count)
        client = await self.client(editor)

        async def op(i):
            body = f'edited {i}: real-world shape'
            r = await client.call('edit_message', {'message_id': ids[i],
                                                   'body': body})
            expect(r['message']['body'] == body, f'edit_message: {r}')
        return op

    async def prepare_delete_message(self, count):
        room, (_, deleter) = self.biggest_room()
        ids = self.own_messages(room, deleter, count)
        client = await self.client(deleter)

        async def op(i):
            r = await client.call('delete_message', {'message_id': ids[i]})
            expect(r['message']['deleted'] is True, f'delete_message: {r}')
        return op

    async def prepare_react(self, count):
        """The owner of the busiest big group reacts on its messages, newest
        first: op 2k puts a reaction on message k, op 2k+1 takes it off."""
        group = self.busiest_big_group()
        ids = [m for (m,) in self.query(
            'SELECT id FROM message WHERE room_id = ? AND deleted = 0 '
            'ORDER BY seq DESC', (group,))]
        user = self.members(group, 1)[0]
        client = await self.client(user)

        async def op(i):
            on = i % 2 == 0
            message = ids[i // 2 % len(ids)]
            r = await client.call('react', {'message_id': message,
                                            'emoji': '👍', 'on': on})
            expect((user in r['message']['reactions'].get('👍', ())) == on,
                   f'react {on}: {r}')
        return op

    async def _typing(self, typists):
        """Op 2k is typist k's ``typing: true`` in its room, op 2k+1 its
        ``false``: a (room, user) not seen before each time, so the
        throttle forwards every one, as it does a first keystroke and its
        end. ``typists``: (client, room). Before the window each sends a
        ``false`` there (forwards nothing), as a client that opened the
        room would have loaded it."""
        for client, room in typists:
            await client.call('typing', {'room_id': room, 'typing': False})

        async def op(i):
            client, room = typists[i // 2]
            await client.call('typing', {'room_id': room,
                                         'typing': i % 2 == 0})
        return op

    async def prepare_typing_dm(self, count):
        rooms = [r for (r,) in self.query(
            'SELECT m.room_id FROM membership m JOIN room r ON r.id = '
            "m.room_id WHERE m.user_id = ? AND r.kind = 'dm' LIMIT ?",
            (WHALE, (count + 1) // 2))]
        return await self._typing([(self.whale, r) for r in rooms])

    async def prepare_typing_group(self, count):
        group = self.busiest_big_group()
        members = self.members(group, (count + 1) // 2)
        expect(len(members) * 2 >= count, f'group {group}: too few members')
        return await self._typing([(await self.client(u), group)
                                   for u in members])

    async def prepare_presence(self, count):
        """The whale asks for 50 of its dm partners at a time."""
        partners = self.dm_partners(WHALE, 50 * count)

        async def op(i):
            names = [name(partners[(i * 50 + j) % len(partners)])
                     for j in range(50)]
            r = await self.whale.call('presence', {'usernames': names})
            expect(len(r['presence']) == 50, f'presence: {len(r["presence"])}'
                   ' of 50 answered')
        return op

    async def prepare_create_group(self, count):
        """Each sender in turn creates a group with 50 random users."""
        creators = [a for _, a, _ in self.pairs]
        lists = [self.strangers(50, creators) for _ in range(count)]

        async def op(i):
            client = self.clients[creators[i % len(creators)]]
            r = await client.call('create_group', {
                'name': f'shape group {i}',
                'members': [name(u) for u in lists[i]]})
            expect(len(r['room']['members']) == 51,
                   f'create_group: {len(r["room"]["members"])} members')
        return op

    async def _add_members(self, k, count, http):
        """The owner of big group ``k`` adds another user at each op."""
        group, owner = self.big_group(k)
        users = self.strangers(count, self.members(group, 10_000))
        client = await self.client(owner)

        async def op(i):
            payload = {'members': [name(users[i])]}
            if http:
                room = json.loads(await self.http(
                    'POST', f'/api/rooms/{group}/members', owner,
                    json=payload))['room']
            else:
                room = (await client.call('add_members', {
                    'room_id': group, **payload}))['room']
            expect(in_room(room, users[i]), f'user{users[i]} not added')
        return op

    async def prepare_add_members(self, count):
        return await self._add_members(1, count, http=False)

    async def prepare_add_members_http(self, count):
        return await self._add_members(2, count, http=True)

    async def prepare_remove_member(self, count):
        """``count`` users are added to a big group at once, then its owner
        removes one at each op."""
        group, owner = self.big_group(3)
        users = self.strangers(count, self.members(group, 10_000))
        client = await self.client(owner)
        await client.call('add_members', {
            'room_id': group, 'members': [name(u) for u in users]})

        async def op(i):
            r = await client.call('remove_member', {
                'room_id': group, 'username': name(users[i])})
            expect(not in_room(r['room'], users[i]),
                   f'user{users[i]} not removed')
        return op

    async def prepare_rename_group(self, count):
        group, owner = self.big_group(0)
        client = await self.client(owner)

        async def op(i):
            r = await client.call('rename_group', {'room_id': group,
                                                   'name': f'renamed {i}'})
            expect(r['room']['name'] == f'renamed {i}', f'rename: {r}')
        return op

    async def prepare_mute_room(self, count):
        """A big group's owner mutes it and unmutes it, in turn."""
        group, owner = self.big_group(0)
        client = await self.client(owner)

        async def op(i):
            await client.call('mute_room', {'room_id': group,
                                            'muted': i % 2 == 0})
        return op

    async def prepare_leave_room(self, count):
        """The whale joins ``count`` of its rooms, then leaves one at each
        op."""
        rooms = self.whale_rooms[:count]
        for room in rooms:
            await self.whale.call('join_room', {'room_id': room})

        async def op(i):
            await self.whale.call('leave_room', {'room_id': rooms[i]})
        return op

    async def prepare_block_unblock(self, count):
        """A sender blocks its dm partner and unblocks them, in turn."""
        _, user, other = self.pairs[-1]
        client = await self.client(user)

        async def op(i):
            await client.call('block' if i % 2 == 0 else 'unblock',
                              {'username': name(other)})
        return op

    async def _measure(self, work, count, latencies):
        pid = self.server.pid
        load.wait_idle(pid, timeout=30)
        cpu0 = load.proc_cpu_seconds(pid)
        wall0 = time.perf_counter()
        await work()
        wall = time.perf_counter() - wall0
        cpu = load.proc_cpu_seconds(pid) - cpu0
        return {'ops': count, 'ops_per_s': count / wall,
                'cpu_us': cpu / count * 1e6,
                'p50_ms': load.percentile(latencies, 50) * 1000,
                'p99_ms': load.percentile(latencies, 99) * 1000}


SEND_PATHS = ['send_room', 'send_to', 'send_http', 'send_http_to',
              'send_attach', 'send_reply', 'send_group']
HTTP_SENDS = ('send_http', 'send_http_to')
READ_PATHS = ['rooms_whale', 'rooms_whale_page', 'rooms_typical',
              'rooms_http', 'history', 'history_http', 'join_room', 'open_dm',
              'sync_whale', 'sync_fresh', 'search', 'search_http']
# The other writes and events, one at a time (Bench.prepare_<path>).
OTHER_PATHS = ['mark_read_dm', 'mark_read_group', 'edit_message',
               'delete_message', 'react', 'typing_dm', 'typing_group',
               'presence', 'create_group', 'add_members', 'add_members_http',
               'remove_member', 'rename_group', 'mute_room', 'leave_room',
               'block_unblock']


async def supports(client, event, data):
    """False when the server answers that it does not know ``event``."""
    try:
        await client.call(event, data)
        return True
    except load.CallError as exc:
        return 'unknown' not in str(exc) and 'not_found' not in str(exc)


async def run_once(args, db_path, workdir, paths):
    copy = Path(workdir) / f'postbox-{uuid.uuid4().hex[:6]}.db'
    shutil.copyfile(db_path, copy)
    shutil.copyfile(trigram_path(db_path), trigram_path(copy))
    env = {'POSTBOX_DATABASE_URL': f'sqlite:///{copy}',
           'POSTBOX_ATTACHMENT_UNSENT_MAX': '100000'}
    results = {}
    with Server('postbox', workdir, env=env) as server:
        bench = Bench(server, copy, args)
        await bench.setup()
        try:
            if 'send_attach' in paths:
                await bench.upload_attachments(
                    args.sends // len(bench.pairs) + 1)
            # Not measured: the first sends on the freshly copied database
            # bring its pages into the cache; whichever send path ran first
            # cost 30% more CPU, with ten times the p99 (send_room, then
            # send_to with the order swapped). Each send path warms up
            # alike, but the attachments' (its uploads are counted).
            for path in paths:
                if path in SEND_PATHS and path != 'send_attach':
                    try:
                        await bench.run_sends(path, args.sends // 10)
                    except (load.CallError, RuntimeError):
                        pass  # its measured run says what is wrong
            for path in paths:
                if path in ('search', 'search_http') and not await supports(
                        bench.searcher, 'search', {'query': 'hello'}):
                    print(f'  {path}: not supported by this server, '
                          'skipped', flush=True)
                    continue
                if path == 'rooms_whale_page' and not await supports(
                        bench.whale, 'rooms', {'limit': 50}):
                    continue
                try:
                    if path in SEND_PATHS:
                        r = await bench.run_sends(path, args.sends)
                    elif path in READ_PATHS:
                        r = await bench.run_reads(path, args.reads)
                    else:
                        r = await bench.run_writes(path, args.reads)
                except (load.CallError, RuntimeError) as exc:
                    print(f'  {path:17} FAILED: {str(exc)[:200]}', flush=True)
                    results[path] = {'error': str(exc)[:200]}
                    continue
                results[path] = r
                print(f'  {path:17} {r["ops_per_s"]:8.0f} ops/s '
                      f'{r["cpu_us"]:8.0f} us CPU/op  p50 {r["p50_ms"]:6.1f} '
                      f'ms  p99 {r["p99_ms"]:6.1f} ms', flush=True)
        finally:
            await bench.close()
    for leftover in (copy, *copy.parent.glob(f'{copy.name}-*')):
        leftover.unlink(missing_ok=True)
    return results


def median_of(runs, path, key):
    values = [r[path][key] for r in runs if key in r.get(path, {})]
    return statistics.median(values) if values else None


def table(runs, paths) -> list:
    """The report's table of ``paths``: medians, or the first error."""
    lines = ['| path | ops/s | server CPU/op (us) | p50 (ms) | p99 (ms) |',
             '|---|---:|---:|---:|---:|']
    for path in paths:
        errors = [r[path]['error'] for r in runs if 'error' in r.get(path, {})]
        if errors:
            lines.append(f'| {path} | fails: {errors[0][:80]} | | | |')
            continue
        if median_of(runs, path, 'cpu_us') is None:
            continue
        lines.append(
            f'| {path} | {median_of(runs, path, "ops_per_s"):.0f} | '
            f'{median_of(runs, path, "cpu_us"):.0f} | '
            f'{median_of(runs, path, "p50_ms"):.1f} | '
            f'{median_of(runs, path, "p99_ms"):.1f} |')
    return lines


def report(args, runs, paths, shape_note):
    lines = ['# Real-world-shape benchmark', '',
             f'`python bench/shape.py` — {shape_note}; '
             f'{len(runs)} repeat(s), medians. Server CPU is the whole '
             'process (event loop, writer and readers). Sends keep '
             f'{args.inflight} in flight over {args.senders} senders; reads '
             'run one at a time (latency = server time + loopback).', '']
    lines += table(runs, [p for p in paths if p not in OTHER_PATHS])
    others = [p for p in paths if p in OTHER_PATHS]
    if others:
        lines += ['', 'Other writes and events, one at a time as the reads '
                  f'({args.reads} of each; a write waits for its own '
                  'commit, with no other write to share it):', '']
        lines += table(runs, others)
    sends = {p: median_of(runs, p, 'cpu_us') for p in SEND_PATHS
             if p != 'send_group' and median_of(runs, p, 'cpu_us')}
    if sends:
        cheapest = min(sends.values())
        lines += ['', 'Send paths, CPU per message against the cheapest '
                  '(target: at most 1.2x; the group send also delivers to '
                  'the sender\'s own socket only, as its members are not '
                  'connected):', '']
        for p, v in sends.items():
            lines.append(f'- {p}: {v / cheapest:.2f}x')
    whale = median_of(runs, 'rooms_whale', 'p50_ms')
    if whale is not None:
        cpu = median_of(runs, 'rooms_whale', 'cpu_us') / 1000
        lines += ['', f'Inbox of the {args.whale_rooms}-room user: '
                  f'{cpu:.1f} ms of server CPU per call, every thread of '
                  'the process counted (target: under 50 ms of server '
                  'time); p50 '
                  f'{whale:.1f} ms, p99 '
                  f'{median_of(runs, "rooms_whale", "p99_ms"):.1f} ms, '
                  'which include sending the 5 MB answer over loopback and '
                  'the client reading it.']
    return '\n'.join(lines) + '\n'


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--users', type=int, default=100_000)
    p.add_argument('--messages', type=int, default=1_000_000)
    p.add_argument('--whale-rooms', type=int, default=5_000)
    p.add_argument('--searcher-rooms', type=int, default=500)
    p.add_argument('--dms-per-user', type=int, default=3)
    p.add_argument('--groups', type=int, default=3_000)
    p.add_argument('--senders', type=int, default=8)
    p.add_argument('--inflight', type=int, default=32)
    p.add_argument('--sends', type=int, default=4000)
    p.add_argument('--reads', type=int, default=200)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--only', default='')
    p.add_argument('--quick', action='store_true',
                   help='10,000 users, 100,000 messages, 1 repeat')
    p.add_argument('--no-report', action='store_true')
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.messages, args.groups = 10_000, 100_000, 300
        args.repeats, args.sends, args.reads = 1, 1000, 50
    return args


def main(argv=None):
    args = parse_args(argv)
    load.raise_nofile()
    paths = SEND_PATHS + READ_PATHS + OTHER_PATHS
    if args.only:
        wanted = args.only.split(',')
        unknown = set(wanted) - set(paths)
        if unknown:
            sys.exit(f'unknown paths: {", ".join(sorted(unknown))}')
        paths = [p for p in paths if p in wanted]
    db_path = seeded_database(args)
    shape_note = (f'{args.users:,} users, {args.messages:,} messages, '
                  f'groups of up to 256, one user in {args.whale_rooms:,} '
                  f'rooms, SQLite')
    runs = []
    with tempfile.TemporaryDirectory(prefix='postbox-shape-') as workdir:
        for n in range(args.repeats):
            print(f'run {n + 1}/{args.repeats}', flush=True)
            runs.append(asyncio.run(run_once(args, db_path, workdir, paths)))
    text = report(args, runs, paths, shape_note)
    print()
    print(text)
    if not args.no_report:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / 'shape.md').write_text(text)
        (RESULTS / 'shape.json').write_text(json.dumps(
            {'args': vars(args), 'runs': runs}, indent=1))


if __name__ == '__main__':
    main()
