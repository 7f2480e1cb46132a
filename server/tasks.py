"""Background loops that end when their task is cancelled.

A loop that retries on ``except Exception`` (Redis away, a receiver
down) must still end when it is cancelled. Usually the cancellation
arrives as ``CancelledError`` and passes such a handler by. But one that
lands just as a call's own ``asyncio.timeout`` expires can come out of
that call as a ``TimeoutError`` (Python 3.11), which the handler takes
for one more failure: the loop went on, and the ``stop()`` waiting for
it waited until the process was killed. Such loops test ``cancelled()``
instead of looping on ``while True``.
"""
import asyncio


def cancelled() -> bool:
    """True once the running task was asked to stop (``Task.cancel``),
    however that cancellation came out of the call it interrupted."""
    return asyncio.current_task().cancelling() > 0
