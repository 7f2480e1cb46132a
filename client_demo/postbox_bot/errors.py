"""The errors a bot sees: the server's error codes, as exceptions."""

# Error codes worth retrying a send for, with the same client_msg_id
# (rate_limited is retried for a time budget rather than a count).
RETRYABLE = ('unavailable', 'rate_limited', 'internal')


class BotError(Exception):
    """A request the server refused: ``code`` is the contract's error code
    (``status`` the HTTP status, for an HTTP request)."""

    def __init__(self, code, message='', retry_after=None, status=None):
        super().__init__(f'{code}: {message}' if message else code)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.status = status


class LoginFailed(BotError):
    """The username and password were refused: retrying will not help."""


class Disconnected(BotError):
    """``unavailable``: the connection dropped before the request's answer
    (``send`` retries it on the next connection at once)."""
