"""JSONL documents, read line by line in byte ranges, with every bad line skipped and counted by
reason and ``file:line`` (or turned into an error naming ``file:line`` in strict mode).

A line is one document. Its text is the string under each of the ``--json-keys``; a line is skipped
as a whole when it is blank, not UTF-8, not a JSON object, lacks a key, has a non-string value,
has only whitespace under a key, has a lone surrogate in its text (a JSON escape such as
``"\\ud800"`` with no UTF-8 encoding; ``--replace-lone-surrogates`` puts U+FFFD in its place
instead), or is longer than ``max_line_bytes`` (such a line is never held in memory whole). Files
ending in ``.gz`` are read through gzip, as one range. Every tool that reads text prints the same
table of skipped lines (:meth:`SkipCounter.table`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from dataclasses import dataclass, field

SKIP_REASONS = {
    "blank_line": "blank line",
    "non_utf8": "not valid UTF-8",
    "invalid_json": "not a JSON object",
    "missing_key": "a text field is missing",
    "not_a_string": "a text field is not a string",
    "empty_document": "empty or whitespace-only text",
    "too_large": "longer than --max-document-bytes",
    "not_token_ids": "NullTokenizer text that is not token ids below --vocab-size",
    "lone_surrogate": "text with a lone surrogate, \\ud800-\\udfff, which has no UTF-8 encoding",
    "invalid_record": "not an SFT record in instruction or chat format",
}

# A lone surrogate can only come from a JSON \uXXXX escape: the line itself was decoded as strict UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT_CHARACTER = "\ufffd"

# Default line (document) size limit: far above real documents, low enough that a runaway line
# (a whole dump on one line) is skipped rather than tokenized.
DEFAULT_MAX_DOCUMENT_BYTES = 16 * 1024 * 1024

# Lines over the size limit are skipped in pieces of this size, so they never sit in memory whole.
_SKIP_PIECE_BYTES = 1 << 20


class BadInputError(ValueError):
    """Input that cannot be used: a bad line in strict mode (the message starts with ``file:line``),
    or no usable line at all."""


class StrictModeError(BadInputError):
    """A bad line under --strict; the tools exit with status 2 on it."""


def add_bad_line_arguments(parser: argparse.ArgumentParser, repairs_text: bool = True) -> None:
    """--strict, and --replace-lone-surrogates for tools whose output holds the text they read
    (a tool that copies lines verbatim cannot repair them)."""
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Stop with an error (exit status 2) at the first bad line instead of skipping it.",
    )
    if repairs_text:
        parser.add_argument(
            "--replace-lone-surrogates",
            action="store_true",
            help="Keep text with lone surrogates (JSON escapes such as \\ud800 that have no UTF-8 encoding), each replaced "
            "by U+FFFD, instead of skipping the line as lone_surrogate.",
        )


@dataclass(frozen=True)
class ByteRange:
    """Lines of ``path`` starting in ``[start, end)``; ``end`` None means to the end of the file.
    ``disk_bytes`` is the range's size on disk (for progress)."""

    path: str
    start: int
    end: int | None
    disk_bytes: int


def is_compressed(path: str) -> bool:
    return path.endswith(".gz")


def split_into_ranges(files: list[str], target_bytes: int) -> list[ByteRange]:
    """Cut each file into line-aligned ranges of about ``target_bytes`` (a compressed file stays whole)."""
    ranges = []
    for path in files:
        size = os.path.getsize(path)
        if is_compressed(path):
            ranges.append(ByteRange(path, 0, None, size))
            continue
        start = 0
        with open(path, "rb") as stream:
            while start < size:
                stream.seek(min(start + max(target_bytes, 1), size))
                _skip_rest_of_line(stream)
                end = min(stream.tell(), size)
                ranges.append(ByteRange(path, start, end, end - start))
                start = end
    return ranges


def _skip_rest_of_line(stream) -> None:
    while True:
        piece = stream.readline(_SKIP_PIECE_BYTES)
        if not piece or piece.endswith(b"\n"):
            return


