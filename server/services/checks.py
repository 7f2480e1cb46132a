"""Checks of payload values shared by several services: each returns the
value when it is well formed and raises Invalid (naming the field) if not."""
import unicodedata

from server.errors import Invalid

# Characters refused in names other people see (display names, group
# names): they let a name impersonate another or hide (bidi embeddings,
# overrides and isolates reorder the text around them, zero-width
# characters make two names look the same or a name look blank) or break
# storage (NUL is refused by PostgreSQL). Refused rather than stripped, so
# the name shown is always the one typed.
_HIDDEN_CHARS = frozenset(
    [0x061C, 0x180E, 0xFEFF] + list(range(0x200B, 0x2010))
    + list(range(0x202A, 0x202F)) + list(range(0x2060, 0x2065))
    + list(range(0x2066, 0x206A)))
# Control characters, lone surrogates, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset(['Cc', 'Cs', 'Zl', 'Zp'])


def check_text(value, name, least, most) -> str:
    """``value`` if it is a string of ``least`` to ``most`` characters."""
    if not isinstance(value, str) or not least <= len(value) <= most:
        raise Invalid(f'{name}: a string of {least} to {most} characters')
    return value


def check_shown_name(value, name, most) -> str:
    """``value`` without surrounding spaces, if that is 1 to ``most``
    characters with no control, bidi-control or zero-width character."""
    if not isinstance(value, str):
        raise Invalid(f'{name} must be a string')
    value = value.strip()
    if not 1 <= len(value) <= most:
        raise Invalid(f'{name}: 1 to {most} characters')
    for char in value:
        if ord(char) in _HIDDEN_CHARS or \
                unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise Invalid(f'{name}: no control, direction or zero-width '
                          f'characters (U+{ord(char):04X})')
    return value
