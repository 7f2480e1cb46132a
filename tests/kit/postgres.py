"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb into a
temp dir, started with pg_ctl on a free port, removed when stopped. The
Debian binaries live under /usr/lib/postgresql/<version>/bin; as root the
cluster runs as the ``postgres`` user (PostgreSQL refuses to run as
root)."""
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.kit.processes import free_port


def bin_dir() -> Path:
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which('initdb')
    assert initdb, 'PostgreSQL is not installed (tests/run.sh installs it)'
    return Path(initdb).parent


class PostgresCluster:
    """``settings`` override the server settings below, e.g.
    ``synchronous_commit='on'`` where a crash (``restart('immediate')``)
    must not lose acknowledged commits."""

    def __init__(self, **settings):
        # fsync off: a test cluster need not survive power loss (a crash
        # of the server keeps what it wrote, in the OS's cache), and the
        # suite runs much faster; synchronous_commit off too, unless a test
        # crashes the server; max_connections covers several servers.
        self.settings = {'listen_addresses': '127.0.0.1', 'fsync': 'off',
                         'synchronous_commit': 'off',
                         'full_page_writes': 'off', 'max_connections': 200,
                         **settings}
        self.bin = bin_dir()
        self.port = free_port()
        self.user = 'postgres' if os.getuid() == 0 else None
        # Not under pytest's tmp dir: that one is private to the current
        # user and the postgres user could not enter it.
        self.dir = Path(tempfile.mkdtemp(prefix='postbox-pg-'))
        self.data = self.dir / 'data'
        self.started = False
        self._n = 0

    def _run(self, *args, **kwargs):
        cmd = [str(a) for a in args]
        if self.user:
            cmd = ['runuser', '-u', self.user, '--'] + cmd
        return subprocess.run(cmd, check=True, capture_output=True, **kwargs)

    def start(self):
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run(self.bin / 'initdb', '-D', self.data, '-U', 'postgres',
                  '-A', 'trust', '-E', 'UTF8', '--no-sync')
        self.resume()
        return self

    @property
    def _options(self) -> str:
        return f'-p {self.port} -k {self.dir} ' + ' '.join(
            f'-c {name}={value}' for name, value in self.settings.items())

    def _pg_ctl(self, *args):
        self._run(self.bin / 'pg_ctl', '-D', self.data, '-l',
                  self.dir / 'pg.log', '-o', self._options, '-w', '-t', '60',
                  *args)

    def restart(self, mode='fast'):
        """``pg_ctl restart -m mode`` (fast: sessions are terminated;
        immediate: no clean shutdown, crash recovery on start). Returns
        when the server accepts connections again."""
        self._pg_ctl('-m', mode, 'restart')

    def pause(self, mode='fast'):
        """Stop the server, keeping its data, until ``resume``."""
        self._pg_ctl('-m', mode, 'stop')
        self.started = False

    def resume(self):
        """Start the server (again); returns once it accepts
        connections."""
        self._pg_ctl('start')
        self.started = True

    def create_database(self, name=None) -> str:
        """A new empty database; returns its URL."""
        self._n += 1
        name = name or f'postbox{self._n}'
        self._run(self.bin / 'createdb', '-h', '127.0.0.1', '-p', self.port,
                  '-U', 'postgres', name)
        return f'postgresql://postgres@127.0.0.1:{self.port}/{name}'

    def stop(self):
        if self.started:
            self._run(self.bin / 'pg_ctl', '-D', self.data, '-m', 'fast',
                      '-w', 'stop')
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