def read_lines(byte_range: ByteRange, max_line_bytes: int):
    """Yield ``(line, consumed_bytes)`` for each line of the range; ``line`` is None for a line over
    ``max_line_bytes``, which is skipped without being read into memory."""
    opener = gzip.open if is_compressed(byte_range.path) else open
    with opener(byte_range.path, "rb") as stream:
        stream.seek(byte_range.start)
        remaining = None if byte_range.end is None else byte_range.end - byte_range.start
        while remaining is None or remaining > 0:
            line = stream.readline(max_line_bytes + 1)
            if not line:
                return
            consumed = len(line)
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                # Over the limit (not counting the newline): drop what was read, skip the rest piecewise.
                while not line.endswith(b"\n"):
                    line = stream.readline(_SKIP_PIECE_BYTES)
                    if not line:
                        break
                    consumed += len(line)
                line = None
            if remaining is not None:
                remaining -= consumed
            yield line, consumed


def load_json_object(line: bytes) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a line holding one JSON object, ``(None, reason)`` otherwise."""
    if not line.strip():
        return None, "blank_line"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    try:
        record = json.loads(decoded)
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets
        return None, "invalid_json"
    if not isinstance(record, dict):
        return None, "invalid_json"
    return record, None


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def replace_lone_surrogates(text: str) -> str:
    return _SURROGATE.sub(REPLACEMENT_CHARACTER, text)


def parse_document(
    line: bytes, json_keys: list[str], replace_surrogates: bool = False
) -> tuple[list[str] | None, str | None]:
    """``(texts, None)`` for a good line, one text per key; ``(None, reason)`` for a bad one. With
    ``replace_surrogates``, lone surrogates become U+FFFD instead of making the line bad."""
    record, reason = load_json_object(line)
    if reason is not None:
        return None, reason
    texts = []
    for key in json_keys:
        if key not in record:
            return None, "missing_key"
        text = record[key]
        if not isinstance(text, str):
            return None, "not_a_string"
        if not text.strip():
            return None, "empty_document"
        if b"\\u" in line and has_lone_surrogate(text):  # (the search only where an escape can be)
            if not replace_surrogates:
                return None, "lone_surrogate"
            text = replace_lone_surrogates(text)
        texts.append(text)
    return texts, None


@dataclass
class SkipCounter:
    """Skipped lines: a count per reason and the first few ``(file, line)`` of each, with a detail
    where the reason has one (``(file, line, detail)``). ``strict`` turns the first one into a
    StrictModeError instead."""

    max_examples: int = 5
    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple]] = field(default_factory=dict)

    def add(self, reason: str, path: str, line: int, detail: str | None = None) -> None:
        if self.strict:
            raise strict_error(path, line, reason, detail)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append((path, line) if detail is None else (path, line, detail))

    def merge(self, other: SkipCounter, line_offset: int = 0) -> None:
        """Add ``other``'s counts, its line numbers shifted by ``line_offset`` (ranges count from 1)."""
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            for path, line, *detail in other.examples.get(reason, []):
                if len(examples) < self.max_examples:
                    examples.append((path, line + line_offset, *detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary_lines(self) -> list[str]:
        """One line per reason, most frequent first: count, meaning and the first ``file:line``s."""
        lines = []
        for reason in sorted(self.counts, key=lambda reason: -self.counts[reason]):
            examples = self.examples.get(reason, [])
            where = ", ".join(_location(*example) for example in examples)
            more = " ..." if self.counts[reason] > len(examples) else ""
            lines.append(f"  {reason} ({SKIP_REASONS[reason]}): {self.counts[reason]}  e.g. {where}{more}")
        return lines

    def table(self, indent: str = "") -> list[str]:
        """The skip table every tool's summary prints: the total, then :meth:`summary_lines`."""
        return [f"{indent}skipped lines: {self.total}", *(indent + line for line in self.summary_lines())]


def _location(path: str, line: int, detail: str | None = None) -> str:
    return f"{path}:{line}" + (f" ({detail})" if detail else "")


def describe_reason(reason: str, detail: str | None = None) -> str:
    """``reason (meaning)``, or ``reason (meaning: detail)``."""
    return f"{reason} ({SKIP_REASONS[reason]}: {detail})" if detail else f"{reason} ({SKIP_REASONS[reason]})"


def strict_error(path: str, line: int, reason: str, detail: str | None = None) -> StrictModeError:
    return StrictModeError(f"{path}:{line}: {describe_reason(reason, detail)}; stopped by --strict")
