"""A real Redis Cluster for tests and benchmarks: ``primaries``
redis-server nodes (and as many replicas) on free loopback ports, in a temp
dir, nothing persisted but each node's cluster config (so a killed node
restarted on its port rejoins as itself), joined with ``redis-cli --cluster
create``."""
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.kit.redis import RedisProcess


class ClusterNode(RedisProcess):
    """One cluster-enabled redis-server."""

    # Long enough for a test to see a primary missing, short for tests.
    node_timeout_ms = 2000

    def options(self, port) -> list:
        return super().options(port) + [
            '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
            '--cluster-node-timeout', str(self.node_timeout_ms),
            # A replica copies its primary at once, not after 5 s: one
            # that never did refuses to take over when the primary dies.
            '--repl-diskless-sync-delay', '0']


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: both
    must be below 65536."""
    while True:
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(('127.0.0.1', p))
        except OSError:
            continue
        return port


def key_slot(key: str) -> int:
    """The cluster hash slot of ``key`` (CRC16 of its hash tag, mod 16384)."""
    start = key.find('{')
    if start >= 0:
        end = key.find('}', start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key.encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


class RedisCluster:
    def __init__(self, workdir, primaries=3, replicas=1):
        self.dir = Path(workdir)
        self.nodes = [ClusterNode(self.dir / f'node{i}', cluster_port())
                      for i in range(primaries * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The Postbox setting: every node as a seed."""
        return 'redis+cluster://' + ','.join(
            f'127.0.0.1:{n.port}' for n in self.nodes)

    def start(self, timeout=30):
        for node in self.nodes:
            node.start()
        cli = shutil.which('redis-cli')
        assert cli, 'no redis-cli (tests/run.sh installs it)'
        subprocess.run(
            [cli, '--cluster', 'create',
             *[f'127.0.0.1:{n.port}' for n in self.nodes],
             '--cluster-replicas', str(self.replicas), '--cluster-yes'],
            check=True, capture_output=True, timeout=timeout)
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout=30):
        """Until every running node says cluster_state:ok, all 16384
        slots are served by a primary that runs, and every running replica
        has copied its primary (a replica that never did is not promoted
        when its primary dies: "Disconnected from master for longer than
        allowed")."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                running = [n for n in self.nodes if n.proc is not None]
                if all('cluster_state:ok' in n.command('CLUSTER', 'INFO')
                       for n in running) and \
                        all(self.primary_for_slot(s) is not None
                            for s in (0, 8000, 16383)) and \
                        all(self.in_sync(n) for n in running):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, 'cluster not ok in time'
            time.sleep(0.1)

    @staticmethod
    def in_sync(node) -> bool:
        """A primary, or a replica whose link to its primary is up."""
        info = node.command('INFO', 'replication')
        return 'role:master' in info or 'master_link_status:up' in info

    def primary_for_slot(self, slot):
        """The running node that is a primary serving ``slot``, or None."""
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                if 'role:master' not in node.command('INFO', 'replication'):
                    continue
            except OSError:
                continue
            for line in node.command('CLUSTER', 'NODES').splitlines():
                if 'myself' not in line:
                    continue
                for part in line.split()[8:]:
                    if part.startswith('['):
                        continue
                    lo, _, hi = part.partition('-')
                    if int(lo) <= slot <= int(hi or lo):
                        return node
        return None

    def primary_for(self, key):
        return self.primary_for_slot(key_slot(key))

    def replica_of(self, primary):
        """A running replica of ``primary``, or None."""
        for node in self.nodes:
            if node is not primary and node.proc is not None and \
                    f'master_port:{primary.port}\r' in \
                    node.command('INFO', 'replication'):
                return node
        return None

    def failover(self, replica, timeout=30):
        """CLUSTER FAILOVER on ``replica`` (a graceful switch: its
        primary becomes its replica) and wait until it is the primary."""
        assert replica.command('CLUSTER', 'FAILOVER').startswith('+OK')
        deadline = time.monotonic() + timeout
        while 'role:master' not in replica.command('INFO', 'replication'):
            assert time.monotonic() < deadline, 'failover did not happen'
            time.sleep(0.05)
        self.wait_ok(timeout)

    def stop(self):
        for node in self.nodes:
            node.stop()
