import pytest

from tests.helpers import ServerProcess


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    """One real Postbox process (SQLite) shared by the tests of a session;
    tests keep apart by registering users of their own."""
    proc = ServerProcess(tmp_path_factory.mktemp('postbox'))
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


@pytest.fixture
def base(server):
    return server.url
