"""megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and read with
numpy alone, byte for byte what ``megatron.core.datasets.indexed_dataset`` writes and reads.

``.bin``: the token ids of every sequence back to back, in the dataset's dtype.
``.idx`` (little-endian): ``b"MMIDIDX\\x00\\x00"``, version u64 = 1, dtype code u8, sequence count
u64, document count u64 (= documents + 1), then the int32 length of each sequence, the int64 byte
offset of each sequence in ``.bin``, the int64 sequence index where each document starts (a leading
0, then each document's end), and for multimodal datasets an int8 mode per sequence.

:class:`IndexedDatasetWriter` keeps nothing per sequence in memory (lengths, document boundaries and
modes go to temporary files), so memory does not grow with the dataset. Every file is written under
a temporary name and renamed at the end, ``.idx`` last after any older ``.idx`` was removed: an
interrupted write leaves no ``.idx`` that could pass for a dataset.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_r1.data.files import append_file, remove_if_exists, temporary_path

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_PREAMBLE = struct.Struct("<9sQBQQ")

# megatron.core.datasets.indexed_dataset.DType codes.
_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in _DTYPE_CODES.items()}

# Index arrays are processed in blocks of this many entries so that no step holds a whole column.
_BLOCK_ENTRIES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's ``DType.optimal_dtype``: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


@dataclass
class IndexedDatasetIndex:
    """The columns of a ``.idx`` file, memory-mapped (nothing is loaded until used)."""

    path: str
    dtype: np.dtype
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray
    sequence_modes: np.ndarray | None

    @property
    def document_count(self) -> int:
        return len(self.document_indices) - 1

    @property
    def token_count(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(path: str, multimodal: bool = False) -> IndexedDatasetIndex:
    """Read and check the ``.idx`` file at ``path``; a ValueError names the file and the fault."""
    size = os.path.getsize(path)
    if size < _PREAMBLE.size:
        raise ValueError(f"{path}: truncated index ({size} bytes)")
    with open(path, "rb") as index_file:
        header, version, code, sequence_count, document_count = _PREAMBLE.unpack(index_file.read(_PREAMBLE.size))
    if header != INDEX_HEADER or version != INDEX_VERSION:
        raise ValueError(f"{path}: not a megatron-core indexed dataset index (header {header!r}, version {version})")
    if code not in _DTYPES_BY_CODE:
        raise ValueError(f"{path}: unknown dtype code {code}")
    expected = _PREAMBLE.size + sequence_count * (4 + 8 + (1 if multimodal else 0)) + document_count * 8
    if size != expected:
        raise ValueError(
            f"{path}: {size} bytes where {sequence_count} sequences and {document_count - 1} documents need "
            f"{expected}{' (multimodal)' if multimodal else ''}; truncated, or multimodal-ness mismatched"
        )
    offset = _PREAMBLE.size

    def column(dtype, count):
        nonlocal offset
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.zeros(0, dtype)
        offset += count * np.dtype(dtype).itemsize
        return array

    lengths = column(np.int32, sequence_count)
    pointers = column(np.int64, sequence_count)
    document_indices = column(np.int64, document_count)
    modes = column(np.int8, sequence_count) if multimodal else None
    return IndexedDatasetIndex(path, _DTYPES_BY_CODE[code], lengths, pointers, document_indices, modes)


class IndexedDatasetWriter:
    """Writes ``prefix.bin``/``prefix.idx``. Use as a context manager: the files appear only when the
    block ends without an exception; otherwise every temporary file is removed."""

    def __init__(self, prefix: str, dtype, multimodal: bool = False):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no megatron-core code")
        self.multimodal = multimodal
        self.sequence_count = 0
        self.document_count = 0
        self.data_bytes = 0
        self._bin_tmp = temporary_path(bin_path(prefix))
        self._lengths_tmp = temporary_path(prefix + ".lengths")
        self._document_ends_tmp = temporary_path(prefix + ".documents")
        self._modes_tmp = temporary_path(prefix + ".modes")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = open(self._lengths_tmp, "wb")
        self._document_ends = open(self._document_ends_tmp, "wb")
        self._modes = open(self._modes_tmp, "wb") if multimodal else None

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.discard()

    def write_tokens(self, tokens: np.ndarray) -> None:
        """Append token ids (already in this dataset's dtype) to ``.bin``."""
        if tokens.dtype != self.dtype:
            raise TypeError(f"tokens are {tokens.dtype}, the dataset is {self.dtype}")
        self._bin.write(tokens.tobytes())
        self.data_bytes += tokens.nbytes

    def append_bin_file(self, path: str) -> None:
        """Append the raw contents of a ``.bin``-formatted file (tokens in this dataset's dtype)."""
        self.data_bytes += append_file(path, self._bin)

    def add_sequences(self, lengths: np.ndarray, modes: np.ndarray | None = None) -> None:
        """Record sequences whose tokens were (or will be) appended in order."""
        lengths = np.asarray(lengths, dtype=np.int32)
        self._lengths.write(lengths.tobytes())
        if self.multimodal:
            if modes is None or len(modes) != len(lengths):
                raise ValueError("a multimodal dataset needs one mode per sequence")
            self._modes.write(np.asarray(modes, dtype=np.int8).tobytes())
        self.sequence_count += len(lengths)

    def end_documents(self, sequence_ends: np.ndarray) -> None:
        """Close documents: each entry is the index (in this dataset) of the sequence after a document."""
        self._document_ends.write(np.asarray(sequence_ends, dtype=np.int64).tobytes())
        self.document_count += len(sequence_ends)

    def add_documents(self, lengths: np.ndarray) -> None:
        """Record documents of one sequence each (how preprocessing stores them)."""
        first = self.sequence_count
        self.add_sequences(lengths)
        self.end_documents(np.arange(first + 1, self.sequence_count + 1, dtype=np.int64))

    def finalize(self) -> None:
        """Write ``.idx`` and move both files to their final names (``.idx`` last)."""
        try:
            for stream in self._streams():
                stream.close()
            expected_bytes = self._token_total() * self.dtype.itemsize
            if expected_bytes != self.data_bytes:
                raise ValueError(
                    f"{self.prefix}: sequence lengths add up to {expected_bytes} bytes but .bin has {self.data_bytes}"
                )
            idx_tmp = temporary_path(idx_path(self.prefix))
            try:
                self._write_index(idx_tmp)
                # The old .idx goes first: a crash between the renames must not pair it with the new .bin.
                remove_if_exists(idx_path(self.prefix))
                os.replace(self._bin_tmp, bin_path(self.prefix))
                os.replace(idx_tmp, idx_path(self.prefix))
            finally:
                remove_if_exists(idx_tmp)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and delete every temporary file (a no-op for those already renamed)."""
        for stream in self._streams():
            stream.close()
        for path in (self._bin_tmp, self._lengths_tmp, self._document_ends_tmp, self._modes_tmp):
            remove_if_exists(path)

    def _streams(self):
        return [stream for stream in (self._bin, self._lengths, self._document_ends, self._modes) if stream is not None]

    def _token_total(self) -> int:
        total = 0
        for block in _blocks(self._lengths_tmp, np.int32):
            total += int(block.sum(dtype=np.int64))
        return total

    def _write_index(self, path: str) -> None:
        with open(path, "wb") as index_file:
            index_file.write(
                _PREAMBLE.pack(
                    INDEX_HEADER, INDEX_VERSION, _DTYPE_CODES[self.dtype], self.sequence_count, self.document_count + 1
                )
            )
            append_file(self._lengths_tmp, index_file)
            next_pointer = 0
            for block in _blocks(self._lengths_tmp, np.int32):
                ends = np.cumsum(block, dtype=np.int64) * self.dtype.itemsize + next_pointer
                index_file.write((ends - block.astype(np.int64) * self.dtype.itemsize).tobytes())
                next_pointer = int(ends[-1])
            index_file.write(np.zeros(1, dtype=np.int64).tobytes())
            append_file(self._document_ends_tmp, index_file)
            if self.multimodal:
                append_file(self._modes_tmp, index_file)
            index_file.flush()
            os.fsync(index_file.fileno())


def _blocks(path: str, dtype):
    """The array stored in ``path``, in blocks of at most ``_BLOCK_ENTRIES``."""
    with open(path, "rb") as stream:
        while block := stream.read(_BLOCK_ENTRIES * np.dtype(dtype).itemsize):
            yield np.frombuffer(block, dtype=dtype)


def merge_indexed_datasets(
    input_prefixes: list[str], output_prefix: str, multimodal: bool = False, on_dataset_done=None
) -> IndexedDatasetIndex:
    """Concatenate datasets of one dtype into ``output_prefix`` (atomically); returns its index.
    ``on_dataset_done()`` is called after each input (for progress)."""
    if not input_prefixes:
        raise ValueError("nothing to merge: no input datasets")
    indexes = []
    for prefix in input_prefixes:
        for path in (bin_path(prefix), idx_path(prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (an interrupted write leaves a .bin without its .idx)")
        index = read_index(idx_path(prefix), multimodal)
        expected_bytes = index.token_count * index.dtype.itemsize
        if os.path.getsize(bin_path(prefix)) != expected_bytes:
            raise ValueError(
                f"{bin_path(prefix)}: {os.path.getsize(bin_path(prefix))} bytes, its index says {expected_bytes}"
            )
        if indexes and index.dtype != indexes[0].dtype:
            raise ValueError(f"{index.path}: dtype {index.dtype} differs from {indexes[0].path}'s {indexes[0].dtype}")
        indexes.append(index)
    with IndexedDatasetWriter(output_prefix, indexes[0].dtype, multimodal) as writer:
        for prefix, index in zip(input_prefixes, indexes):
            first_sequence = writer.sequence_count
            for start in range(0, len(index.sequence_lengths), _BLOCK_ENTRIES):
                stop = start + _BLOCK_ENTRIES
                writer.add_sequences(
                    index.sequence_lengths[start:stop],
                    None if index.sequence_modes is None else index.sequence_modes[start:stop],
                )
            for start in range(1, len(index.document_indices), _BLOCK_ENTRIES):
                writer.end_documents(
                    np.asarray(index.document_indices[start : start + _BLOCK_ENTRIES], dtype=np.int64) + first_sequence
                )
            writer.append_bin_file(bin_path(prefix))
            if on_dataset_done is not None:
                on_dataset_done()
    return read_index(idx_path(output_prefix), multimodal)
