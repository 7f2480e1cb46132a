"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, started
with pg_ctl on a free port, removed when stopped. The Debian binaries live
under /usr/lib/postgresql/<version>/bin; as root the cluster runs as the
``postgres`` user (PostgreSQL refuses to run as root)."""
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import free_port


def bin_dir() -> Path:
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which('initdb')
    assert initdb, 'PostgreSQL is not installed (tests/run.sh installs it)'
    return Path(initdb).parent


class PostgresCluster:
    def __init__(self):
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
        # fsync off: a test cluster need not survive power loss, and the
        # suite runs much faster; max_connections covers several servers.
        options = (f'-p {self.port} -k {self.dir} '
                   "-c listen_addresses=127.0.0.1 -c fsync=off "
                   '-c synchronous_commit=off -c full_page_writes=off '
                   '-c max_connections=200')
        self._run(self.bin / 'pg_ctl', '-D', self.data, '-l',
                  self.dir / 'pg.log', '-o', options, '-w', '-t', '60',
                  'start')
        self.started = True
        return self

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
