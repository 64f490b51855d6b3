"""Input file lists, streamed line batches with offsets, and atomic output files.

Lines are read as raw bytes together with their 1-based line number and byte offset, so that a
later pass (or a random-access verification step) can find a document again without keeping its
text in memory. A line longer than ``max_line_bytes`` is never held in memory: it comes as
``None`` and is counted as ``too_large``. Files ending in ``.gz`` are read through gzip (offsets
are then positions in the decompressed stream). Lines are validated with :func:`megatron_r1.data.jsonl.parse_document` and bad
ones counted in its ``SkipCounter`` (the same reasons and ``file:line`` report as preprocessing).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterable, Iterator

from megatron_r1.data.files import remove_if_exists, temporary_path
from megatron_r1.data.jsonl import DEFAULT_MAX_DOCUMENT_BYTES, ByteRange, parse_document, read_lines


class InputError(ValueError):
    """A command-line input that cannot be used at all (missing file, no glob match)."""


def expand_inputs(patterns: Iterable[str], flag: str = "--input") -> list[str]:
    """Expand files and glob patterns into an ordered, de-duplicated list of existing files."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
            if not matches:
                raise InputError(f"{flag} {pattern!r}: no file matches this pattern")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise InputError(f"{flag} {pattern!r}: no such file")
        paths.extend(path for path in matches if path not in paths)
    return paths


def check_output_not_input(output: str, inputs: Iterable[str], flag: str) -> None:
    """Refuse to overwrite an input: the tools stream inputs while writing outputs."""
    for path in inputs:
        if os.path.exists(output) and os.path.samefile(output, path):
            raise InputError(f"{flag} {output!r} is also an input file; choose another output path")


def total_bytes(paths: Iterable[str]) -> int:
    return sum(os.path.getsize(path) for path in paths)


# A line as read from disk: (file index, 1-based line number, byte offset, raw bytes or None when
# the line is longer than the limit).
RawLine = tuple[int, int, int, "bytes | None"]


def iter_lines(path: str, file_index: int, max_line_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[RawLine]:
    offset = 0
    whole_file = ByteRange(path, 0, None, os.path.getsize(path))
    for line_number, (raw, consumed) in enumerate(read_lines(whole_file, max_line_bytes), start=1):
        yield file_index, line_number, offset, raw
        offset += consumed


def iter_line_batches(
    paths: list[str], batch_lines: int = 1024, batch_bytes: int = 4 << 20, progress=None
) -> Iterator[list[RawLine]]:
    """Yield batches of raw lines from all files in order; ``progress`` (a tqdm) advances by the
    bytes read, and by the rest of the files' sizes at the end (skipped over-long lines)."""
    batch: list[RawLine] = []
    size = reported = 0
    for file_index, path in enumerate(paths):
        for line in iter_lines(path, file_index):
            batch.append(line)
            size += len(line[3]) if line[3] is not None else 0
            if len(batch) >= batch_lines or size >= batch_bytes:
                if progress is not None:
                    progress.update(size)
                    reported += size
                yield batch
                batch, size = [], 0
    if progress is not None:
        progress.update(max(size, total_bytes(paths) - reported))
    if batch:
        yield batch


def parse_text(raw: bytes | None, json_key: str, replace_surrogates: bool = False) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable line, ``(None, reason)`` with a ``SKIP_REASONS`` name otherwise
    (``replace_surrogates``: see :func:`megatron_r1.data.jsonl.parse_document`)."""
    if raw is None:
        return None, "too_large"
    texts, reason = parse_document(raw, [json_key], replace_surrogates)
    return (texts[0], None) if reason is None else (None, reason)


def dump_line(record: dict) -> bytes:
    # ensure_ascii=False keeps Chinese readable and the files about half the size.
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "replace") + b"\n"


@contextlib.contextmanager
def atomic_output(path: str):
    """Open ``path`` for binary writing via a temporary file in the same directory.

    The file appears under its final name only when the block completes; on any error the
    temporary file is removed and an existing file at ``path`` is left untouched.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        remove_if_exists(temporary)
