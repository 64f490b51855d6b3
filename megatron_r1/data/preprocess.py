"""JSONL -> megatron-core indexed datasets ``{prefix}_{key}_document.bin/.idx``, streamed and parallel.

The input is cut into line-aligned byte ranges. Each worker process reads, parses and tokenizes its
ranges itself (no text crosses a pipe) and writes the tokens of a range to a temporary part file;
the main process appends the parts, in input order, to the output and records the document
lengths. Output is therefore identical for any ``workers``. Memory is bounded by the range and
batch sizes, not by the corpus: the index columns are streamed to disk by the writer.

``partitions`` > 1 follows Megatron-LM: the input is split into that many contiguous parts (by
bytes, on line boundaries), each written as its own dataset ``{prefix}_{i}_{key}_document``, and
these are then merged into ``{prefix}_{key}_document``, which is the same as with one partition.

Every output is written under a temporary name and renamed when complete (see
:mod:`megatron_r1.data.indexed`); an error, a bad line under ``strict`` or Ctrl-C removes all
temporary files and leaves earlier outputs untouched.
"""

from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megatron_r1.data.files import remove_if_exists
from megatron_r1.data.indexed import IndexedDatasetWriter, merge_indexed_datasets, token_dtype
from megatron_r1.data.jsonl import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    BadInputError,
    ByteRange,
    SkipCounter,
    parse_document,
    read_lines,
    split_into_ranges,
    strict_error,
)
from megatron_r1.tokenizer import build_tokenizer

# Texts are tokenized in batches of about this many bytes: large enough that per-call overhead
# vanishes, small enough that a batch's token lists stay a few MB.
_BATCH_TEXT_BYTES = 256 * 1024


@dataclass
class PreprocessConfig:
    input_files: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    strict: bool = False
    replace_surrogates: bool = False  # lone surrogates -> U+FFFD instead of skipping the line
    # Size of the byte ranges handed to workers; None picks one from the input size.
    range_bytes: int | None = None
    vocab_size: int | None = None  # NullTokenizer's


@dataclass
class PreprocessResult:
    documents: int
    tokens: int
    input_bytes: int
    seconds: float
    skipped: SkipCounter
    output_prefixes: list[str]
    vocab_size: int
    dtype: np.dtype


def output_prefix_for(output_prefix: str, key: str, partition: int | None = None) -> str:
    """Megatron-LM's output naming: ``{prefix}[_{partition}]_{key}_document``."""
    middle = "" if partition is None else f"_{partition}"
    return f"{output_prefix}{middle}_{key}_document"


@dataclass
class _RangeResult:
    lines: int
    input_bytes: int
    tokens: int
    lengths: dict[str, np.ndarray]
    part_files: dict[str, str]
    skipped: SkipCounter
    # (line in the range, reason) of the first bad line, when strict.
    strict_failure: tuple[int, str] | None = None


