"""Exact and near-duplicate detection over JSONL corpora with a compact, disk-backed index.

Pipeline (driven by tools/dedup.py):

1. **Sketch pass** (:func:`sketch_batch`, in worker processes over streamed batches of lines): for
   every valid document compute the 128-bit BLAKE2b hash of its normalized text
   (:func:`~megatron_r1.corpus.normalize.dedup_key`: lower case, whitespace collapsed), its shingle
   hashes, its MinHash signature (or SimHash fingerprint) and its LSH band keys.
   :class:`SketchStore` keeps per document only numpy arrays: file index, line number, byte
   offset, exact hash, band keys; MinHash signatures go to a temporary file read back through
   ``np.memmap``. Texts are never kept: memory is about ``31 + 8 * bands`` bytes per document
   (and 16 more while clustering).
2. **Exact duplicates**: documents with equal text hashes are merged into the first one.
3. **Near duplicates** (:func:`find_duplicates`): for each band, documents are sorted by band key;
   each bucket of equal keys is walked in document order, each member is compared with one
   member of every other component already in the bucket and merged (union-find) when verified:

   * ``minhash`` with ``verify="exact"`` (default): the MinHash estimate decides when it is more
     than 3 standard errors (``3 * sqrt(t * (1 - t) / num_perm)``) away from the threshold ``t``;
     pairs within that margin are decided by the exact Jaccard similarity of their shingle sets,
     re-read from disk by byte offset (in worker processes);
   * ``minhash`` with ``verify="estimate"``: the estimate alone decides (>= threshold);
   * ``simhash``: Hamming distance <= ``max_distance``.
4. Every component keeps its **first document** (lowest position in the concatenated inputs, in
   the order given); the others are dropped. Each merge is recorded as an edge, so the clusters
   file explains why every dropped document was dropped.

Inputs must be plain (uncompressed) JSONL files: the verification step seeks to byte offsets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from megatron_r1.corpus import minhash, simhash
from megatron_r1.corpus.jsonl import RawLine, parse_text
from megatron_r1.corpus.normalize import dedup_key
from megatron_r1.corpus.parallel import ordered_map
from megatron_r1.corpus.shingles import jaccard, shingle_hashes_batch
from megatron_r1.data.jsonl import SkipCounter

METHODS = ("minhash", "simhash")
VERIFY_MODES = ("exact", "estimate")
MARGIN_STANDARD_ERRORS = 3.0
_PAIRS_PER_TASK = 2048
_MIN_PAIRS_PER_TASK = 64
_TEXTS_PER_SHINGLE_BATCH = 256  # as many as a sketch batch, which bounds the shingling arrays


@dataclass(frozen=True)
class DedupConfig:
    json_key: str = "text"
    method: str = "minhash"
    threshold: float = 0.85
    num_perm: int = 128
    bands: int | None = None
    rows: int | None = None
    shingle: str = "auto"
    ngram: int = 5
    seed: int = 1
    verify: str = "exact"
    max_distance: int = 3

    def banding(self) -> tuple[int, int]:
        """(bands, rows): simhash blocks, explicit --bands/--rows, or the automatic choice."""
        if self.method == "simhash":
            return self.max_distance + 1, 1
        if self.bands and self.rows:
            if self.bands * self.rows > self.num_perm:
                raise ValueError(f"--bands {self.bands} x --rows {self.rows} exceeds --num-perm {self.num_perm}")
            return self.bands, self.rows
        if self.bands or self.rows:
            raise ValueError("give both --bands and --rows, or neither")
        return minhash.optimal_bands_rows(self.threshold, self.num_perm)

    def margin(self) -> float:
        if self.method != "minhash" or self.verify == "estimate":
            return 0.0
        return MARGIN_STANDARD_ERRORS * math.sqrt(self.threshold * (1.0 - self.threshold) / self.num_perm)


# ---------------------------------------------------------------- sketch pass (worker side)

_worker_config: DedupConfig | None = None


def init_worker(config: DedupConfig) -> None:
    global _worker_config
    _worker_config = config


@dataclass
class SketchBatch:
    bad: list[tuple[str, int, int]]  # (reason, file index, line number)
    file_index: np.ndarray  # uint16[k]
    line: np.ndarray  # uint32[k]
    offset: np.ndarray  # uint64[k]
    exact: np.ndarray  # uint64[k, 2]
    indexable: np.ndarray  # bool[k]: has at least one shingle
    signatures: np.ndarray  # uint32[k, num_perm] or uint64[k]
    keys: np.ndarray  # uint64[k, bands]


def sketch_batch(batch: list[RawLine]) -> SketchBatch:
    config = _worker_config
    bands, rows = config.banding()
    bad, kept, digests, texts = [], [], [], []
    for file_index, line_number, offset, raw in batch:
        text, reason = parse_text(raw, config.json_key)
        if reason is not None:
            bad.append((reason, file_index, line_number))
            continue
        kept.append((file_index, line_number, offset))
        digests.append(hashlib.blake2b(dedup_key(text).encode("utf-8", "surrogatepass"), digest_size=16).digest())
        texts.append(text)
    hashes, offsets = shingle_hashes_batch(texts, config.shingle, config.ngram)
    indexable = np.diff(offsets) > 0
    if config.method == "minhash":
        signature_array = minhash.signatures(hashes, offsets, config.num_perm, config.seed)
        keys = minhash.band_keys(signature_array, bands, rows)
    else:
        signature_array = np.array(
            [simhash.fingerprint(hashes[offsets[i] : offsets[i + 1]]) for i in range(len(texts))], dtype=np.uint64
        )
        keys = simhash.block_keys(signature_array, config.max_distance)
    count = len(kept)
    locations = np.array(kept, dtype=np.uint64).reshape(count, 3)
    return SketchBatch(
        bad=bad,
        file_index=locations[:, 0].astype(np.uint16),
        line=locations[:, 1].astype(np.uint32),
        offset=locations[:, 2],
        exact=np.frombuffer(b"".join(digests), dtype=np.uint64).reshape(count, 2),
        indexable=indexable,
        signatures=signature_array,
        keys=keys,
    )


# ---------------------------------------------------------------- index (main process side)


class SketchStore:
    """Accumulates sketch batches into compact arrays; MinHash signatures go to a temporary file."""

    def __init__(self, config: DedupConfig, paths: list[str], temporary_directory: str, strict: bool = False):
        self.config = config
        self.paths = paths
        self.bad = SkipCounter(strict=strict)  # strict: the first bad line raises StrictModeError
        self._chunks: dict[str, list[np.ndarray]] = {
            name: [] for name in ("file_index", "line", "offset", "exact", "indexable", "keys")
        }
        self._fingerprints: list[np.ndarray] = []
        self._signature_file = None
        self._signature_path = None
        if config.method == "minhash":
            handle, self._signature_path = tempfile.mkstemp(
                prefix=".dedup-signatures-", suffix=".bin", dir=temporary_directory
            )
            self._signature_file = os.fdopen(handle, "wb")
        self.count = 0

    def add(self, batch: SketchBatch) -> None:
        for reason, file_index, line_number in batch.bad:
            self.bad.add(reason, self.paths[file_index], line_number)
        for name in self._chunks:
            self._chunks[name].append(getattr(batch, name))
        if self._signature_file is not None:
            self._signature_file.write(np.ascontiguousarray(batch.signatures).tobytes())
        else:
            self._fingerprints.append(batch.signatures)
        self.count += len(batch.line)

    def finish(self) -> Sketches:
        arrays = {name: np.concatenate(chunks) if chunks else None for name, chunks in self._chunks.items()}
        self._chunks.clear()
        bands = self.config.banding()[0]
        if arrays["keys"] is None:
            arrays = {
                "file_index": np.empty(0, np.uint16), "line": np.empty(0, np.uint32), "offset": np.empty(0, np.uint64),
                "exact": np.empty((0, 2), np.uint64), "indexable": np.empty(0, bool), "keys": np.empty((0, bands), np.uint64),
            }  # fmt: skip
        if self._signature_file is not None:
            self._signature_file.close()
            if self.count:
                # A plain ndarray view of the mapping: indexing a np.memmap subclass costs ~20 us per call.
                signatures = np.memmap(
                    self._signature_path, dtype=np.uint32, mode="r", shape=(self.count, self.config.num_perm)
                ).view(np.ndarray)
            else:
                signatures = np.empty((0, self.config.num_perm), np.uint32)
        else:
            signatures = np.concatenate(self._fingerprints) if self._fingerprints else np.empty(0, np.uint64)
        return Sketches(signatures=signatures, **arrays)

    def close(self) -> None:
        if self._signature_file is not None and not self._signature_file.closed:
            self._signature_file.close()
        if self._signature_path and os.path.exists(self._signature_path):
            os.remove(self._signature_path)


@dataclass
class Sketches:
    file_index: np.ndarray
    line: np.ndarray
    offset: np.ndarray
    exact: np.ndarray
    indexable: np.ndarray
    keys: np.ndarray
    signatures: np.ndarray


class UnionFind:
    """Union-find whose roots are always the smallest document id of their component."""

    def __init__(self, size: int):
        self.parent = np.arange(size, dtype=np.int64)

    def find(self, node: int) -> int:
        parent = self.parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = int(parent[node])
        return node

    def union(self, first: int, second: int) -> bool:
        first, second = self.find(first), self.find(second)
        if first == second:
            return False
        if second < first:
            first, second = second, first
        self.parent[second] = first
        return True

    def roots(self) -> np.ndarray:
        roots = self.parent.copy()
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                return roots
            roots = jumped


@dataclass
class Edge:
    first: int
    second: int
    match: str  # "exact_text", "minhash_estimate", "jaccard" or "simhash"
    similarity: float


@dataclass
class DedupResult:
    roots: np.ndarray  # int64[docs]: representative (first document) of each document's cluster
    edges: list[Edge]
    exact_duplicates: int
    candidate_checks: int
    exact_jaccard_checks: int

    @property
    def keep(self) -> np.ndarray:
        return self.roots == np.arange(len(self.roots))


def _run_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every run of length >= 2 in a sorted 1-D (or row-sorted 2-D) array."""
    if len(sorted_values) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    equal = sorted_values[1:] == sorted_values[:-1]
    if equal.ndim == 2:
        equal = equal.all(axis=1)
    changes = np.flatnonzero(np.diff(np.concatenate(([0], equal.astype(np.int8), [0]))))
    return changes[0::2], changes[1::2] + 1


