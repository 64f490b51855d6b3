"""Stable 64-bit shingle hashes computed with numpy over whole batches of texts.

Text is reduced as :func:`~megatron_r1.corpus.normalize.word_characters` does (lower case; every
character that is not a letter or digit separates words). Then:

* ``char`` shingles: n-grams of the remaining letters and digits, separators removed (used for
  Chinese and other CJK text, where there are no spaces between words);
* ``word`` shingles: n-grams of words;
* ``auto``: ``char`` when a text's CJK characters (Han, kana, Hangul) are at least as many as its
  other words (and it has some), else ``word``.

A text with fewer than ``n`` units yields one shingle of all of them; an empty text yields none.

Hashing: each code point (char mode) or each word's polynomial hash (word mode, via prefix sums
over code points) is combined over an n-gram window with fixed odd 64-bit multipliers and passed
through the splitmix64 finalizer. All arithmetic is uint64 modulo 2**64, identical in every
process and on every run (Python's salted ``hash()`` is not used).

Speed: :func:`shingle_hashes_batch` lower-cases and encodes a whole batch of texts as one
code-point array and does every step above as a handful of array operations on it (windows that
would cross two texts are dropped), so the per-text cost is a few Python calls, not a few dozen
numpy calls. :func:`shingle_strings` is the plain-Python reference with the same shingles.
"""

from __future__ import annotations

import functools
import re
import sys

import numpy as np

from megatron_r1.corpus.normalize import word_characters

SHINGLE_KINDS = ("auto", "word", "char")

_WORD_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_WORD_BASE_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))
# Per-position multipliers of the n-gram window (fixed random odd 64-bit constants).
_WINDOW_MULTIPLIERS = np.random.default_rng(0x5EED).integers(0, 1 << 63, size=64, dtype=np.uint64) * np.uint64(
    2
) + np.uint64(1)
_CJK_RANGES = (
    (0x3040, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0x20000, 0x3134F),
)

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
        _inverse_powers = np.concatenate(
            ([np.uint64(1)], np.cumprod(np.full(size - 1, _WORD_BASE_INVERSE, dtype=np.uint64)))
        )
    return _powers, _inverse_powers


class GrowingWindows:
    """Hashes of every window of ``span`` consecutive uint64 units for non-decreasing spans, each
    span's window sums extended from the previous one instead of computed from scratch."""

    def __init__(self, units: np.ndarray):
        self.units = units
        self.span = 1
        self.sums = units * _WINDOW_MULTIPLIERS[0]

    def hashes(self, span: int) -> np.ndarray:
        if not self.span <= span <= len(self.units):
            raise ValueError(f"span {span} must be in [{self.span}, {len(self.units)}]")
        while self.span < span:
            self.sums = (
                self.sums[:-1] + self.units[self.span :] * _WINDOW_MULTIPLIERS[self.span % len(_WINDOW_MULTIPLIERS)]
            )
            self.span += 1
        return mix64(self.sums)


