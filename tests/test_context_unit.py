"""The process context and its caches (server/services/context.py), in
process: bounded, least recently used out first, safe from several threads,
and nothing attached to the context after it is built."""
import dataclasses
import threading

import pytest

from server.config import Config
from server.services.context import Context, LruCache, RoomCache


def test_cache_keeps_the_most_recently_used():
    cache = LruCache(3)
    for key in 'abc':
        cache.put(key, key.upper())
    assert cache.get('a') == 'A'  # a is now the most recently used
    cache['d'] = 'D'
    assert len(cache) == 3
    assert 'b' not in cache and cache.get('b') is None
    assert [cache[k] for k in 'acd'] == ['A', 'C', 'D']
    with pytest.raises(KeyError):
        cache['b']
    assert cache.pop('a') == 'A' and cache.pop('a') is None


def test_cache_stays_bounded_under_threads():
    cache = LruCache(100)
    errors = []

    def churn(offset):
        try:
            for i in range(5000):
                cache.put(offset + i, i)
                cache.get(offset + i // 2)
                cache.pop(offset + i - 7)
        except Exception as exc:  # pragma: no cover - the failure
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n * 10**6,))
               for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) <= 100


def test_forgetting_a_room_moves_the_epoch():
    rooms = RoomCache(10)
    rooms[1] = 'info'
    epoch = rooms.epoch
    rooms.forget(1)
    assert 1 not in rooms and rooms.epoch == epoch + 1


def test_context_is_built_once():
    config = Config(user_cache_entries=5, room_cache_entries=7,
                    argon2_concurrency=3)
    ctx = Context(None, config, 'secret')
    assert (ctx.users.size, ctx.rooms.size) == (5, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.limits = object()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.anything_new = 1
    ctx.outbox_wake()  # no dispatcher yet: nothing happens
    woken = []
    ctx.outbox_wake.hook = lambda: woken.append(True)
    ctx.outbox_wake()
    assert woken == [True]