class _RangeEncoder:
    """Reads, parses and tokenizes one byte range into per-key part files (runs in a worker)."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model, config.vocab_size)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        if config.append_eod and self.tokenizer.eod is None:
            raise ValueError(f"--append-eod: the tokenizer {config.tokenizer_model} has no end-of-document token")

    def encode(self, task: tuple[ByteRange, str]) -> _RangeResult:
        byte_range, part_prefix = task
        keys = self.config.json_keys
        part_files = {key: f"{part_prefix}.{index}.part" for index, key in enumerate(keys)}
        outputs = {key: open(path, "wb") for key, path in part_files.items()}
        lengths = {key: [] for key in keys}
        result = _RangeResult(0, 0, 0, {}, part_files, SkipCounter())
        batch_lines: list[int] = []
        batch_texts: list[list[str]] = []
        batch_bytes = 0
        try:
            for line, consumed in read_lines(byte_range, self.config.max_document_bytes):
                result.lines += 1
                result.input_bytes += consumed
                texts, reason = (
                    parse_document(line, keys, self.config.replace_surrogates)
                    if line is not None
                    else (None, "too_large")
                )
                if reason is not None:
                    if self._reject(result, reason, byte_range.path, result.lines):
                        break
                    continue
                batch_lines.append(result.lines)
                batch_texts.append(texts)
                batch_bytes += consumed
                if batch_bytes >= _BATCH_TEXT_BYTES:
                    if self._flush(byte_range.path, batch_lines, batch_texts, outputs, lengths, result):
                        break
                    batch_lines, batch_texts, batch_bytes = [], [], 0
            else:
                self._flush(byte_range.path, batch_lines, batch_texts, outputs, lengths, result)
        finally:
            for stream in outputs.values():
                stream.close()
        result.lengths = {
            key: np.concatenate(parts) if parts else np.zeros(0, np.int32) for key, parts in lengths.items()
        }
        return result

    def _reject(self, result: _RangeResult, reason: str, path: str, line: int) -> bool:
        """Count a bad line (numbered within the range); True when processing must stop (strict)."""
        if self.config.strict:
            result.strict_failure = (line, reason)
            return True
        result.skipped.add(reason, path, line)
        return False

    def _tokenize_batch(self, texts: list[str]) -> list[list[int] | None]:
        try:
            return self.tokenizer.tokenize_batch(texts)
        except ValueError:  # NullTokenizer's input that is not token ids: None for those texts
            return [self._tokenize_or_none(text) for text in texts]

    def _tokenize_or_none(self, text: str) -> list[int] | None:
        try:
            return self.tokenizer.tokenize(text)
        except ValueError:
            return None

    def _flush(self, path, batch_lines, batch_texts, outputs, lengths, result) -> bool:
        """Tokenize a batch and write it; True when a strict failure stops the range."""
        if not batch_texts:
            return False
        keys = self.config.json_keys
        encoded = {key: self._tokenize_batch([texts[index] for texts in batch_texts]) for index, key in enumerate(keys)}
        # A text can still tokenize to nothing; such documents are skipped like empty ones.
        keep = [all(encoded[key][row] for key in keys) for row in range(len(batch_texts))]
        if not all(keep):
            for row, kept in enumerate(keep):
                if kept:
                    continue
                invalid = any(encoded[key][row] is None for key in keys)
                if self._reject(result, "not_token_ids" if invalid else "empty_document", path, batch_lines[row]):
                    return True
            encoded = {key: [ids for ids, kept in zip(encoded[key], keep) if kept] for key in keys}
        start = self.tokenizer.document_start
        for key in keys:
            documents = [[*start, *ids] for ids in encoded[key]] if start else encoded[key]
            if self.config.append_eod:
                for ids in documents:
                    ids.append(self.tokenizer.eod)
            document_lengths = np.fromiter(map(len, documents), dtype=np.int32, count=len(documents))
            total = int(document_lengths.sum(dtype=np.int64))
            tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=self.dtype, count=total)
            outputs[key].write(tokens.tobytes())
            lengths[key].append(document_lengths)
            result.tokens += total
        return False


_worker_encoder: _RangeEncoder | None = None


def _start_worker(config: PreprocessConfig) -> None:
    global _worker_encoder
    # Ctrl-C is handled by the main process, which stops the pool; workers should not print
    # tracebacks. SIGTERM (how the pool stops workers) must kill, whatever the parent installed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = _RangeEncoder(config)


def _encode_in_worker(task: tuple[ByteRange, str]) -> _RangeResult:
    return _worker_encoder.encode(task)


def _process_context():
    # fork starts workers in milliseconds (spawn re-imports everything, ~0.3 s each); workers only
    # read files and call the tokenizer, so inheriting the parent's state is harmless.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _range_bytes(config: PreprocessConfig, total_bytes: int) -> int:
    if config.range_bytes is not None:
        return config.range_bytes
    # Many ranges per worker keep the last worker from running alone for long at the end.
    size = min(16 << 20, max(256 << 10, total_bytes // (config.workers * 32)))
    # Several ranges per partition keep the partitions about equal.
    return max(1, min(size, total_bytes // (config.partitions * 8))) if config.partitions > 1 else size


def _assign_partitions(ranges: list[ByteRange], partitions: int) -> list[int]:
    """Contiguous partitions of about equal bytes: a range goes where its first byte falls."""
    total = sum(byte_range.disk_bytes for byte_range in ranges) or 1
    assignment, start = [], 0
    for byte_range in ranges:
        assignment.append(min(partitions - 1, start * partitions // total))
        start += byte_range.disk_bytes
    return assignment


def _check_config(config: PreprocessConfig) -> None:
    if config.workers < 1 or config.partitions < 1:
        raise ValueError("--workers and --partitions must be >= 1")
    if config.max_document_bytes < 1:
        raise ValueError("--max-document-bytes must be >= 1")


def _run_prefix(output_prefix: str) -> str:
    """A hidden prefix, unique to this run, beside the output for its temporary part files."""
    return os.path.join(
        os.path.dirname(os.path.abspath(output_prefix)),
        f".{os.path.basename(output_prefix)}.{os.getpid()}-{uuid.uuid4().hex[:8]}",
    )


def _partition_prefix(config: PreprocessConfig, key: str, partition: int) -> str:
    """The dataset a partition writes: the output itself when there is one partition."""
    return output_prefix_for(config.output_prefix, key, partition if config.partitions > 1 else None)


def _no_documents_error(skipped: SkipCounter) -> BadInputError:
    return BadInputError(
        "no documents to write: "
        + ("every line was skipped\n" + "\n".join(skipped.summary_lines()) if skipped.total else "the input is empty")
    )


def _remove_part_files(run_prefix: str) -> None:
    for path in glob.glob(glob.escape(run_prefix) + ".range*"):
        remove_if_exists(path)


class _Outputs:
    """The datasets being written: appends the encoded ranges, in input order, to the writer of their
    partition and key, and counts documents, tokens, input bytes and skipped lines."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.writers: dict[tuple[int, str], IndexedDatasetWriter] = {}
        self.skipped = SkipCounter()
        self.documents = self.tokens = self.input_bytes = 0
        self.prefixes = [
            _partition_prefix(config, key, partition)
            for partition in range(config.partitions)
            for key in config.json_keys
        ]
        self._lines_before = dict.fromkeys(config.input_files, 0)

    def open(self, dtype: np.dtype) -> None:
        for partition in range(self.config.partitions):
            for key in self.config.json_keys:
                self.writers[(partition, key)] = IndexedDatasetWriter(
                    _partition_prefix(self.config, key, partition), dtype
                )

    def append(self, byte_range: ByteRange, partition: int, result: _RangeResult) -> None:
        """Add a range's documents (their part files are removed); a strict failure raises, numbered in the file."""
        keys = self.config.json_keys
        line_offset = self._lines_before[byte_range.path]
        if result.strict_failure is not None:
            line, reason = result.strict_failure
            raise strict_error(byte_range.path, line_offset + line, reason)
        self._lines_before[byte_range.path] += result.lines
        self.skipped.merge(result.skipped, line_offset)
        for key in keys:
            writer = self.writers[(partition, key)]
            writer.append_bin_file(result.part_files[key])
            writer.add_documents(result.lengths[key])
            remove_if_exists(result.part_files[key])
        self.documents += len(result.lengths[keys[0]])
        self.tokens += result.tokens
        self.input_bytes += result.input_bytes

    def finish(self) -> None:
        """Complete every dataset and, with partitions, merge them into the output of each key."""
        if self.documents == 0:
            raise _no_documents_error(self.skipped)
        for writer in self.writers.values():
            writer.finalize()
        if self.config.partitions > 1:
            for key in self.config.json_keys:
                merged = output_prefix_for(self.config.output_prefix, key)
                merge_indexed_datasets(
                    [_partition_prefix(self.config, key, partition) for partition in range(self.config.partitions)],
                    merged,
                )
                self.prefixes.append(merged)

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def _stop_pool(pool, finished: bool) -> None:
    """Let the workers exit when they are done, or stop them at once after an error."""
    if pool is None:
        return
    if finished:
        pool.close()
    else:
        pool.terminate()
    pool.join()