def _window_sums(units: np.ndarray, n: int) -> np.ndarray:
    count = len(units) - n + 1
    combined = units[:count] * _WINDOW_MULTIPLIERS[0]
    for position in range(1, n):
        combined += units[position : position + count] * _WINDOW_MULTIPLIERS[position % len(_WINDOW_MULTIPLIERS)]
    return combined


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray]:
    """bool[sys.maxunicode + 1] tables: letters/digits (what ``word_characters`` keeps) and CJK."""
    every_character = np.arange(sys.maxunicode + 1, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")
    is_word = np.zeros(sys.maxunicode + 1, dtype=bool)
    for run in re.finditer(r"[^\W_]+", every_character):  # the complement of word_characters' separators
        is_word[run.start() : run.end()] = True
    is_cjk = np.zeros(sys.maxunicode + 1, dtype=bool)
    for low, high in _CJK_RANGES:
        is_cjk[low : high + 1] = True
    return is_word, is_cjk & is_word


def prepare() -> None:
    """Build the lookup tables now: called before worker processes are forked, they inherit them
    instead of each building their own."""
    _tables()


def _segments(doc: np.ndarray, documents: int) -> np.ndarray:
    """Start offsets (length documents + 1) of the runs of each document id in a sorted id array."""
    return np.searchsorted(doc, np.arange(documents + 1))


def _units_to_windows(units: np.ndarray, doc: np.ndarray, documents: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Window hashes of every document's units (sorted by document), with their document ids."""
    starts = _segments(doc, documents)
    counts = np.diff(starts)
    hashes, owners = [], []
    if len(units) >= n:
        window_doc = doc[: len(units) - n + 1]
        inside = window_doc == doc[n - 1 :]
        hashes.append(_window_sums(units, n)[inside])
        owners.append(window_doc[inside])
    short = np.flatnonzero((counts > 0) & (counts < n))
    if len(short):  # fewer units than n: one shingle of all of them
        members = np.repeat(short, counts[short])
        positions = np.arange(len(members)) - np.repeat(np.cumsum(counts[short]) - counts[short], counts[short])
        products = (
            units[np.repeat(starts[short], counts[short]) + positions]
            * _WINDOW_MULTIPLIERS[positions % len(_WINDOW_MULTIPLIERS)]
        )
        hashes.append(np.add.reduceat(products, np.cumsum(counts[short]) - counts[short]))
        owners.append(short)
    if not hashes:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hashes), np.concatenate(owners)


def shingle_hashes_batch(texts: list[str], kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, offsets)``: text ``i``'s uint64 shingle hashes (with repeats, in text order) are
    ``hashes[offsets[i]:offsets[i + 1]]``."""
    if kind not in SHINGLE_KINDS:
        raise ValueError(f"unknown shingle kind {kind!r}; expected one of {SHINGLE_KINDS}")
    if n < 1:
        raise ValueError(f"shingle size must be >= 1, got {n}")
    documents = len(texts)
    if documents == 0:
        return np.empty(0, np.uint64), np.zeros(1, np.int64)
    is_word_table, is_cjk_table = _tables()
    lowered = [text.lower() for text in texts]
    # A NUL between texts: never a word character, so no word runs across two texts.
    codes = np.frombuffer("\0".join(lowered).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    lengths = np.fromiter(map(len, lowered), dtype=np.int64, count=documents)
    doc = np.repeat(np.arange(documents), lengths + 1)[: len(codes)]
    is_word = is_word_table[codes]
    word_start = is_word.copy()
    word_start[1:] &= ~is_word[:-1]

    if kind == "auto":
        is_cjk = is_cjk_table[codes]
        other = is_word & ~is_cjk
        other_start = other.copy()
        other_start[1:] &= ~other[:-1]
        cjk_count = np.bincount(doc[is_cjk], minlength=documents)
        other_words = np.bincount(doc[other_start], minlength=documents)
        char_mode = cjk_count >= np.maximum(other_words, 1)
    else:
        char_mode = np.full(documents, kind == "char")

    hashes, owners = [], []
    if char_mode.any():
        selected = is_word & char_mode[doc]
        window, owner = _units_to_windows(codes[selected].astype(np.uint64), doc[selected], documents, n)
        hashes.append(window)
        owners.append(owner)
    if not char_mode.all():
        starts = np.flatnonzero(word_start & ~char_mode[doc])
        if len(starts):
            # Word ends: the first non-word position after each start.
            non_word = np.append(np.flatnonzero(~is_word), len(codes))
            ends = non_word[np.searchsorted(non_word, starts)]
            powers, inverse_powers = _power_tables(len(codes))
            prefix = np.concatenate(([np.uint64(0)], np.cumsum(codes.astype(np.uint64) * powers[: len(codes)])))
            words = mix64((prefix[ends] - prefix[starts]) * inverse_powers[starts])
            window, owner = _units_to_windows(words, doc[starts], documents, n)
            hashes.append(window)
            owners.append(owner)
    if not hashes:
        return np.empty(0, np.uint64), np.zeros(documents + 1, np.int64)
    hashes, owners = np.concatenate(hashes), np.concatenate(owners)
    order = np.argsort(owners, kind="stable")
    return mix64(hashes[order]), _segments(owners[order], documents)


def shingle_hashes(text: str, kind: str, n: int) -> np.ndarray:
    """uint64 hashes of one text's shingles (with repeats; use ``np.unique`` for the set)."""
    return shingle_hashes_batch([text], kind, n)[0]


def shingle_strings(text: str, kind: str, n: int) -> list[str]:
    """The same shingles as strings (for peers such as datasketch and for exact checks in tests)."""
    reduced = word_characters(text)
    if kind == "auto":
        _, is_cjk = _tables()
        cjk = sum(1 for character in reduced if is_cjk[ord(character)])
        other_words = sum(
            1
            for word in re.split(
                r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f ]+", reduced
            )
            if word
        )
        kind = "char" if cjk >= max(other_words, 1) else "word"
    elif kind not in SHINGLE_KINDS:
        raise ValueError(f"unknown shingle kind {kind!r}; expected one of {SHINGLE_KINDS}")
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
