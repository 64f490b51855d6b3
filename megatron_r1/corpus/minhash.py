"""MinHash signatures, LSH banding and the choice of bands x rows.

Signature: each shingle's 64-bit hash is cut to its low 32 bits ``x`` (the hashes are already
avalanche-mixed); for permutation ``k`` with random odd ``a_k`` and random ``b_k`` (drawn from
``seed``), the signature value is ``min over shingles of (a_k * x + b_k) mod 2**32``, an affine
bijection of the 32-bit space (the scheme datasketch >= 2.0 calls ``affine32``). It is computed for
a batch of documents at once as the [num_shingles x num_perm] uint32 matrix (in blocks of about
``_BLOCK_ROWS`` shingles to bound memory) and a minimum over each document's rows:
there is no per-shingle Python work, which is where the speed over datasketch comes from
(datasketch hashes every shingle with SHA-1 in a Python loop).

LSH: the first ``bands * rows`` signature values are cut into ``bands`` bands; each band is reduced
to a uint64 key. Two documents become candidates when any band key matches; the probability is
``1 - (1 - s**rows)**bands`` for Jaccard similarity ``s``.

Choosing bands x rows (:func:`optimal_bands_rows`): every candidate pair is verified afterwards,
so a false-positive candidate costs only time while a missed candidate costs recall. Among all
``bands * rows <= num_perm`` whose candidate probability at ``s = threshold`` is at least
``MIN_RECALL_AT_THRESHOLD`` (0.99), we take the one with the smallest false-positive area
(candidate probability integrated over s in [0, threshold]); if none reaches 0.99, the one with
the highest probability at the threshold. (datasketch instead minimises 0.5*FP area + 0.5*FN
area, which for threshold 0.8 and 128 permutations gives a pair-recall of only ~0.8 at s = 0.8.)
"""

from __future__ import annotations

import functools

import numpy as np

from megatron_r1.corpus.shingles import mix64

EMPTY_VALUE = np.uint32(0xFFFFFFFF)
_BLOCK_ROWS = 4096
MIN_RECALL_AT_THRESHOLD = 0.99


@functools.cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    multipliers = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    offsets = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint32)
    return multipliers, offsets


def signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """uint32[docs, num_perm] MinHash signatures of the documents whose shingle hashes are
    ``hashes[offsets[i]:offsets[i + 1]]`` (all EMPTY_VALUE for a document without shingles)."""
    multipliers, offsets_k = permutations(num_perm, seed)
    low_bits = hashes.astype(np.uint32)
    documents = len(offsets) - 1
    result = np.full((documents, num_perm), EMPTY_VALUE, dtype=np.uint32)
    counts = np.diff(offsets)
    document = 0
    while document < documents:
        if counts[document] > _BLOCK_ROWS:  # one long document: blocks of its own shingles
            for start in range(int(offsets[document]), int(offsets[document + 1]), _BLOCK_ROWS):
                block = np.multiply.outer(
                    low_bits[start : min(start + _BLOCK_ROWS, int(offsets[document + 1]))], multipliers
                )
                block += offsets_k
                np.minimum(result[document], block.min(axis=0), out=result[document])
            document += 1
            continue
        # Several documents whose shingles fit one block: one matrix, a minimum per document's rows.
        last = int(np.searchsorted(offsets, offsets[document] + _BLOCK_ROWS, side="right")) - 1
        last = max(min(last, documents), document + 1)
        start = int(offsets[document])
        block = np.multiply.outer(low_bits[start : int(offsets[last])], multipliers)
        block += offsets_k
        bounds = (offsets[document : last + 1] - start).tolist()
        for member, (first, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=document):
            if end > first:  # (a loop of contiguous column minima beats minimum.reduceat over rows)
                block[first:end].min(axis=0, out=result[member])
        document = last
    return result


def _candidate_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    return 1.0 - (1.0 - similarity**rows) ** bands


@functools.cache
def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for the threshold and signature length, chosen as the module doc describes."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    below = np.linspace(0.0, threshold, 201)
    best_key, best = None, (1, num_perm)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            at_threshold = float(_candidate_probability(np.float64(threshold), bands, rows))
            false_positive = float(np.trapezoid(_candidate_probability(below, bands, rows), below))
            # Sort key: first reach the recall floor (or get as close as possible), then fewest false positives.
            key = (
                (0.0, false_positive)
                if at_threshold >= MIN_RECALL_AT_THRESHOLD
                else (1.0 - at_threshold, false_positive)
            )
            if best_key is None or key < best_key:
                best_key, best = key, (bands, rows)
    return best


@functools.cache
def _band_multipliers(rows: int) -> np.ndarray:
    return np.random.default_rng(0xBA4D).integers(0, 1 << 63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[docs, bands] keys from uint32[docs, num_perm] signatures."""
    banded = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    return mix64((banded * _band_multipliers(rows)).sum(axis=2, dtype=np.uint64))


def estimated_jaccard(signature_a: np.ndarray, signatures_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values between one signature and each row of ``signatures_b``
    (or row by row, for two arrays of signatures of the same shape)."""
    return (signatures_b == signature_a).mean(axis=-1)