def preprocess(config: PreprocessConfig, show_progress: bool = True) -> PreprocessResult:
    """Tokenize ``config.input_files`` into indexed datasets; see the module docstring."""
    _check_config(config)
    started = time.perf_counter()
    main_encoder = _RangeEncoder(config)  # also validates the tokenizer before any worker starts
    total_disk_bytes = sum(os.path.getsize(path) for path in config.input_files)
    ranges = split_into_ranges(config.input_files, _range_bytes(config, total_disk_bytes))
    range_partitions = _assign_partitions(ranges, config.partitions)
    run_prefix = _run_prefix(config.output_prefix)
    tasks = [(byte_range, f"{run_prefix}.range{index}") for index, byte_range in enumerate(ranges)]
    outputs = _Outputs(config)
    pool = None
    try:
        outputs.open(main_encoder.dtype)
        if config.workers > 1:
            pool = _process_context().Pool(config.workers, initializer=_start_worker, initargs=(config,))
            results = pool.imap(_encode_in_worker, tasks)
        else:
            results = map(main_encoder.encode, tasks)
        with tqdm(
            total=total_disk_bytes, unit="B", unit_scale=True, desc="preprocess", disable=not show_progress
        ) as progress:
            for (byte_range, _), partition, result in zip(tasks, range_partitions, results):
                outputs.append(byte_range, partition, result)
                progress.update(byte_range.disk_bytes)
        _stop_pool(pool, finished=True)
        outputs.finish()
    except BaseException:
        _stop_pool(pool, finished=False)
        outputs.discard()
        raise
    finally:
        _remove_part_files(run_prefix)
    return PreprocessResult(
        outputs.documents,
        outputs.tokens,
        outputs.input_bytes,
        time.perf_counter() - started,
        outputs.skipped,
        outputs.prefixes,
        main_encoder.tokenizer.vocab_size,
        main_encoder.dtype,
    )
