import os

import pytest

from tests.kit import NO_RATE_LIMITS, Process, ServerProcess


@pytest.fixture(scope='session', autouse=True)
def stop_leftover_processes():
    """At the end of the session (after every other fixture's teardown),
    stop the servers and other processes that tests started and never
    stopped: a test that fails before its own stop would otherwise leave
    them running after pytest has exited."""
    yield
    for proc in list(Process.live):
        proc.kill()  # what is left of a failed test: no drain to wait for


@pytest.fixture(scope='session')
def database_env():
    """Returns a function giving the env of a fresh database: SQLite in
    the data dir by default, a database in a throwaway PostgreSQL cluster
    with POSTBOX_TEST_DB=postgres (tests/run.sh runs the core suite both
    ways)."""
    if os.environ.get('POSTBOX_TEST_DB') != 'postgres':
        yield dict
        return
    from tests.kit.postgres import PostgresCluster
    cluster = PostgresCluster().start()
    yield lambda: {'POSTBOX_DATABASE_URL': cluster.create_database()}
    cluster.stop()


@pytest.fixture(scope='session')
def server(tmp_path_factory, database_env):
    """One real Postbox process shared by the tests of a session; tests
    keep apart by registering users of their own."""
    proc = ServerProcess(tmp_path_factory.mktemp('postbox'),
                         env=database_env())
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


@pytest.fixture
def base(server):
    return server.url


@pytest.fixture(scope='session')
def loaded(tmp_path_factory, database_env):
    """A server without per-user rate limits, for load-shaped tests (many
    events from one user)."""
    proc = ServerProcess(tmp_path_factory.mktemp('postbox-loaded'),
                         env={**NO_RATE_LIMITS, **database_env()})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.read_log()


@pytest.fixture(scope='module')
def pg_cluster():
    """A throwaway PostgreSQL cluster for the tests of one module (each
    takes a database of its own with ``create_database()``)."""
    from tests.kit.postgres import PostgresCluster
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=['sqlite', 'postgres'])
def database_url(request, tmp_path):
    """The URL of a fresh database, once of each backend: a SQLite file in
    the test's tmp_path, a database in the module's ``pg_cluster``."""
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path / "postbox.db"}'
    return request.getfixturevalue('pg_cluster').create_database()


@pytest.fixture(scope='module')
def redis(tmp_path_factory):
    """A real redis-server on a free port, for the tests of one module."""
    from tests.kit import RedisProcess
    proc = RedisProcess(tmp_path_factory.mktemp('redis')).start()
    yield proc
    proc.stop()
