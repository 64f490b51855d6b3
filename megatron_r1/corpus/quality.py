"""Document quality heuristics in the style of Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020).

:func:`remove_boilerplate_lines` drops lines (C4-style line filters); :func:`check_quality` returns
the first rule a document fails (its reject reason) or ``None``. Every threshold is a field of
:class:`QualityConfig` and a command-line flag of tools/clean_corpus.py (see
:func:`add_quality_arguments`); the defaults are the published Gopher / C4 values unless marked
"(ours)".

Chinese awareness: for ``zh`` documents a *unit* is one Han character or one run of other
non-space characters (an English word, a number), so lengths count Chinese characters instead of
whitespace words, and the repetition rules use character n-grams of ceil(1.5 n) characters for
the word n-grams of rule n (a Chinese word is ~1.5 characters, so character 5-grams would repeat
far more often than word 5-grams and fail ordinary text); the mean-word-length rule does not
apply, and the stopword rule uses Chinese function characters. For ``en`` and ``other`` a unit
is a whitespace-separated word.

Repetition rules (Gopher): fractions of duplicate lines / paragraphs (by count and by characters);
for n = 2, 3, 4 the characters covered by the most frequent n-gram; for n = 5..10 the characters
covered by n-gram occurrences that repeat an earlier occurrence (overlaps counted once).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np

from megatron_r1.corpus.shingles import GrowingWindows

REASONS = (
    "lorem_ipsum", "curly_brace", "garbled", "too_short", "too_long", "mean_word_length", "symbol_ratio",
    "bullet_lines", "ellipsis_lines", "alpha_words", "digit_ratio", "stopwords", "dup_lines", "dup_paragraphs",
    "dup_line_chars", "dup_paragraph_chars", "top_ngram", "dup_ngram",
)  # fmt: skip

GOPHER_STOPWORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
CHINESE_STOPWORDS = frozenset("的了是在和有不这我也就都与之为他")
_HAN_OR_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
# Applied to the document's units joined by single spaces (units contain no spaces), so that one
# regular expression call replaces a call per unit.
_UNIT_WITH_LETTER = re.compile(r"(?<!\S)(?=\S*?[^\W\d_])\S+")
_UNIT_EDGE_PUNCTUATION = re.compile(r"(?<!\S)(?:[^\w\s]|_)+|(?:[^\w\s]|_)+(?!\S)")
_DIGIT = re.compile(r"\d")
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "◆", "◇", "►", "▶", "➢", "✓", "✔", "-", "*", "·", "‣", "⁃")
_ELLIPSES = ("...", "…")
_TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "…", "。", "」", "”", "』", "»")
# C4 drops lines mentioning javascript or cookie / legal notices; we add common ad and navigation lines, also in Chinese.
BOILERPLATE_PATTERN = re.compile(
    r"javascript|cookie|privacy policy|terms of (?:use|service)|all rights reserved|click here|subscribe to"
    r"|sign up for (?:our|the) newsletter|advertisement|sponsored content|share (?:this|on) (?:facebook|twitter)"
    r"|版权所有|免责声明|点击(?:这里|此处|查看|进入|下载)|扫码|扫一扫|关注(?:我们|公众号|微信)|广告|上一篇|下一篇"
    r"|责任编辑|转载请注明|阅读原文|分享到",
    re.IGNORECASE,
)


def _flag(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class QualityConfig:
    min_words: int = _flag(50, "Gopher: minimum words (en/other) (default: %(default)s)")
    max_words: int = _flag(100_000, "Gopher: maximum words (en/other) (default: %(default)s)")
    min_zh_chars: int = _flag(
        100, "minimum units for zh: Han characters plus other words (ours; ~Gopher's 50 words) (default: %(default)s)"
    )
    max_zh_chars: int = _flag(200_000, "maximum units for zh (ours) (default: %(default)s)")
    min_mean_word_length: float = _flag(
        3.0, "Gopher: minimum mean word length in characters, en/other (default: %(default)s)"
    )
    max_mean_word_length: float = _flag(10.0, "Gopher: maximum mean word length, en/other (default: %(default)s)")
    max_symbol_word_ratio: float = _flag(
        0.1, "Gopher: maximum ratio of '#' and ellipsis symbols to words (default: %(default)s)"
    )
    max_bullet_lines: float = _flag(
        0.9, "Gopher: maximum fraction of lines starting with a bullet (default: %(default)s)"
    )
    max_ellipsis_lines: float = _flag(
        0.3, "Gopher: maximum fraction of lines ending with an ellipsis (default: %(default)s)"
    )
    min_alpha_words: float = _flag(
        0.8, "Gopher: minimum fraction of words with an alphabetic character (Han counts) (default: %(default)s)"
    )
    max_digit_ratio: float = _flag(
        0.3, "maximum fraction of digits among non-space characters (ours) (default: %(default)s)"
    )
    min_stopwords: int = _flag(
        2,
        "Gopher: minimum occurrences of the, be, to, of, and, that, have, with (en); of 的了是在和有不这我也就都与之为他 (zh) (default: %(default)s)",
    )
    max_dup_lines: float = _flag(0.3, "Gopher: maximum fraction of duplicate lines (default: %(default)s)")
    max_dup_paragraphs: float = _flag(0.3, "Gopher: maximum fraction of duplicate paragraphs (default: %(default)s)")
    max_dup_line_chars: float = _flag(
        0.2, "Gopher: maximum fraction of characters in duplicate lines (default: %(default)s)"
    )
    max_dup_paragraph_chars: float = _flag(
        0.2, "Gopher: maximum fraction of characters in duplicate paragraphs (default: %(default)s)"
    )
    max_top_2gram: float = _flag(
        0.2, "Gopher: maximum character fraction of the most frequent 2-gram (default: %(default)s)"
    )
    max_top_3gram: float = _flag(0.18, "Gopher: ... 3-gram (default: %(default)s)")
    max_top_4gram: float = _flag(0.16, "Gopher: ... 4-gram (default: %(default)s)")
    max_dup_5gram: float = _flag(0.15, "Gopher: maximum character fraction in duplicate 5-grams (default: %(default)s)")
    max_dup_6gram: float = _flag(0.14, "Gopher: ... 6-grams (default: %(default)s)")
    max_dup_7gram: float = _flag(0.13, "Gopher: ... 7-grams (default: %(default)s)")
    max_dup_8gram: float = _flag(0.12, "Gopher: ... 8-grams (default: %(default)s)")
    max_dup_9gram: float = _flag(0.11, "Gopher: ... 9-grams (default: %(default)s)")
    max_dup_10gram: float = _flag(0.1, "Gopher: ... 10-grams (default: %(default)s)")
    max_garbled_ratio: float = _flag(
        0.01, "maximum fraction of garbled characters (U+FFFD, unassigned, mojibake) (ours) (default: %(default)s)"
    )
    drop_lorem_ipsum: bool = _flag(True, "C4: drop documents containing 'lorem ipsum' (default: %(default)s)")
    drop_curly_brace: bool = _flag(
        False, "C4: drop documents containing '{' (code); off by default (default: %(default)s)"
    )
    remove_boilerplate_lines: bool = _flag(
        True,
        "C4-style: remove lines of at most --boilerplate-max-line-chars that mention javascript, cookies, privacy policy, terms of use, ads, or Chinese boilerplate (版权所有, 免责声明, 扫码, 关注公众号, 广告 ...) (default: %(default)s)",
    )
    boilerplate_max_line_chars: int = _flag(
        200, "longest line that the boilerplate filter may remove (ours) (default: %(default)s)"
    )
    c4_terminal_punctuation: bool = _flag(
        False,
        'C4: keep only lines ending in terminal punctuation (. ! ? " … 。 」 ”); off by default (default: %(default)s)',
    )
    c4_min_line_words: int = _flag(
        0, "C4: remove lines with fewer units than this (C4 used 3; 0 = off) (default: %(default)s)"
    )


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quality rules (Gopher / C4 style)")
    for spec in dataclasses.fields(QualityConfig):
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(spec.default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=spec.default, help=spec.metadata["help"]
            )
        else:
            group.add_argument(flag, type=type(spec.default), default=spec.default, help=spec.metadata["help"])


def quality_config_from_args(args: argparse.Namespace) -> QualityConfig:
    return QualityConfig(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(QualityConfig)})


def units(text: str, language: str) -> list[str]:
    return _HAN_OR_WORD.findall(text) if language == "zh" else text.split()


def remove_boilerplate_lines(text: str, language: str, config: QualityConfig) -> str:
    kept = []
    for line in text.split("\n"):
        stripped = line.strip()
        if (
            config.remove_boilerplate_lines
            and stripped
            and len(stripped) <= config.boilerplate_max_line_chars
            and BOILERPLATE_PATTERN.search(stripped)
        ):
            continue
        if stripped and config.c4_terminal_punctuation and not stripped.endswith(_TERMINAL_PUNCTUATION):
            continue
        if stripped and config.c4_min_line_words and len(units(stripped, language)) < config.c4_min_line_words:
            continue
        kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def _duplicate_fractions(pieces: list[str]) -> tuple[float, float]:
    """(fraction of pieces that repeat an earlier one, fraction of characters in those repeats)."""
    if not pieces:
        return 0.0, 0.0
    seen: set[str] = set()
    duplicates = duplicate_chars = 0
    for piece in pieces:
        if piece in seen:
            duplicates += 1
            duplicate_chars += len(piece)
        seen.add(piece)
    return duplicates / len(pieces), duplicate_chars / max(sum(map(len, pieces)), 1)


def ngram_span(n: int, language: str) -> int:
    """Units in the "n-gram" of rule n: n words, or for zh ceil(1.5 n) characters (~n words)."""
    return math.ceil(1.5 * n) if language == "zh" else n


class _NgramRepetition:
    """Gopher n-gram repetition statistics of one unit sequence, asked for non-decreasing spans."""

    def __init__(self, tokens: list[str]):
        vocabulary: dict[str, int] = {}
        # setdefault with a running counter: each distinct unit gets the index of its first occurrence.
        self.ids = np.fromiter(
            map(vocabulary.setdefault, tokens, itertools.count()), dtype=np.uint64, count=len(tokens)
        )
        self.lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        self.total = max(int(self.lengths.sum()), 1)
        self.cumulative = np.concatenate(([0], np.cumsum(self.lengths)))
        self._windows = GrowingWindows(self.ids)

    def _occurrences(self, span: int) -> tuple[np.ndarray, np.ndarray]:
        """(window indices sorted by n-gram, True where a new n-gram starts in that order)."""
        hashes = self._windows.hashes(span)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        return order, np.concatenate(([True], ordered[1:] != ordered[:-1]))

    def top_fraction(self, span: int) -> float:
        """Characters covered by the occurrences of the most frequent n-gram / all characters."""
        if len(self.ids) <= span:
            return 0.0
        order, new = self._occurrences(span)
        starts = np.flatnonzero(new)
        counts = np.diff(np.append(starts, len(order)))
        best = int(np.argmax(counts))
        if counts[best] < 2:
            return 0.0
        first = int(order[starts[best]])
        return float(counts[best] * (self.cumulative[first + span] - self.cumulative[first]) / self.total)

    def duplicate_fraction(self, span: int) -> float:
        """Characters inside n-gram occurrences that repeat an earlier one (overlaps once) / all characters."""
        if len(self.ids) <= span:
            return 0.0
        order, new = self._occurrences(span)
        repeats = order[~new]  # the stable sort puts each n-gram's first occurrence first
        if len(repeats) == 0:
            return 0.0
        coverage = np.zeros(len(self.ids) + 1, dtype=np.int64)
        coverage[repeats] += 1  # (window indices are unique, so plain fancy indexing adds correctly)
        coverage[repeats + span] -= 1
        covered = np.cumsum(coverage[:-1]) > 0
        return float(self.lengths[covered].sum() / self.total)


def check_quality(text: str, language: str, config: QualityConfig, garbled: int = 0) -> str | None:
    """The reason the document fails (a name from REASONS), or None when it passes every rule."""
    lowered = text.lower()
    if config.drop_lorem_ipsum and "lorem ipsum" in lowered:
        return "lorem_ipsum"
    if config.drop_curly_brace and "{" in text:
        return "curly_brace"
    if garbled > config.max_garbled_ratio * max(len(text), 1):
        return "garbled"
    tokens = units(text, language)
    count = len(tokens)
    low, high = (config.min_zh_chars, config.max_zh_chars) if language == "zh" else (config.min_words, config.max_words)
    if count < low:
        return "too_short"
    if count > high:
        return "too_long"
    if language != "zh":
        stripped = _UNIT_EDGE_PUNCTUATION.sub("", " ".join(tokens)).split()
        mean_length = sum(map(len, stripped)) / max(len(stripped), 1)
        if not config.min_mean_word_length <= mean_length <= config.max_mean_word_length:
            return "mean_word_length"
    symbols = text.count("#") + sum(text.count(ellipsis) for ellipsis in _ELLIPSES)
    if symbols > config.max_symbol_word_ratio * count:
        return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if sum(line.startswith(_BULLETS) for line in lines) > config.max_bullet_lines * len(lines):
        return "bullet_lines"
    if sum(line.endswith(_ELLIPSES) for line in lines) > config.max_ellipsis_lines * len(lines):
        return "ellipsis_lines"
    if len(_UNIT_WITH_LETTER.findall(" ".join(tokens))) < config.min_alpha_words * count:
        return "alpha_words"
    non_space = len(text) - sum(text.count(space) for space in (" ", "\n", "\t"))
    if len(_DIGIT.findall(text)) > config.max_digit_ratio * max(non_space, 1):
        return "digit_ratio"
    if language in ("en", "zh"):
        stopwords = GOPHER_STOPWORDS if language == "en" else CHINESE_STOPWORDS
        if sum(map(stopwords.__contains__, lowered.split() if language == "en" else tokens)) < config.min_stopwords:
            return "stopwords"
    line_fraction, line_chars = _duplicate_fractions(lines)
    paragraphs = [paragraph.strip() for paragraph in text.split("\n\n") if paragraph.strip()]
    paragraph_fraction, paragraph_chars = _duplicate_fractions(paragraphs)
    for reason, value, limit in (
        ("dup_lines", line_fraction, config.max_dup_lines),
        ("dup_paragraphs", paragraph_fraction, config.max_dup_paragraphs),
        ("dup_line_chars", line_chars, config.max_dup_line_chars),
        ("dup_paragraph_chars", paragraph_chars, config.max_dup_paragraph_chars),
    ):
        if value > limit:
            return reason
    repetition = _NgramRepetition(tokens if language == "zh" else lowered.split())
    for n in (2, 3, 4):
        if repetition.top_fraction(ngram_span(n, language)) > getattr(config, f"max_top_{n}gram"):
            return "top_ngram"
    for n in range(5, 11):
        if repetition.duplicate_fraction(ngram_span(n, language)) > getattr(config, f"max_dup_{n}gram"):
            return "dup_ngram"
    return None
