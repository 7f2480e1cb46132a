"""The SQL of users: accounts and bots, sign-in and token revocation
reads and writes, and the public columns the serialisers load. Run inside
the writer's transaction or on a reader thread; the rules (who may sign
in, which tokens count) are ``server.services.auth``."""
from typing import NamedTuple

import peewee

from models import User
from server.data.database import chunks, dialect, execute, placeholders


def username_taken(username) -> bool:
    return User.select().where(User.username == username).exists()


def create(username, display_name, password_hash, is_bot, owner_id, now):
    """The new user row, or None if the username is taken (another process
    took it just now)."""
    try:
        return User.create(username=username, display_name=display_name,
                           password_hash=password_hash, is_bot=is_bot,
                           owner=owner_id, created_at=now)
    except peewee.IntegrityError:
        return None


def lock(user_id):
    """Lock the user's row for the rest of the transaction (a no-op where
    the writer holds the database's write lock)."""
    dialect().lock_rows('user', [user_id])


def get(user_id):
    """The user row, or None."""
    return User.get_or_none(User.id == user_id)


def person(username):
    """The row of the user (not a bot) called ``username``, or None."""
    return (User.select().where(User.username == username,
                                User.is_bot == False)  # noqa: E712
            .first())


class AuthRow(NamedTuple):
    id: int
    username: str
    display_name: str
    is_bot: bool
    tokens_valid_after: int


def valid_after(user_ids) -> dict:
    """{user id: tokens_valid_after} of those of ``user_ids`` that exist."""
    found = {}
    for chunk in chunks(sorted(user_ids)):
        found.update(execute(
            'SELECT "id", "tokens_valid_after" FROM "user" WHERE "id" IN '
            f'({placeholders(chunk)})', chunk).fetchall())
    return found


def auth_row(user_id):
    """The user's id, username, display_name, is_bot and
    tokens_valid_after, or None. Read on every HTTP request: plain SQL,
    which costs a reader thread a quarter of Peewee's query building."""
    row = execute('SELECT "id", "username", "display_name", "is_bot", '
                  '"tokens_valid_after" FROM "user" WHERE "id" = ?',
                  (user_id,)).fetchone()
    return AuthRow(*row) if row is not None else None


def bot_row(username):
    """(id, is_bot, owner id) of ``username``, or None."""
    return (User.select(User.id, User.is_bot, User.owner)
            .where(User.username == username).tuples().first())


def password_hash(user_id):
    """The user's password hash (None: no password, or no such user)."""
    return User.select(User.password_hash).where(User.id == user_id).scalar()


def bots_of(owner_id) -> list:
    """Ids of the bots ``owner_id`` owns."""
    return [i for (i,) in User.select(User.id)
            .where(User.owner == owner_id).tuples()]


def revoke_tokens(user_ids, at, password_hash=None):
    """Tokens of ``user_ids`` issued up to ``at`` (ms) stop counting; and
    a new password hash for them, if given."""
    changes = {User.tokens_valid_after: at}
    if password_hash is not None:
        changes[User.password_hash] = password_hash
    User.update(changes).where(User.id.in_(list(user_ids))).execute()


class UserRow(NamedTuple):
    """The public columns of a user row (read with plain SQL)."""
    id: int
    username: str
    display_name: str
    is_bot: bool


def public_rows(user_ids) -> list:
    """The UserRows of those of ``user_ids`` that exist. Plain rows:
    Peewee's model objects cost ten times the query."""
    return [UserRow(*row) for row in execute(
        'SELECT "id", "username", "display_name", "is_bot" FROM "user" '
        f'WHERE "id" IN ({placeholders(user_ids)})',
        list(user_ids)).fetchall()]