def _runs_of_equal(sorted_values: np.ndarray) -> Iterator[tuple[int, int]]:
    starts, ends = _run_bounds(sorted_values)
    yield from zip(starts.tolist(), ends.tolist())


def find_duplicates(
    sketches: Sketches,
    config: DedupConfig,
    paths: list[str],
    workers: int,
    progress: Callable[..., object] = lambda iterable, **kwargs: iterable,
) -> DedupResult:
    """Exact, then near-duplicate clustering; ``progress`` wraps iterables (e.g. ``tqdm``)."""
    count = len(sketches.line)
    union_find = UnionFind(count)
    edges: list[Edge] = []
    exact_duplicates = _merge_exact_duplicates(sketches, union_find, edges)
    eligible = np.flatnonzero(sketches.indexable & (union_find.roots() == np.arange(count)))

    margin = config.margin()
    ambiguous: set[tuple[int, int]] = set()  # a pair can collide in several bands
    checks = 0
    bands = sketches.keys.shape[1]
    for band in progress(range(bands), desc="LSH bands", unit="band"):
        checks += _merge_band(
            sketches.keys[eligible, band], eligible, sketches.signatures, config, margin, union_find, edges, ambiguous
        )

    pending = _pending_pairs(ambiguous, union_find, count)
    exact_checks = _merge_by_exact_jaccard(pending, sketches, config, paths, workers, union_find, edges, progress)
    return DedupResult(union_find.roots(), edges, exact_duplicates, checks, exact_checks)


