"""Errors with a contract code. Services raise these; the transport turns
them into ``{ok: false, error: {code, message}}`` or a JSON HTTP error."""


class PostboxError(Exception):
    code = 'internal'
    status = 500

    def __init__(self, message=None, **extra):
        super().__init__(message or self.code.replace('_', ' '))
        self.message = message or self.code.replace('_', ' ')
        self.extra = extra

    def to_dict(self):
        return {'code': self.code, 'message': self.message, **self.extra}

    def http_headers(self) -> dict:
        """Headers an HTTP refusal carries besides its JSON body."""
        return {}

    def __reduce__(self):
        # Pickled as it is (the writer process sends refusals back), not
        # rebuilt through __init__, whose arguments differ by class.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls, args, state):
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class Invalid(PostboxError):
    """The payload breaks the contract: a field missing, of the wrong type
    or out of range."""
    code, status = 'invalid', 400


class Unauthorized(PostboxError):
    """No token, a bad or revoked one, or wrong credentials."""
    code, status = 'unauthorized', 401


class Forbidden(PostboxError):
    """The user may not do this here: not a member of the room, not its
    owner, blocked by the other user."""
    code, status = 'forbidden', 403


class NotFound(PostboxError):
    code, status = 'not_found', 404


class Conflict(PostboxError):
    """The name is taken, or the thing changed under the request (a
    ``client_msg_id`` reused for another message)."""
    code, status = 'conflict', 409


class TooLarge(PostboxError):
    """Past a size or count limit of the config: body, upload, members,
    reactions, subscriptions."""
    code, status = 'too_large', 413


class UnsupportedType(PostboxError):
    # Only uploads raise it: the contract's code list has no own code for a
    # refused file type, so it is 'invalid' with HTTP status 415.
    code, status = 'invalid', 415


class TooSlow(PostboxError):
    """A request body that stalled, or came too slowly to be a real one
    (HTTP 408; the contract's code list has no own code for it)."""
    code, status = 'invalid', 408


class RangeNotSatisfiable(PostboxError):
    """A byte range of a file that starts past its end (HTTP 416, with
    the file's size in ``Content-Range``; the contract's code list has no
    own code for it)."""
    code, status = 'invalid', 416

    def __init__(self, size):
        super().__init__(f'the range starts past the end of the file '
                         f'({size} bytes)')
        self.size = size

    def http_headers(self):
        return {'Content-Range': f'bytes */{self.size}'}


class RateLimited(PostboxError):
    code, status = 'rate_limited', 429

    def __init__(self, retry_after, message='too many requests'):
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after


class Unavailable(PostboxError):
    """The database or Redis does not answer, its disk is full, or the
    process is shutting down: the client may retry."""
    code, status = 'unavailable', 503


class Internal(PostboxError):
    code, status = 'internal', 500
