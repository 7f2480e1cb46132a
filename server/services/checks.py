"""Checks of payload values shared by several services: each returns the
value when it is well formed and raises Invalid (naming the field) if not."""
from server.errors import Invalid


def check_text(value, name, least, most) -> str:
    """``value`` if it is a string of ``least`` to ``most`` characters."""
    if not isinstance(value, str) or not least <= len(value) <= most:
        raise Invalid(f'{name}: a string of {least} to {most} characters')
    return value