def _merge_exact_duplicates(sketches: Sketches, union_find: UnionFind, edges: list[Edge]) -> int:
    """Merge the documents of equal text hashes into the first one; the number of duplicates merged."""
    order = np.lexsort((sketches.exact[:, 1], sketches.exact[:, 0]))
    exact_duplicates = 0
    for start, end in _runs_of_equal(sketches.exact[order]):
        members = np.sort(order[start:end])
        for member in members[1:]:
            union_find.union(int(members[0]), int(member))
            edges.append(Edge(int(members[0]), int(member), "exact_text", 1.0))
        exact_duplicates += end - start - 1
    return exact_duplicates


def _merge_band(band_keys, eligible, signatures, config, margin, union_find, edges, ambiguous) -> int:
    """Judge the buckets of equal keys of one LSH band (keys of the eligible documents); the number of checks."""
    band_order = np.argsort(band_keys, kind="stable")
    members = eligible[band_order]
    starts, ends = _run_bounds(band_keys[band_order])
    split = _split_buckets(union_find.roots()[members], starts, ends)
    pairs = split & (ends - starts == 2)
    # Buckets of two (nearly all of them): every estimate of the band in one array operation.
    first, second = members[starts[pairs]], members[starts[pairs] + 1]
    checks = _merge_pairs(first, second, signatures, config, margin, union_find, edges, ambiguous)
    for start, end in zip(starts[split & ~pairs].tolist(), ends[split & ~pairs].tolist()):
        checks += _merge_bucket(members[start:end], signatures, config, margin, union_find, edges, ambiguous)
    return checks


