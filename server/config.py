"""Configuration: embedded defaults, an optional YAML file, then ``POSTBOX_*``
environment variables (which win).

``load_config(path=None, env=os.environ) -> Config`` validates everything once;
the rest of the code reads typed attributes and never looks at the
environment itself.

The settings, their defaults and the reasons for them are the data file
``defaults.yaml`` beside this module; ``Config`` is made from it, so each
setting is declared once.
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


# Every setting, its default and the reason for it are declared once, in
# defaults.yaml beside this module (a data file operators can read).
DEFAULTS_PATH = Path(__file__).with_name('defaults.yaml')
# The most write_gather_ms may be: it is added to a write's wait.
GATHER_MS_MAX = 50.0


def _defaults() -> dict:
    with open(DEFAULTS_PATH) as f:
        defaults = yaml.safe_load(f)
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in defaults.items()}


class _Paths:
    """The places on disk that follow from the settings."""

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


Config = dataclasses.make_dataclass(
    'Config',
    [(name, type(value), value) for name, value in _defaults().items()],
    bases=(_Paths,), frozen=True,
    namespace={'__module__': __name__, '__doc__': (
        'Every setting of defaults.yaml as a typed, frozen attribute.')})


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
    if not 0 <= config.write_gather_ms <= GATHER_MS_MAX:
        raise ConfigError(f'write_gather_ms: 0 to {GATHER_MS_MAX:g} '
                          '(each write may wait this long)')
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
