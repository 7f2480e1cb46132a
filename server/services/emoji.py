"""Whether a string is exactly one emoji: what a reaction may be."""
from server.errors import Invalid

EMOJI_MAX = 32  # characters: the longest tag or ZWJ sequences are ~14

# Code points that are emoji on their own (Unicode's Extended_Pictographic,
# by blocks): the misc symbols, dingbats, arrows and the emoji planes.
_PICTOGRAPHIC = ((0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C),
                 (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
                 (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B),
                 (0x2328, 0x2328), (0x23CF, 0x23CF), (0x23E9, 0x23F3),
                 (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
                 (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE),
                 (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07),
                 (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
                 (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297),
                 (0x3299, 0x3299), (0x1F000, 0x1F1E5), (0x1F200, 0x1F3FA),
                 (0x1F400, 0x1FAFF))
_VS16, _ZWJ, _KEYCAP = 0xFE0F, 0x200D, 0x20E3


def _pictographic(cp) -> bool:
    return any(lo <= cp <= hi for lo, hi in _PICTOGRAPHIC)


def _is_emoji_element(cps) -> bool:
    """One element of a ZWJ sequence: a pictographic code point, then
    optionally VS16, a skin tone, or (a black flag) a tag sequence."""
    if not cps or not _pictographic(cps[0]):
        return False
    rest = cps[1:]
    if rest[:1] == [_VS16]:
        rest = rest[1:]
    if rest and 0x1F3FB <= rest[0] <= 0x1F3FF:
        rest = rest[1:]
    if rest and cps[0] == 0x1F3F4:  # subdivision flags: tags, then cancel
        return (rest[-1] == 0xE007F and len(rest) > 1 and
                all(0xE0020 <= c <= 0xE007E for c in rest[:-1]))
    return not rest


def is_emoji(text) -> bool:
    """Whether ``text`` is exactly one emoji (one grapheme cluster of
    emoji code points): a pictographic code point with its modifiers, a
    ZWJ sequence of those, a flag (two regional indicators) or a keycap.
    No library: the rules are few and stable, the code points a table."""
    cps = [ord(c) for c in text]
    if len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps):
        return True
    if cps and chr(cps[0]) in '0123456789#*' and cps[1:] in (
            [_VS16, _KEYCAP], [_KEYCAP]):
        return True
    elements, current = [], []
    for cp in cps:
        if cp == _ZWJ:
            elements.append(current)
            current = []
        else:
            current.append(cp)
    elements.append(current)
    return all(_is_emoji_element(e) for e in elements)


def check_emoji(value) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= EMOJI_MAX or \
            not is_emoji(value):
        raise Invalid('emoji: exactly one emoji')
    return value
