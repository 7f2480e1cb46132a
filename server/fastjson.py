"""A ``json``-like module on orjson for python-socketio, Engine.IO
(``AsyncServer(json=...)``) and the HTTP API: several times faster than the
stdlib module for the small packets of a chat. ``dumps`` falls back to the
stdlib for what orjson refuses (integers beyond 64 bits, keys that are not
strings). ``loads`` is orjson's alone: it refuses NaN and Infinity, and
reads an integer beyond 64 bits as a float (the checks then refuse it as
not an integer). ``fragment`` serializes a part of an answer once, for a
cache to keep: a 5,000-room inbox from cached fragments is a few copies
instead of walking 400,000 objects again (20 ms on the bench server)."""
import json as _json

import orjson

JSONDecodeError = ValueError


def dumps(obj, **kwargs) -> str:
    """``dumps_bytes`` as a str (what python-socketio's packets take)."""
    return dumps_bytes(obj).decode()


def dumps_bytes(obj) -> bytes:
    """``obj``'s JSON as UTF-8 bytes, for senders that take bytes: for an
    answer of megabytes (a big inbox), decoding to a str and encoding it
    back is several times the cost of serializing it."""
    try:
        return orjson.dumps(obj, default=_as_fragment)
    except TypeError:
        return _json.dumps(obj, separators=(',', ':'),
                           default=_as_value).encode()


class Serialized:
    """A part of an answer serialized once (``fragment``): ``dumps``
    copies its JSON as it is."""

    __slots__ = ('raw', 'fragment')

    def __init__(self, raw: bytes):
        self.raw = raw
        self.fragment = orjson.Fragment(raw)


def fragment(obj):
    """``obj`` serialized once, for a cache to keep and answers to reuse
    (``Serialized``). None stays None."""
    if obj is None:
        return None
    return Serialized(dumps_bytes(obj))


def _as_fragment(obj):
    if type(obj) is Serialized:
        return obj.fragment
    raise TypeError(f'{type(obj).__name__} is not JSON serializable')


def _as_value(obj):
    """For the stdlib encoder (orjson refused something else)."""
    if type(obj) is Serialized:
        return _json.loads(obj.raw)
    raise TypeError(f'{type(obj).__name__} is not JSON serializable')


def loads(data, **kwargs):
    return orjson.loads(data)
