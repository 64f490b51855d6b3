"""Stable 64-bit shingle hashes computed with numpy, without a Python loop per shingle.

Text is first reduced by :func:`~megatron_r1.corpus.normalize.word_characters` (lower case,
punctuation and whitespace runs -> one space). Then:

* ``char`` shingles: n-grams of the remaining characters with the spaces removed (used for
  Chinese and other CJK text, where there are no spaces between words);
* ``word`` shingles: n-grams of words;
* ``auto``: ``char`` when CJK characters (Han, kana, Hangul) are at least as many as the other
  words (the same rule as :mod:`~megatron_r1.corpus.langid`, computed on the code-point array),
  else ``word``.

A text with fewer than ``n`` units yields one shingle of all of them; an empty text yields none.

Hashing: each code point (char mode) or each word's polynomial hash (word mode, via prefix sums
over code points) is combined over an n-gram window with fixed odd 64-bit multipliers and passed
through the splitmix64 finalizer. All arithmetic is uint64 modulo 2**64, identical in every
process and on every run (Python's salted ``hash()`` is not used).
"""

from __future__ import annotations

import numpy as np

from megatron_r1.corpus.normalize import word_characters

SHINGLE_KINDS = ("auto", "word", "char")

_WORD_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_WORD_BASE_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))
# Per-position multipliers of the n-gram window (fixed random odd 64-bit constants).
_WINDOW_MULTIPLIERS = np.random.default_rng(0x5EED).integers(0, 1 << 63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_SPACE = np.uint64(32)
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x3134F))

_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijection on uint64 with full avalanche."""
    values = values ^ (values >> np.uint64(30))
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


def _power_tables(length: int) -> tuple[np.ndarray, np.ndarray]:
    global _powers, _inverse_powers
    if len(_powers) <= length:
        size = max(length + 1, 2 * len(_powers))
        _powers = np.concatenate(([np.uint64(1)], np.cumprod(np.full(size - 1, _WORD_BASE, dtype=np.uint64))))
        _inverse_powers = np.concatenate(([np.uint64(1)], np.cumprod(np.full(size - 1, _WORD_BASE_INVERSE, dtype=np.uint64))))
    return _powers, _inverse_powers


def window_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """Hash every window of ``n`` consecutive uint64 units (one window of all units if fewer)."""
    n = min(n, len(units))
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    count = len(units) - n + 1
    combined = units[:count] * _WINDOW_MULTIPLIERS[0]
    for position in range(1, n):
        combined += units[position : position + count] * _WINDOW_MULTIPLIERS[position % len(_WINDOW_MULTIPLIERS)]
    return mix64(combined)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)


def word_hashes(codes: np.ndarray) -> np.ndarray:
    """One hash per space-separated word of a code-point array (of ``word_characters`` output)."""
    if len(codes) == 0:
        return np.empty(0, dtype=np.uint64)
    powers, inverse_powers = _power_tables(len(codes))
    is_space = codes == _SPACE
    boundaries = np.flatnonzero(np.diff(np.concatenate(([True], is_space, [True])).astype(np.int8)))
    starts, ends = boundaries[0::2], boundaries[1::2]
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(codes * powers[: len(codes)])))
    return mix64((prefix[ends] - prefix[starts]) * inverse_powers[starts])


def prefers_characters(codes: np.ndarray) -> bool:
    """True when CJK characters are at least as many as the other (space-separated) words."""
    if len(codes) == 0 or codes.max() < _CJK_RANGES[0][0]:
        return False
    cjk = np.zeros(len(codes), dtype=bool)
    for low, high in _CJK_RANGES:
        cjk |= (codes >= low) & (codes <= high)
    other = ~cjk & (codes != _SPACE)
    other_words = int(other[0]) + int(np.count_nonzero(other[1:] & ~other[:-1]))
    return int(np.count_nonzero(cjk)) >= max(other_words, 1)


def _reduce(text: str, kind: str) -> tuple[np.ndarray, str]:
    codes = _codepoints(word_characters(text))
    if kind == "auto":
        kind = "char" if prefers_characters(codes) else "word"
    elif kind not in SHINGLE_KINDS:
        raise ValueError(f"unknown shingle kind {kind!r}; expected one of {SHINGLE_KINDS}")
    return codes, kind


def shingle_hashes(text: str, kind: str, n: int) -> np.ndarray:
    """uint64 hashes of the text's shingles (with repeats; use ``np.unique`` for the set)."""
    codes, kind = _reduce(text, kind)
    if kind == "char":
        return window_hashes(codes[codes != _SPACE], n)
    return window_hashes(word_hashes(codes), n)


def shingle_strings(text: str, kind: str, n: int) -> list[str]:
    """The same shingles as strings (for peers such as datasketch and for exact checks in tests)."""
    codes, kind = _reduce(text, kind)
    reduced = codes.astype("<u4").tobytes().decode("utf-32-le")
    units = list(reduced.replace(" ", "")) if kind == "char" else reduced.split()
    n = min(n, len(units))
    if n == 0:
        return []
    joiner = "" if kind == "char" else " "
    return [joiner.join(units[index : index + n]) for index in range(len(units) - n + 1)]


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets given as ``np.unique`` outputs."""
    if len(first) == 0 and len(second) == 0:
        return 1.0
    shared = len(np.intersect1d(first, second, assume_unique=True))
    return shared / (len(first) + len(second) - shared)
