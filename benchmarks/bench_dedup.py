"""Near-duplicate detection quality and throughput: tools/dedup.py vs datasketch MinHashLSH.

Generates an English + Chinese corpus with known relations: unrelated documents, exact copies
(with case / whitespace changes), near duplicates (a few words or characters changed, paragraphs
reordered, or both) and "hard negatives" (heavily edited copies, usually below the threshold).
Ground truth is the exact Jaccard similarity of the shingle sets (same shingles as both tools:
word 5-grams for English, character 5-grams for Chinese) for every pair inside a family (a base
document and its copies); documents of different families share no text by construction, and any
cross-family pair that a tool reports is checked exactly too.

Reported for tools/dedup.py (MinHash, --threshold 0.8, 2 worker processes, end to end from the
JSONL file: read, sketch, index, verify, write outputs):

* precision: fraction of the duplicate decisions (cluster edges) whose pair has Jaccard >= 0.8;
* recall: fraction of pairs with Jaccard >= 0.8 that end up in the same cluster;
* docs/s, MB/s and peak RSS (largest process);
* CPU time (user + system, all its processes), because on a shared machine the wall-clock ratio
  depends on how busy the CPU was during each run, and the CPU-time ratio does not.

datasketch (MinHash num_perm=128 with ``update_batch``, MinHashLSH threshold 0.8, same shingle
strings) is timed from the texts in memory: shingling + signatures + index insert + query, once
in one process and once with the signatures computed by a 2-process pool; the speed ratio uses the
faster of the two. tools/dedup.py runs as many times, interleaved with the datasketch runs (the
CPU may be shared with other work), and its faster run counts. datasketch's precision / recall
(unverified LSH candidates) are shown for reference.

Run: python benchmarks/bench_dedup.py [--docs 20000] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np

from megatron_r1.corpus.shingles import shingle_strings

THRESHOLD = 0.8
NGRAM = 5


# ---------------------------------------------------------------- corpus


def _vocabulary(rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ["a", "e", "i", "o", "u", "ai", "ou", "ea"]]
    english = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(12000)})
    han = np.arange(0x4E00, 0x4E00 + 3500)
    return english, han, syllables


def _zipf_choice(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    ranks = np.arange(1, size + 1, dtype=np.float64)
    weights = 1.0 / ranks**1.05
    return rng.choice(size, size=count, p=weights / weights.sum())


def _paragraphs(rng, language: str, english: list[str], han: np.ndarray) -> list[list[str]]:
    """A document as paragraphs of units (English words or Chinese characters)."""
    paragraphs = []
    for _ in range(rng.integers(3, 7)):
        if language == "en":
            paragraphs.append([english[i] for i in _zipf_choice(rng, len(english), int(rng.integers(30, 80)))])
        else:
            paragraphs.append([chr(int(han[i])) for i in _zipf_choice(rng, len(han), int(rng.integers(60, 160)))])
    return paragraphs


def _render(paragraphs: list[list[str]], language: str) -> str:
    if language == "en":
        return "\n\n".join(" ".join(units) + "." for units in paragraphs)
    return "\n\n".join("".join(units) + "。" for units in paragraphs)


def _edit(rng, paragraphs, language, english, han, fraction: float, reorder: bool) -> list[list[str]]:
    edited = [list(units) for units in paragraphs]
    total = sum(len(units) for units in edited)
    for _ in range(max(1, int(round(fraction * total)))):
        units = edited[rng.integers(len(edited))]
        position = rng.integers(len(units))
        units[position] = (
            english[rng.integers(len(english))] if language == "en" else chr(int(han[rng.integers(len(han))]))
        )
    if reorder:
        rng.shuffle(edited)
    return edited


def generate_corpus(documents: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts and the family id of each text (documents of one family derive from one base)."""
    rng = np.random.default_rng(seed)
    english, han, _ = _vocabulary(rng)
    texts, families = [], []
    family = 0
    while len(texts) < documents:
        language = "zh" if rng.random() < 0.45 else "en"
        base = _paragraphs(rng, language, english, han)
        members = [_render(base, language)]
        kind = rng.random()
        if kind < 0.10:  # exact copies, differing only in case / whitespace
            members.append(members[0].upper() if language == "en" else members[0].replace("\n\n", "\n \n"))
        elif kind < 0.35:  # near duplicates: a few units changed and/or paragraphs reordered
            for _ in range(rng.integers(1, 4)):
                fraction = float(rng.choice([0.0, 0.005, 0.01, 0.02, 0.03]))
                reorder = bool(rng.random() < 0.5) or fraction == 0.0
                members.append(_render(_edit(rng, base, language, english, han, fraction, reorder), language))
        elif kind < 0.45:  # hard negatives: heavy edits, mostly below the threshold
            fraction = float(rng.uniform(0.04, 0.15))
            members.append(_render(_edit(rng, base, language, english, han, fraction, False), language))
        for text in members:
            texts.append(text)
            families.append(family)
        family += 1
    order = rng.permutation(len(texts))  # duplicates are scattered through the corpus
    return [texts[i] for i in order], [families[i] for i in order]


