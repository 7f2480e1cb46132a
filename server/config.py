"""Configuration: embedded defaults, an optional YAML file, then ``POSTBOX_*``
environment variables (which win).

``load_config(path=None, env=os.environ) -> Config`` validates everything once;
the rest of the code reads typed attributes and never looks at the
environment itself.

Over 400 lines on purpose: ``Config`` is the one list of every setting, each
with a comment on why its default is what it is; splitting it would scatter
that list. (Its field declarations are alike in shape, which ``duplicates``
reports; they are different settings, not repeated logic.)
"""
import dataclasses
import fcntl
import ipaddress
import logging
import os
import secrets
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

# Shortest signing secret accepted: HS256 keys shorter than its 32-byte
# output can be guessed offline from a single token (RFC 7518 3.2).
SECRET_MIN_BYTES = 32


@dataclasses.dataclass(frozen=True)
class Config:
    # Network.
    host: str = '127.0.0.1'
    port: int = 8080
    # Where SQLite, attachments and the generated secret live by default.
    data_dir: str = './data'
    # sqlite:///relative.db, sqlite:////absolute.db or postgresql://...
    # Empty means sqlite under data_dir.
    database_url: str = ''
    # redis://, rediss://, redis+sentinel:// or, for a Redis Cluster,
    # redis+cluster://host:port,host:port (chosen by the scheme, not probed:
    # the key names differ); empty means a single process.
    redis_url: str = ''
    # Prefix of every Redis key and channel: processes that share it form
    # one service, so two services can share one Redis.
    redis_channel: str = 'postbox'
    # Connections per process for publishing and bookkeeping: one sender
    # pipelines every publish, so a few suffice; an unbounded pool is what
    # opens thousands of connections under load.
    redis_max_connections: int = 4
    # Messages waiting for Redis beyond this are dropped and counted, not
    # buffered without bound while Redis is slow or down; clients that
    # follow `sync` still get every stored message.
    redis_publish_queue_max: int = 10000
    # Liveness heartbeat; a process is dead after 3 missed beats, so a
    # crashed process's users go offline within about 15 s.
    redis_heartbeat_seconds: float = 5.0
    # Cap of the listener's reconnect backoff: short, so cross-process
    # delivery resumes within seconds of Redis coming back.
    redis_retry_max_seconds: float = 2.0
    # Redis connect/command timeout: a hung Redis must not hold up sends.
    redis_timeout_seconds: float = 5.0
    # Each process publishes a probe to itself this often and expects it
    # back on its own subscription within the timeout; if not, its
    # listener is deaf (connected, hearing nothing): it is counted,
    # re-created and /readyz says 503 until a probe comes back. One small
    # publish a second costs nothing; 3 s is well above the listener's
    # lag on a loaded process (a false alarm costs a resubscription, whose
    # gap clients recover with `sync`), and short enough that a deaf
    # process is noticed within about 4 s.
    redis_probe_seconds: float = 1.0
    redis_probe_timeout_seconds: float = 3.0
    # Processes serving one port (SO_REUSEPORT); more than one needs Redis.
    workers: int = 1
    # JWT signing key (HS256), at least 32 bytes (refused at startup
    # otherwise). Empty: generated once and kept in data_dir.
    secret: str = ''
    # Tokens live a week: long enough for mobile clients that reconnect for
    # days, short enough that a leaked token stops working.
    token_ttl_seconds: int = 7 * 24 * 3600
    # Origins allowed to open Socket.IO connections from a browser; empty
    # list means same origin only.
    cors_allowed_origins: tuple = ()
    # Reverse proxies (addresses or networks, e.g. 127.0.0.1 or
    # 10.0.0.0/8) whose X-Forwarded-For names the client: the per-address
    # limits then apply per client instead of to the proxy. Empty: the
    # header is ignored (a client could write anything in it).
    trusted_proxies: tuple = ()

    # Message rules.
    body_max_chars: int = 4000
    group_max_members: int = 256
    # Token bucket per user for sends: a human never sustains 10 msg/s, a
    # burst of 30 covers pasting a list or a bot catching up.
    send_rate_per_second: float = 10.0
    send_burst: int = 30
    history_default_limit: int = 50
    sync_page_size: int = 500
    # Connection state recovery (opt-in, see transport/recovery.py): a
    # frozen session is kept 2 minutes (Node's default: a dropped
    # connection, a reload, a server restart or a process switch) and
    # recovers at most 500 missed events (one sync page: past that the
    # client's sync is as cheap); each opted-in socket keeps that many
    # sends, about 100 bytes each.
    recovery_window_seconds: float = 120.0
    recovery_max_events: int = 500
    # Search: a page of 20 results fills a screen (the contract allows up
    # to 50); queries longer than 200 characters are not searches but
    # pastes, and every word costs a pass over the candidates.
    search_default_limit: int = 20
    search_query_max_chars: int = 200
    # Existing messages indexed per write transaction after the upgrade
    # that adds search: 5,000 rows take the writer about 0.1 s, so sends
    # queued behind a batch wait about that long.
    search_backfill_batch: int = 5000
    # Reactions: every change sends the whole message (all its reactions)
    # to every member, so a message carries at most this many distinct
    # emoji (Slack's limit is 23) and one user at most this many of them;
    # past either the react is `too_large`.
    reactions_per_message_max: int = 20
    reactions_per_user_max: int = 10
    # Entries of each per-process lookup cache (username -> user id, dm
    # pair -> dm room id): both never change once written, so a cache hit
    # saves a database read per send by username; ~200 bytes an entry,
    # ~20 MB per cache when full, and the oldest entries go first.
    lookup_cache_entries: int = 100000
    # Inbox entries kept per process (a room's dict and last message,
    # ~1 KB; a member's unread count): a warm 5,000-room inbox is then
    # built from the cache instead of reading and serialising 5,000 last
    # messages (about 140 ms of CPU). 20,000 rooms: ~20 MB when full.
    inbox_cache_rooms: int = 20000
    # Users' public fields (id, username, display name; ~300 bytes each)
    # kept per process: every delivered message and inbox row names its
    # sender, so the active users must fit. 100,000 users: ~30 MB when
    # full; the least recently used go first.
    user_cache_entries: int = 100000
    # Rooms' kind and member ids kept per process (read on every send):
    # a DM is ~250 bytes, a 1,000-member group ~9 KB, so 50,000 rooms are
    # ~15 MB when most are DMs (~450 MB if all were such groups), and a
    # warm 5,000-room inbox fits ten times over.
    room_cache_entries: int = 50000

    # Typing: forward a typing:true at most once per this many seconds per
    # user and room; receivers expire it after 8 s (the contract).
    typing_throttle_seconds: float = 2.0
    # Presence: a user goes offline this long after the last socket closes.
    presence_grace_seconds: float = 10.0
    # Usernames one presence query may ask about (more is `too_large`): a
    # client asks about the people of the rooms it shows, and each name
    # costs a lookup in the database and in Redis.
    presence_query_max: int = 100

    # Storage. One writer thread commits up to this many operations in one
    # transaction (group commit): bigger batches amortise the fsync, and the
    # batch is whatever queued while the previous commit ran, so an idle
    # server still commits a lone message at once.
    write_batch_max: int = 512
    # Writes waiting for the writer, at most: about a second of its work at
    # the measured 8-9k sends/s. Past it a write is answered `unavailable`
    # (with retry_after) at once, so memory stays flat whatever the offered
    # load while the database is slow; a waiting send holds a few KB.
    write_queue_max: int = 10000
    # Reads run in a small thread pool so the event loop never waits on the
    # database; SQLite in WAL mode lets them run beside the writer.
    reader_threads: int = 4
    # FULL makes an acked message survive power loss, not just a crash;
    # group commit keeps the fsync cost per batch, not per message.
    sqlite_synchronous: str = 'FULL'
    # SQLite page cache per connection (the writer and each reader): 32 MiB
    # keeps a busy inbox and recent history in memory; the process's memory
    # grows towards connections x this as the database grows.
    sqlite_cache_mib: int = 32
    # PostgreSQL connections per process (readers + the writer).
    pg_max_connections: int = 8

    # Attachments.
    attachment_max_bytes: int = 25 * 1024 * 1024
    attachments_per_message: int = 10
    # Uploads never sent are deleted after this long.
    attachment_orphan_seconds: int = 24 * 3600
    # How often each process looks for them: one query on a reader
    # thread, and ten minutes late on a day's grace does not matter.
    attachment_cleanup_interval_seconds: float = 600.0
    # Types kept under their own name, as sniffed from the bytes (never
    # the name or the client's Content-Type): pictures, documents,
    # archives, common audio and video. Any other file is kept as
    # application/octet-stream (a download); what a browser would render
    # or run (HTML, SVG, XML, scripts) and executables are refused.
    attachment_types: tuple = (
        'image/png', 'image/jpeg', 'image/gif', 'image/webp',
        'application/pdf', 'text/plain', 'application/zip',
        'application/gzip', 'application/x-7z-compressed',
        'application/msword', 'application/vnd.ms-excel',
        'application/vnd.ms-powerpoint',
        'application/vnd.openxmlformats-officedocument.wordprocessingml'
        '.document',
        'application/vnd.openxmlformats-officedocument.spreadsheetml.sheet',
        'application/vnd.openxmlformats-officedocument.presentationml'
        '.presentation',
        'application/vnd.oasis.opendocument.text',
        'application/vnd.oasis.opendocument.spreadsheet',
        'application/vnd.oasis.opendocument.presentation',
        'audio/mpeg', 'audio/mp4', 'audio/ogg', 'audio/aac', 'audio/x-wav',
        'audio/x-flac', 'video/mp4', 'video/webm', 'video/quicktime')
    # Uploads a user may hold that are not sent yet: a person attaches a
    # handful at a time; without a cap one account could fill the disk
    # with files nobody sees until the cleanup.
    attachment_unsent_max: int = 50
    # Bytes of unsent uploads a user may hold (uploads sent only to rooms
    # where they are the only member count as unsent): eight files of the
    # maximum size, more than anyone attaches at once.
    attachment_unsent_max_bytes: int = 200 * 1024 * 1024
    # An upload that sends nothing for this long is cut off (408)...
    attachment_upload_idle_seconds: float = 30.0
    # ...and so is one that, after that long, came at less than this on
    # average: a phone on a poor 2G link still sends several KB a second;
    # a byte a minute only holds a connection and a file open.
    attachment_upload_min_bytes_per_second: int = 1024
    # Thumbnails fit in this many pixels a side: a chat bubble's width on
    # a high-density phone screen.
    attachment_thumbnail_px: int = 320
    # Images with more pixels are never decoded: no thumbnail, served as
    # a download, not inline. Decoding costs up to 4 bytes a pixel (the
    # images decoded at once stay within this many pixels, so about
    # 160 MB), and a small PNG can claim a huge canvas (a decompression
    # bomb). 40 MP covers the photos phones save by default.
    attachment_thumbnail_max_pixels: int = 40_000_000

    # Socket.IO / websocket.
    # Per-message deflate costs more CPU than it saves for chat-sized frames.
    websocket_compression: bool = False
    max_payload_bytes: int = 1_000_000
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    # An Engine.IO session that has not completed a Socket.IO connect this
    # long after it opened (or after its last disconnect) is closed: a
    # client sends its connect at once, even over a slow mobile link, and
    # sessions that never do would otherwise hold a socket until the ping
    # timeout or forever.
    connect_timeout_seconds: float = 10.0
    # JSON nesting allowed in an HTTP body and in each Socket.IO event
    # argument: Postbox's own payloads nest 3 deep; 32 leaves room for
    # clients' extra fields, and refuses (`invalid`) values nested deep
    # enough to be costly to walk or to overflow recursive code.
    json_max_depth: int = 32

    # Abuse limits.
    # Sockets per user: a person has a few tabs and devices; a bot or a
    # leaked token opening hundreds would eat file descriptors.
    max_connections_per_user: int = 20
    # Sockets per client address: generous because a whole office can sit
    # behind one NAT address, small enough that one host cannot take the fds.
    max_connections_per_ip: int = 200
    # Token bucket per user over every Socket.IO event (reads included):
    # a busy client does a few events a second; 60 saved up covers a
    # reconnect that syncs, lists rooms and joins a few at once.
    event_rate_per_second: float = 20.0
    event_burst: int = 60
    # Rooms a user may be in when opening a dm or creating a group: far
    # above what a person uses, low enough that a script cannot make the
    # inbox query (one row per room) arbitrarily slow.
    rooms_per_user_max: int = 1000
    # Packets queued for one socket that is not reading (a slow or stalled
    # client): past this it is disconnected instead of growing the server's
    # memory. A healthy client drains a burst of this size in milliseconds.
    socket_send_queue_max: int = 1000
    # How long a socket's queue may stay over that before it is cut off: a
    # burst (one group commit acks hundreds of messages at once) drains in
    # milliseconds, a stalled client never drains.
    socket_send_stall_seconds: float = 2.0
    # Failed logins before a username (or a client address) must wait:
    # a user mistypes a few times; guessing needs thousands of tries.
    # The allowance refills at this many per minute.
    login_failures_per_username: int = 10
    login_failures_per_ip: int = 50
    login_refill_per_minute: float = 2.0
    # Registrations per client address (counted across processes with
    # Redis): each costs an Argon2 hash of 64 MiB and tens of ms, and a
    # script registering in a loop also fills the user table. 20 at once
    # lets a class or an office behind one NAT address sign up together;
    # after that one every two minutes (30 an hour).
    registrations_per_ip: int = 20
    registration_refill_per_minute: float = 0.5
    # Argon2 hashes and checks running at once in this process; the rest
    # wait their turn. Each takes 64 MiB while it runs, so a burst of
    # logins or registrations stays under about 256 MiB instead of growing
    # with the burst; 4 keeps 2 cores busy with threads to spare.
    argon2_concurrency: int = 4

    # Push notifications and bot webhooks (server/services/outbox.py).
    # Webhook URLs and push endpoints on loopback, private or link-local
    # addresses are refused: a user must not make the server reach its
    # own network (SSRF). Allow them for tests and closed networks only.
    webhook_allow_private: bool = False
    # The message body in a push payload; off keeps message text away
    # from the push services (the client then shows "New message").
    push_include_body: bool = True
    # A Matrix push gateway (Sygnal) for 'gateway' subscriptions; empty:
    # they are kept but nothing is sent to them.
    push_gateway_url: str = ''
    # The VAPID "sub" claim: a contact push services can write to about
    # this server's pushes (RFC 8292: mailto: or https:).
    push_vapid_subject: str = 'mailto:postmaster@localhost'
    # Subscriptions per user: a browser or app each, a handful of devices
    # in practice; the cap keeps one account from making the server push
    # to thousands of endpoints per message.
    push_subscriptions_per_user: int = 20
    # Deliveries in flight at once per process: a slow receiver must not
    # hold up the others, and a few dozen sockets are cheap.
    outbox_concurrency: int = 16
    # Rows a process holds (claimed, being delivered) at most, and how
    # long a claim holds (a dispatcher that dies leaves its rows to
    # another one after this).
    outbox_batch: int = 64
    outbox_claim_seconds: float = 60.0
    # Idle dispatchers look for due rows this often (a send on the same
    # process wakes them at once).
    outbox_poll_seconds: float = 1.0
    # Retry backoff: base * 2**attempts with jitter, capped; a delivery
    # still failing after outbox_dead_seconds (24 h, as promised to bot
    # authors) is dead-lettered: logged, counted and dropped.
    outbox_retry_base_seconds: float = 1.0
    outbox_retry_max_seconds: float = 600.0
    outbox_dead_seconds: float = 86400.0
    # One delivery attempt: a receiver that has not answered by then is
    # retried later.
    outbox_timeout_seconds: float = 10.0

    log_level: str = 'INFO'
    # One JSON object per log line, for log shippers.
    log_json: bool = False

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return 'sqlite:///' + str(self.data_path / 'postbox.db')

    @property
    def attachments_path(self) -> Path:
        return self.data_path / 'attachments'


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type."""


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name, value):
    default = FIELDS[name].default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ('1', 'true', 'yes', 'on'):
                    return True
                if value.lower() in ('0', 'false', 'no', 'off', ''):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(',') if v.strip()]
            return tuple(str(v) for v in value or ())
        return '' if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f'setting {name!r}: bad value {value!r}') from None


def load_config(path=None, env=None, **overrides) -> Config:
    """Build a Config from defaults, the YAML file at ``path`` (optional),
    ``POSTBOX_<NAME>`` environment variables and keyword overrides, in
    increasing order of precedence. Raises ConfigError on bad input."""
    env = os.environ if env is None else env
    values = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f'{path}: expected a mapping')
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigError(f'{path}: unknown setting {key!r}')
            values[key] = _coerce(key, value)
    for name in FIELDS:
        key = 'POSTBOX_' + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key])
    for name, value in overrides.items():
        if name not in FIELDS:
            raise ConfigError(f'unknown setting {name!r}')
        values[name] = _coerce(name, value)
    config = Config(**values)
    try:
        for value in config.trusted_proxies:
            ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f'trusted_proxies: {exc}') from None
    if config.sqlite_synchronous.upper() not in ('OFF', 'NORMAL', 'FULL',
                                                 'EXTRA'):
        raise ConfigError('sqlite_synchronous: OFF, NORMAL, FULL or EXTRA')
    if config.secret:
        check_secret(config.secret)
    return config


def check_secret(secret: str):
    """Raises ConfigError for a configured secret too short to sign
    tokens with (anyone could guess it offline from one token)."""
    if len(secret.encode()) < SECRET_MIN_BYTES:
        raise ConfigError(
            f'secret: at least {SECRET_MIN_BYTES} bytes (it signs every '
            f'token; this one has {len(secret.encode())}). Leave it empty '
            'to have one generated in data_dir, or make one with: python3 '
            '-c "import secrets; print(secrets.token_urlsafe(48))"')


def ensure_secret(config: Config) -> str:
    """Return the JWT secret: the configured one (ConfigError if it is
    shorter than SECRET_MIN_BYTES), or one generated once and kept in
    ``data_dir/secret`` so tokens survive restarts. A file that is empty
    or too short (a crash while it was written, an edit by hand) is
    replaced by a new secret, logged: tokens signed with the old one stop
    working, which is better than every login failing or a guessable key."""
    if config.secret:
        check_secret(config.secret)
        return config.secret
    path = config.data_path / 'secret'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, 'r+') as f:
        # Locked while read and, if need be, written: two processes
        # starting together agree on one secret, and neither reads the
        # file half written.
        fcntl.flock(f, fcntl.LOCK_EX)
        value = f.read().strip()
        if len(value.encode()) >= SECRET_MIN_BYTES:
            return value
        if value:
            log.warning('%s holds a secret of %d bytes, under %d: replaced '
                        'by a new one (earlier tokens stop working)', path,
                        len(value.encode()), SECRET_MIN_BYTES)
        else:
            log.warning('%s is missing or empty: generated a new secret',
                        path)
        value = secrets.token_urlsafe(48)
        f.seek(0)
        f.truncate()
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    return value
