"""A ``json``-like module on orjson for python-socketio, Engine.IO
(``AsyncServer(json=...)``) and the HTTP API: several times faster than the
stdlib module for the small packets of a chat. ``dumps`` falls back to the
stdlib for what orjson refuses (integers beyond 64 bits, keys that are not
strings). ``loads`` is orjson's alone: it refuses NaN and Infinity, and
reads an integer beyond 64 bits as a float (the checks then refuse it as
not an integer)."""
import json as _json

import orjson

JSONDecodeError = ValueError


def dumps(obj, **kwargs) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return _json.dumps(obj, separators=(',', ':'))


def loads(data, **kwargs):
    return orjson.loads(data)
