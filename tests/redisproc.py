"""Old import path of the Redis part of the test kit (``tests.kit.redis``),
kept for the test files that still import it from here."""
from tests.kit.processes import start_servers, stop_servers  # noqa: F401
from tests.kit.redis import (FAST_REDIS_ENV, DeafeningProxy,  # noqa: F401
                             RedisProcess)
