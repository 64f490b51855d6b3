"""Unicode normalization, removal of control / garbled characters, whitespace normalization.

:func:`normalize_text` applies, in order:

1. NFKC (full-width Latin letters and digits become ASCII, compatibility ligatures are split;
   note that full-width Chinese punctuation such as ``，！？：`` becomes its ASCII form, while
   ``。、「」`` have no compatibility mapping and stay).
2. Removal of control characters (category Cc, except tab and newline) and invisible format
   characters (Cf: zero-width space, BOM, soft hyphen, bidi marks; ZWJ/ZWNJ are kept because they
   change how emoji and Indic / Persian scripts render).
3. Removal of *garbled* characters, which are counted: U+FFFD (decoding failures upstream), lone
   surrogates, private-use and unassigned code points. Mojibake sequences (UTF-8 read as
   Latin-1/cp1252, e.g. ``Ã©`` or ``â€™``) are counted as garbled too but not rewritten.
4. Whitespace: every Unicode space becomes ``' '``, ``\\r\\n`` / ``\\r`` / U+2028 / U+2029 become
   ``'\\n'``, runs of spaces and tabs collapse to one space, lines are stripped, more than one blank
   line collapses to one (paragraph breaks survive), and the text is stripped.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata

import numpy as np

_KEPT_FORMAT_CHARACTERS = {"\u200c", "\u200d"}  # ZWNJ, ZWJ
_MOJIBAKE = re.compile("[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac[\u0080-\u00bf\u2018-\u201e\u2122\u0153\u017e]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\u0085\u000b\u000c]")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


# Code point classes of _tables().
_KEEP, _REMOVE, _GARBLED = 0, 1, 2
# Planes scanned with unicodedata; planes 4-13 have no assigned characters (as of Unicode 16) and
# planes 15-16 are private use, so every code point there is garbled.
_SCANNED_RANGES = ((0, 0x40000), (0xE0000, 0xF0000))


@functools.cache
def _tables() -> np.ndarray:
    """uint8[sys.maxunicode + 1]: what step 2 / 3 does with each code point (built once, ~0.2 s)."""
    table = np.full(sys.maxunicode + 1, _GARBLED, dtype=np.uint8)
    category = unicodedata.category
    for start, end in _SCANNED_RANGES:
        for codepoint in range(start, end):
            character = chr(codepoint)
            kind = category(character)
            if kind in ("Cs", "Co", "Cn") or codepoint == 0xFFFD:
                continue
            if (kind == "Cc" and character not in "\t\n\r\x0b\x0c\x85") or (
                kind == "Cf" and character not in _KEPT_FORMAT_CHARACTERS
            ):
                table[codepoint] = _REMOVE
            else:
                table[codepoint] = _KEEP
    return table


def prepare() -> None:
    """Build the lookup table now: called before worker processes are forked, they inherit it
    instead of each building their own."""
    _tables()


def normalize_text(text: str) -> tuple[str, int]:
    """Return ``(normalized text, number of garbled characters / mojibake sequences found)``."""
    mojibake = len(_MOJIBAKE.findall(text))  # before NFKC, which folds e.g. the U+00A0 of "Ã\u00a0" (à)
    text = unicodedata.normalize("NFKC", text)
    # One table lookup per code point: a regular expression over the hundreds of ranges of
    # unassigned code points took most of the cleaning time.
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    actions = _tables()[codes]
    garbled = int(np.count_nonzero(actions == _GARBLED))
    if actions.any():
        text = codes[actions == _KEEP].tobytes().decode("utf-32-le")
    text = _LINE_BREAKS.sub("\n", text)
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip(), garbled + mojibake


_NON_WORD = re.compile(r"[\W_]+")


def dedup_key(text: str) -> str:
    """The text as compared by exact dedup: lower-cased, whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def word_characters(text: str) -> str:
    """Lower-cased text with every run of non-word characters (spaces, punctuation) replaced by one space."""
    return _NON_WORD.sub(" ", text.lower()).strip()