def _shingle_set(text: str) -> set[str]:
    return set(shingle_strings(text, "auto", NGRAM))


def true_jaccard(first: str, second: str) -> float:
    a, b = _shingle_set(first), _shingle_set(second)
    return len(a & b) / len(a | b) if a or b else 1.0


def ground_truth(texts: list[str], families: list[int]) -> set[tuple[int, int]]:
    by_family: dict[int, list[int]] = {}
    for doc, family in enumerate(families):
        by_family.setdefault(family, []).append(doc)
    truth = set()
    for members in by_family.values():
        for a, b in itertools.combinations(members, 2):
            if true_jaccard(texts[a], texts[b]) >= THRESHOLD:
                truth.add((min(a, b), max(a, b)))
    return truth


# ---------------------------------------------------------------- systems (each in its own process)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished (reaped) worker processes."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _peak_rss_mib() -> float:
    return (
        max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        / 1024
    )


def run_ours(corpus_path: str, work_dir: str, workers: int, queue) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
    import dedup as dedup_tool  # tools/dedup.py

    output, clusters = os.path.join(work_dir, "kept.jsonl"), os.path.join(work_dir, "clusters.jsonl")
    with open(os.devnull, "w") as quiet:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = quiet
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        try:
            dedup_tool.main(
                [
                    "--input",
                    corpus_path,
                    "--output",
                    output,
                    "--clusters",
                    clusters,
                    "--threshold",
                    str(THRESHOLD),
                    "--ngram",
                    str(NGRAM),
                    "--workers",
                    str(workers),
                ]
            )
        finally:
            sys.stdout, sys.stderr = stdout, stderr
        elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    edges, clustered = [], []
    with open(clusters) as handle:
        for line in handle:
            record = json.loads(line)
            members = [int(member.rsplit(":", 1)[1]) - 1 for member in record["members"]]
            clustered.append(members)
            edges += [
                (int(edge["a"].rsplit(":", 1)[1]) - 1, int(edge["b"].rsplit(":", 1)[1]) - 1) for edge in record["edges"]
            ]
    queue.put(
        {"seconds": elapsed, "cpu_seconds": cpu, "peak_rss_mib": _peak_rss_mib(), "edges": edges, "clusters": clustered}
    )


def _datasketch_signature(text: str):
    from datasketch import MinHash

    minhash = MinHash(num_perm=128, seed=1)
    minhash.update_batch([shingle.encode("utf-8") for shingle in _shingle_set(text)])
    return minhash.hashvalues


