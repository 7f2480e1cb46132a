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


@pytest.fixture(scope='session')
def loaded(tmp_path_factory):
    """A server without the per-user send rate limit, for load-shaped
    tests (many sends from one user)."""
    proc = ServerProcess(tmp_path_factory.mktemp('postbox-loaded'), env={
        'POSTBOX_SEND_RATE_PER_SECOND': '100000',
        'POSTBOX_SEND_BURST': '100000'})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()
