"""Sampling several cleaned sources to target token proportions, and Megatron blend weights.

Planning (:func:`plan_quotas`): with normalized weights ``w_i`` and ``T_i`` tokens available in
source ``i``, the largest mixture that needs no repetition has ``min_i T_i / w_i`` tokens. The
target total is ``--total-tokens`` when given, else that maximum; a target above it is an error
unless upsampling is allowed. Each source's quota is ``w_i * total``.

Selection (:func:`select_documents`, seeded): a source contributes ``floor(quota / T_i)`` full
passes over all its documents plus, for the remainder, a prefix of a random permutation of its
documents whose token sum is closest to the remainder (so documents are drawn without
replacement within each pass; only whole passes repeat a document). The result is a repeat count
per document (0 = not selected).

Writing (:func:`interleave_order`): each source streams its selected lines in file order, pass
after pass (a repeated document appears once per pass, not twice in a row); the sequence of
sources is a seeded random shuffle of all selected lines' source labels, so every part of the
output has the target proportions in expectation while every input file is read sequentially.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megatron_r1.corpus.jsonl import RawLine, iter_lines, parse_text
from megatron_r1.corpus.tokens import TokenCounter


class MixtureError(ValueError):
    pass


@dataclass
class SourceCounts:
    """Token counts of the usable documents of one source, with where each document is."""

    name: str
    paths: list[str]
    file_index: np.ndarray  # uint16[docs]
    line: np.ndarray  # uint32[docs]
    tokens: np.ndarray  # int64[docs]

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())


def normalize_weights(weights: dict[str, float]) -> dict[str, float]:
    for name, weight in weights.items():
        if not weight > 0 or not math.isfinite(weight):
            raise MixtureError(f"--weight {name}={weight}: weights must be positive numbers")
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def plan_quotas(
    available: dict[str, int], weights: dict[str, float], total_tokens: int | None, allow_upsample: bool
) -> tuple[dict[str, float], int]:
    """Token quota per source and the total, as described in the module docstring."""
    weights = normalize_weights(weights)
    empty = [name for name, tokens in available.items() if tokens == 0]
    if empty:
        raise MixtureError(f"source(s) {', '.join(empty)} have no usable documents")
    limiting = min(weights, key=lambda name: available[name] / weights[name])
    largest = int(available[limiting] / weights[limiting])
    if total_tokens is None:
        total = largest
    elif total_tokens <= largest or allow_upsample:
        total = total_tokens
    else:
        needed = weights[limiting] * total_tokens
        raise MixtureError(
            f"--total-tokens {total_tokens} needs {needed:.0f} tokens of source '{limiting}' but it has {available[limiting]}; "
            f"the largest mixture without repeating documents has {largest} tokens: lower --total-tokens or pass --allow-upsample"
        )
    return {name: weights[name] * total for name in weights}, total


def select_documents(tokens: np.ndarray, quota: float, rng: np.random.Generator) -> np.ndarray:
    """Repeat count per document (uint32) whose token sum is as close as possible to ``quota``."""
    available = int(tokens.sum())
    passes = int(quota // available) if available else 0
    remainder = quota - passes * available
    counts = np.full(len(tokens), passes, dtype=np.uint32)
    order = rng.permutation(len(tokens))
    cumulative = np.cumsum(tokens[order])
    take = int(np.searchsorted(cumulative, remainder, side="right"))
    below = cumulative[take - 1] if take else 0
    if take < len(tokens) and cumulative[take] - remainder < remainder - below:
        take += 1
    counts[order[:take]] += 1
    return counts


def iter_selected_lines(source: SourceCounts, counts: np.ndarray) -> Iterator[bytes]:
    """The source's selected lines, file order, one pass per repetition."""
    for repetition in range(int(counts.max(initial=0))):
        for file_index, path in enumerate(source.paths):
            mask = (source.file_index == file_index) & (counts > repetition)
            wanted = source.line[mask]
            position = 0
            if len(wanted) == 0:
                continue
            for _, line_number, _, raw in iter_lines(path, file_index):
                if line_number == wanted[position]:
                    yield raw if raw.endswith(b"\n") else raw + b"\n"
                    position += 1
                    if position == len(wanted):
                        break


def interleave_order(line_counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Source index of every output line: a random shuffle of the multiset of labels."""
    labels = np.repeat(np.arange(len(line_counts), dtype=np.uint16), line_counts)
    rng.shuffle(labels)
    return labels


# ---------------------------------------------------------------- counting pass (worker side)

_counter = None
_json_key = "text"


def init_counter(tokenizer_type: str | None, tokenizer_model: str | None, proxy: str, json_key: str) -> None:
    global _counter, _json_key
    _counter = TokenCounter(tokenizer_type, tokenizer_model, proxy)
    _json_key = json_key


def count_batch(batch: list[RawLine]) -> tuple[list[tuple[str, int, int]], np.ndarray, np.ndarray]:
    """(bad lines as (reason, file index, line), uint64[docs, 2] of (file index, line), int64 token counts)."""
    bad, located, texts = [], [], []
    for file_index, line_number, _, raw in batch:
        text, reason = parse_text(raw, _json_key)
        if reason is not None:
            bad.append((reason, file_index, line_number))
            continue
        located.append((file_index, line_number))
        texts.append(text)
    return bad, np.array(located, dtype=np.uint64).reshape(-1, 2), np.array(_counter.count(texts), dtype=np.int64)