def run_datasketch(corpus_path: str, workers: int, queue) -> None:
    from datasketch import LeanMinHash, MinHashLSH

    with open(corpus_path, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            hashvalues = pool.map(_datasketch_signature, texts, chunksize=64)
    else:
        hashvalues = [_datasketch_signature(text) for text in texts]
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    pairs = []
    for doc, values in enumerate(hashvalues):
        minhash = LeanMinHash(seed=1, hashvalues=values, scheme="affine32")
        pairs += [(other, doc) for other in lsh.query(minhash)]
        lsh.insert(doc, minhash)
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    queue.put(
        {
            "seconds": elapsed,
            "cpu_seconds": cpu,
            "peak_rss_mib": _peak_rss_mib(),
            "pairs": pairs,
            "bands_rows": [lsh.b, lsh.r],
        }
    )


def _in_child(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty: keep waiting while the child is alive
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__} failed with exit code {process.exitcode}") from None
    process.join()
    return result


# ---------------------------------------------------------------- evaluation


def evaluate(predicted_pairs, clustered_pairs, truth, texts) -> tuple[float, float]:
    cache: dict[tuple[int, int], float] = {}

    def similar(pair) -> bool:
        pair = (min(pair), max(pair))
        if pair in truth:
            return True
        if pair not in cache:  # not in the family-based truth: check exactly
            cache[pair] = true_jaccard(texts[pair[0]], texts[pair[1]])
        return cache[pair] >= THRESHOLD

    predicted = {(min(pair), max(pair)) for pair in predicted_pairs}
    precision = sum(map(similar, predicted)) / len(predicted) if predicted else 1.0
    together = {(min(pair), max(pair)) for pair in clustered_pairs}
    recall = len(truth & together) / len(truth) if truth else 1.0
    return precision, recall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="documents in the generated corpus (default: 20000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both tools (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts, families = generate_corpus(args.docs, args.seed)
    truth = ground_truth(texts, families)
    with tempfile.TemporaryDirectory() as work_dir:
        corpus_path = os.path.join(work_dir, "corpus.jsonl")
        with open(corpus_path, "w", encoding="utf-8") as handle:
            for doc, text in enumerate(texts):
                handle.write(json.dumps({"id": doc, "text": text}, ensure_ascii=False) + "\n")
        megabytes = os.path.getsize(corpus_path) / 1e6
        chinese = sum(1 for text in texts if "\u4e00" <= text[0] <= "\u9fff")
        print(
            f"corpus: {len(texts)} docs ({chinese} Chinese), {megabytes:.1f} MB, {len(set(families))} families, {len(truth)} pairs with Jaccard >= {THRESHOLD}"
        )

        # The machine may be shared: each system gets one timed run per datasketch configuration,
        # interleaved (ours, datasketch, ours, datasketch ...), and its fastest run counts.
        ours_runs, peers = [], []
        for workers in sorted({1, args.workers}):
            ours_runs.append(_in_child(run_ours, corpus_path, work_dir, args.workers))
            peers.append((workers, _in_child(run_datasketch, corpus_path, workers)))
        assert all(run["edges"] == ours_runs[0]["edges"] for run in ours_runs), "tools/dedup.py is not deterministic"
        ours = min(ours_runs, key=lambda run: run["seconds"])
        cluster_pairs = [pair for members in ours["clusters"] for pair in itertools.combinations(members, 2)]
        precision, recall = evaluate(ours["edges"], cluster_pairs, truth, texts)
        cluster_precision = evaluate(cluster_pairs, [], truth, texts)[0]
        run_times = ", ".join(f"{run['seconds']:.2f}" for run in ours_runs)
        print(
            f"tools/dedup.py ({args.workers} workers): precision {precision:.4f}, recall {recall:.4f} "
            f"(pairs inside clusters: {len(cluster_pairs)}, of which Jaccard >= {THRESHOLD}: {cluster_precision:.4f}), "
            f"{len(texts) / ours['seconds']:.0f} docs/s, {megabytes / ours['seconds']:.2f} MB/s, {ours['seconds']:.2f} s "
            f"(runs: {run_times} s), CPU {ours['cpu_seconds']:.2f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB"
        )

        best = None
        for workers, peer in peers:
            peer_precision, peer_recall = evaluate(peer["pairs"], peer["pairs"], truth, texts)
            print(
                f"datasketch MinHashLSH ({workers} process{'es' if workers > 1 else ''}, bands x rows {peer['bands_rows'][0]} x {peer['bands_rows'][1]}, no verification): "
                f"precision {peer_precision:.4f}, recall {peer_recall:.4f}, {len(texts) / peer['seconds']:.0f} docs/s, "
                f"{megabytes / peer['seconds']:.2f} MB/s, {peer['seconds']:.2f} s, CPU {peer['cpu_seconds']:.2f} s, peak RSS {peer['peak_rss_mib']:.0f} MiB"
            )
            best = peer["seconds"] if best is None else min(best, peer["seconds"])
        cpu_ratio = min(peer["cpu_seconds"] for _, peer in peers) / min(run["cpu_seconds"] for run in ours_runs)
        ratio = best / ours["seconds"]
        print(
            f"throughput ratio tools/dedup.py / fastest datasketch: {ratio:.2f}x wall-clock (target >= 2x), {cpu_ratio:.2f}x in CPU time; precision target >= 0.99, recall target >= 0.95"
        )
        met = precision >= 0.99 and recall >= 0.95 and ratio >= 2.0
        print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
