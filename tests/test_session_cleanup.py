"""The test session's own hygiene: a server that a test started and never
stopped (it failed before its own stop) does not outlive pytest. Checked
by running such a test in a pytest session of its own."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.kit import ROOT

LEAKING_TEST = '''
import sys

from tests.kit import Process, free_port


def test_fails_before_its_stop(tmp_path):
    port = free_port()
    proc = Process([sys.executable, '-m', 'http.server', '--bind',
                    '127.0.0.1', str(port)], tmp_path / 'log',
                   port=port).start()
    with open({pid_file!r}, 'w') as f:
        f.write(str(proc.pid))
    assert False, 'failed before its stop'
'''


def running(pid) -> bool:
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1]
    except FileNotFoundError:
        return False
    return state.split()[0] != 'Z'


def test_a_process_left_running_by_a_failed_test_ends_with_the_session(
        tmp_path):
    session = tmp_path / 'session'
    session.mkdir()
    pid_file = tmp_path / 'pid'
    (session / 'conftest.py').write_text(
        'from tests.conftest import stop_leftover_processes  # noqa: F401\n')
    (session / 'test_leak.py').write_text(
        textwrap.dedent(LEAKING_TEST).format(pid_file=str(pid_file)))
    try:
        run = subprocess.run(
            [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
             str(session)], cwd=session, capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert '1 failed' in run.stdout, run.stdout + run.stderr
        pid = int(pid_file.read_text())
        assert not running(pid), 'the leaked process outlived its session'
    finally:
        if pid_file.exists() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
