"""The fold: the form in which message text is searched, and what the
words of a query ask of it (``models/search.py`` keeps the index).

``fold(text)`` drops accents, folds case, unifies compatibility forms,
turns punctuation into spaces and pads the result with one space each
side; the search index's triggers run it on every message written.

Matching (``patterns``): every word of the query must occur in the folded
text. A word of 3 or more characters may occur anywhere (inside longer
words too); a shorter one must start a word, unless it is in a script
written without spaces (Chinese, Japanese, Korean, Thai, ...), where it
may occur anywhere.
"""
import re
import unicodedata

# Combining marks that are accents on Latin, Greek and Cyrillic letters
# (the blocks NFKD moves them to). Marks of other scripts (Japanese voicing
# marks, Indic vowel signs, Thai vowels) are part of the letter and stay.
_ACCENTS = dict.fromkeys(
    [*range(0x0300, 0x0370), *range(0x1AB0, 0x1B00), *range(0x1DC0, 0x1E00),
     *range(0x20D0, 0x2100), *range(0xFE20, 0xFE30)])
# Punctuation, separators and control characters become spaces (only the
# basic multilingual plane: punctuation beyond it is rare).
_SEPARATORS = {cp: ' ' for cp in range(0x10000)
               if unicodedata.category(chr(cp))[0] in 'PZ' or
               unicodedata.category(chr(cp)) == 'Cc'}
# Scripts written without spaces between words: a short word there may
# occur anywhere.
_SPACELESS = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1100, 0x11FF),
              (0x1780, 0x17FF), (0x2E80, 0x9FFF), (0xA960, 0xA97F),
              (0xAC00, 0xD7FF), (0xF900, 0xFAFF), (0xFF66, 0xFFDC),
              (0x20000, 0x3FFFF))
def _fold_text(text):
    text = unicodedata.normalize('NFKD', text).translate(_ACCENTS)
    return unicodedata.normalize('NFKC', text.casefold()).translate(
        _SEPARATORS)


# The fold of each character of the basic multilingual plane that it
# changes, for one str.translate. On NFC text (what people type) folding
# character by character gives the same as folding the whole text, at a
# tenth of the cost: the triggers run it on every message sent.
_FOLDED = {cp: _fold_text(chr(cp)) for cp in range(0x10000)
           if not 0xD800 <= cp < 0xE000 and _fold_text(chr(cp)) != chr(cp)}


# Characters whose fold starts with a combining mark (halfwidth voiced
# marks, ...): it may compose with what precedes, so such text is folded
# whole.
_COMPOSING = re.compile('[%s]' % ''.join(
    re.escape(chr(cp)) for cp, folded in _FOLDED.items()
    if folded and unicodedata.category(folded[0]).startswith('M')))


def fold(text):
    """The searchable form of ``text``; None stays None."""
    if text is None:
        return None
    if text.isascii() or (unicodedata.is_normalized('NFC', text) and
                          max(text) < '\U00010000' and
                          not _COMPOSING.search(text)):
        text = text.translate(_FOLDED)
    else:
        text = _fold_text(text)
    return ' ' + ' '.join(text.split()) + ' '


def _spaceless(char) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _SPACELESS)


def patterns(folded_query) -> list:
    """The substrings a message's folded text must all contain, from a
    folded query: each word, with a leading space (it must start a word)
    when it is shorter than 3 characters and not in a spaceless script."""
    found = []
    for word in folded_query.split():
        if len(word) < 3 and not _spaceless(word[0]):
            word = ' ' + word
        if word not in found:
            found.append(word)
    return found