def _split_buckets(member_roots: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which buckets ``member_roots[starts[i]:ends[i]]`` hold more than one cluster."""
    # A bucket whose members were all in one cluster when the band started still is: skip it
    # (most buckets of later bands). Their roots' minimum equals their maximum.
    if not len(starts):
        return np.empty(0, bool)
    roots = np.append(member_roots, 0)
    bounds = np.stack([starts, ends], axis=1).ravel()
    return np.minimum.reduceat(roots, bounds)[0::2] != np.maximum.reduceat(roots, bounds)[0::2]


def _pending_pairs(ambiguous: set[tuple[int, int]], union_find: UnionFind, count: int) -> list[tuple[int, int]]:
    """The ambiguous pairs not merged since, those of one group of related documents next to each other."""
    pending = [
        (first, second) for first, second in sorted(ambiguous) if union_find.find(first) != union_find.find(second)
    ]
    # Pairs of one group of related documents go to the same task, where each text is read once.
    groups = UnionFind(count)
    for first, second in pending:
        groups.union(first, second)
    pending.sort(key=lambda pair: (groups.find(pair[0]), pair))
    return pending


def _jaccard_tasks(
    pending: list[tuple[int, int]], sketches: Sketches, paths: list[str], workers: int
) -> list[list[tuple[str, int, str, int]]]:
    """The pending pairs as consecutive batches of (path_a, offset_a, path_b, offset_b) for exact_jaccard_task."""
    # At least 4 tasks per worker (when there are enough pairs), so that the workers share the work evenly.
    per_task = max(_MIN_PAIRS_PER_TASK, min(_PAIRS_PER_TASK, math.ceil(len(pending) / (4 * workers))))
    return [
        [
            (
                paths[sketches.file_index[a]],
                int(sketches.offset[a]),
                paths[sketches.file_index[b]],
                int(sketches.offset[b]),
            )
            for a, b in pending[start : start + per_task]
        ]
        for start in range(0, len(pending), per_task)
    ]


def _merge_by_exact_jaccard(pending, sketches, config, paths, workers, union_find, edges, progress) -> int:
    """Merge the pending pairs whose exact Jaccard similarity (in worker processes) reaches the
    threshold; the number of pairs checked."""
    if not pending:
        return 0
    tasks = _jaccard_tasks(pending, sketches, paths, workers)
    similarities = ordered_map(exact_jaccard_task, tasks, workers, init_worker, (config,))
    position = 0
    for task_similarities in progress(similarities, total=len(tasks), desc="exact Jaccard", unit="batch"):
        for similarity in task_similarities:
            first, second = pending[position]
            position += 1
            if similarity >= config.threshold and union_find.union(first, second):
                edges.append(Edge(first, second, "jaccard", similarity))
    return len(pending)


def _judge(config, margin, signature, others) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(similarities, accepted, undecided, match name) of one signature against rows of others,
    or of two equally long arrays of signatures row by row."""
    if config.method == "minhash":
        similarities = minhash.estimated_jaccard(signature, others)
        accepted = similarities >= config.threshold + margin
        undecided = (similarities >= config.threshold - margin) & ~accepted
        return similarities, accepted, undecided, "minhash_estimate"
    distances = simhash.hamming_distance(signature, others)
    return 1.0 - distances / simhash.BITS, distances <= config.max_distance, np.zeros(len(distances), bool), "simhash"


def _merge_pairs(first, second, signatures, config, margin, union_find, edges, ambiguous) -> int:
    """Judge the pairs (first[i], second[i]) of two-member buckets; first[i] < second[i]."""
    if len(first) == 0:
        return 0
    similarities, accepted, undecided, match = _judge(config, margin, signatures[first], signatures[second])
    checks = 0
    for a, b, similarity, accept, unsure in zip(
        first.tolist(), second.tolist(), similarities.tolist(), accepted.tolist(), undecided.tolist()
    ):
        if union_find.find(a) == union_find.find(b) or (a, b) in ambiguous:
            continue  # merged earlier in this band, or already queued for the exact check
        checks += 1
        if accept:
            union_find.union(a, b)
            edges.append(Edge(a, b, match, round(similarity, 4)))
        elif unsure:
            ambiguous.add((a, b))
    return checks


def _merge_bucket(members, signatures, config, margin, union_find, edges, ambiguous) -> int:
    """Compare each bucket member with one member of every other component seen before it."""
    component_members: dict[int, int] = {}
    checks = 0
    for member in members.tolist():
        root = union_find.find(member)
        others = [other for other_root, other in component_members.items() if union_find.find(other_root) != root]
        if others:
            checks += len(others)
            similarities, accepted, undecided, match = _judge(config, margin, signatures[member], signatures[others])
            for other, similarity, accept, unsure in zip(others, similarities.tolist(), accepted, undecided):
                if accept:
                    if union_find.union(other, member):
                        edges.append(Edge(min(other, member), max(other, member), match, round(similarity, 4)))
                elif unsure:
                    ambiguous.add((min(other, member), max(other, member)))
        component_members.setdefault(union_find.find(member), member)
    return checks


def exact_jaccard_task(pairs: list[tuple[str, int, str, int]]) -> list[float]:
    """Exact Jaccard similarity for (path_a, offset_a, path_b, offset_b) pairs, read from disk."""
    config = _worker_config
    # Each document once, in file order; texts are read and shingled a batch at a time.
    documents = sorted(
        {
            (path, offset)
            for path_a, offset_a, path_b, offset_b in pairs
            for path, offset in ((path_a, offset_a), (path_b, offset_b))
        }
    )
    sets: dict[tuple[str, int], np.ndarray] = {}
    handles: dict[str, object] = {}
    try:
        for start in range(0, len(documents), _TEXTS_PER_SHINGLE_BATCH):
            chunk = documents[start : start + _TEXTS_PER_SHINGLE_BATCH]
            texts = []
            for path, offset in chunk:
                handle = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                handle.seek(offset)
                texts.append(parse_text(handle.readline(), config.json_key)[0] or "")
            hashes, offsets = shingle_hashes_batch(texts, config.shingle, config.ngram)
            for index, document in enumerate(chunk):
                sets[document] = np.unique(hashes[offsets[index] : offsets[index + 1]])
    finally:
        for handle in handles.values():
            handle.close()
    return [
        round(jaccard(sets[(path_a, offset_a)], sets[(path_b, offset_b)]), 4)
        for path_a, offset_a, path_b, offset_b in pairs
    ]


# ---------------------------------------------------------------- outputs


def location(sketches: Sketches, paths: list[str], doc: int) -> str:
    return f"{paths[sketches.file_index[doc]]}:{sketches.line[doc]}"


def iter_cluster_records(sketches: Sketches, result: DedupResult, paths: list[str]) -> Iterator[dict]:
    """One record per cluster of >= 2 documents, in order of the representative."""
    roots = result.roots
    duplicated = np.flatnonzero(~result.keep)
    if len(duplicated) == 0:
        return
    edges_by_root: dict[int, list[Edge]] = {}
    for edge in result.edges:
        edges_by_root.setdefault(int(roots[edge.first]), []).append(edge)
    order = np.argsort(roots, kind="stable")
    sorted_roots = roots[order]
    for cluster_id, (start, end) in enumerate(_runs_of_equal(sorted_roots)):
        members = order[start:end]
        root = int(sorted_roots[start])
        yield {
            "cluster": cluster_id,
            "representative": location(sketches, paths, root),
            "size": int(end - start),
            "members": [location(sketches, paths, int(member)) for member in members],
            "edges": [
                {
                    "a": location(sketches, paths, edge.first),
                    "b": location(sketches, paths, edge.second),
                    "match": edge.match,
                    "similarity": edge.similarity,
                }
                for edge in edges_by_root.get(root, [])
            ],
        }


def write_clusters(handle, sketches: Sketches, result: DedupResult, paths: list[str]) -> int:
    clusters = 0
    for record in iter_cluster_records(sketches, result, paths):
        handle.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        clusters += 1
    return clusters


def kept_lines_by_file(sketches: Sketches, result: DedupResult, file_count: int) -> list[np.ndarray]:
    keep = result.keep
    return [np.sort(sketches.line[keep & (sketches.file_index == file_index)]) for file_index in range(file_count)]
