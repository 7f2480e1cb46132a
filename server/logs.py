"""Logging setup: plain lines for a terminal, one JSON object per line when
``config.log_json`` is set (for log shippers), and a request id that ties
the lines of one HTTP request or Socket.IO event together.

What goes into a record is chosen by the caller through ``extra``: user id,
sid, client address, event name, error code. Never passwords, tokens or
message bodies.
"""
import asyncio
import contextvars
import io
import itertools
import json
import logging
import secrets
import sys
import time

from aiohttp.http_exceptions import HttpProcessingError

request_id = contextvars.ContextVar('request_id', default=None)

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = set(vars(logging.LogRecord('', 0, '', 0, '', (), None))) | {
    'message', 'asctime', 'taskName'}


# A random prefix per process and a counter: unique across processes and
# restarts, and without a urandom syscall per event (which showed up in
# profiles under load).
_PREFIX = secrets.token_hex(3)
_counter = itertools.count(1)


def new_request_id() -> str:
    """A short unique id, set for the current task and returned."""
    value = f'{_PREFIX}{next(_counter):x}'
    request_id.set(value)
    return value


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        if not hasattr(record, 'request_id'):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...extra, "exc"?}``."""

    def format(self, record):
        data = {
            'time': time.strftime('%Y-%m-%dT%H:%M:%S',
                                  time.gmtime(record.created))
            + '.%03dZ' % record.msecs,
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                data[key] = value
        if record.exc_info:
            data['exc'] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the ``extra`` fields appended as key=value."""

    def format(self, record):
        line = super().format(record)
        fields = [f'{k}={v}' for k, v in vars(record).items()
                  if k not in _STANDARD and v is not None]
        if fields:
            head, sep, tail = line.partition('\n')
            line = head + ' ' + ' '.join(fields) + sep + tail
        return line


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a malformed Content-Length,
    a header line too long) as an ERROR with a traceback; anyone can send
    those, so they would flood the log. They become one DEBUG line (the
    client got its 400)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args = '%s: %s', (record.getMessage(), exc)
        record.levelno, record.levelname = logging.DEBUG, 'DEBUG'
        record.exc_info = record.exc_text = None
        return True


def setup_logging(config):
    """Configure the root logger from ``log_level`` and ``log_json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if config.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(
            '%(asctime)s %(levelname)s %(name)s: %(message)s'))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
    server_log = logging.getLogger('aiohttp.server')
    if not any(isinstance(f, _BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(_BadRequestFilter())


def dump_tasks_on(signum):
    """On ``signum``, log every asyncio task of the running loop with
    where it waits: what a process that will not stop is waiting for (the
    test kit asks before it kills one; ``kill -USR2 <pid>`` by hand). Call
    from inside the loop."""
    def dump():
        out = io.StringIO()
        tasks = asyncio.all_tasks()
        for task in tasks:
            task.print_stack(limit=12, file=out)
        logging.getLogger(__name__).warning(
            '%s asyncio tasks:\n%s', len(tasks), out.getvalue())

    asyncio.get_running_loop().add_signal_handler(signum, dump)
