"""Remove exact and near-duplicate documents from JSONL corpora (MinHash + LSH, or SimHash).

Exact duplicates (same text after lower-casing and whitespace collapsing) are found by a 128-bit
hash; near duplicates by MinHash + LSH with verification (or SimHash). One document per cluster is
kept: the first one in input order (files in the order given, then line order). Kept lines are
copied byte for byte. The clusters file has one JSON line per cluster of >= 2 documents:
``{"cluster", "representative", "size", "members": ["file:line", ...], "edges": [{"a", "b",
"match", "similarity"}, ...]}``, where ``match`` is ``exact_text``, ``minhash_estimate``,
``jaccard`` (exact Jaccard of the shingle sets) or ``simhash``.

Memory: only the index grows, about 31 + 8 * bands bytes per document (16 more while clustering)
plus 4 * num_perm bytes per document in a temporary signature file (next to --output, or in
--tmp-dir). See megatron_r1/corpus/dedup.py for the full method.

Example:
    python tools/dedup.py --input clean/*.jsonl --output dedup.jsonl --clusters clusters.jsonl
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from tqdm import tqdm

from megatron_r1.corpus.dedup import (
    METHODS,
    VERIFY_MODES,
    DedupConfig,
    SketchStore,
    find_duplicates,
    init_worker,
    kept_lines_by_file,
    sketch_batch,
    write_clusters,
)
from megatron_r1.corpus.jsonl import (
    InputError,
    atomic_output,
    check_output_not_input,
    expand_inputs,
    iter_line_batches,
    iter_lines,
    total_bytes,
)
from megatron_r1.corpus.parallel import ordered_map
from megatron_r1.corpus.shingles import SHINGLE_KINDS, prepare
from megatron_r1.data.jsonl import StrictModeError, add_bad_line_arguments, is_compressed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL files or glob patterns (plain text, not compressed)"
    )
    parser.add_argument("--output", required=True, help="JSONL of the kept documents (original lines, unchanged)")
    parser.add_argument(
        "--clusters", help="JSONL with one record per duplicate cluster (default: OUTPUT with .clusters.jsonl)"
    )
    parser.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    parser.add_argument("--method", choices=METHODS, default="minhash", help="near-duplicate method (default: minhash)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.85,
        help="MinHash: Jaccard similarity at or above which documents are duplicates (default: 0.85)",
    )
    parser.add_argument(
        "--num-perm", type=int, default=128, help="MinHash: signature length / number of permutations (default: 128)"
    )
    parser.add_argument(
        "--bands",
        type=int,
        help="MinHash: LSH bands (default: chosen from --threshold and --num-perm so that pairs at the threshold become candidates with probability >= 0.99, with the fewest false candidates)",
    )
    parser.add_argument("--rows", type=int, help="MinHash: rows per band (give with --bands)")
    parser.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="exact",
        help="MinHash: 'exact' decides pairs whose estimate is within 3 standard errors of the threshold by the exact Jaccard similarity (re-read from disk); 'estimate' trusts the MinHash estimate alone (default: exact)",
    )
    parser.add_argument(
        "--max-distance",
        type=int,
        default=3,
        help="SimHash: maximum Hamming distance between 64-bit fingerprints; keep it <= 6, larger values make the candidate blocks too narrow (see megatron_r1/corpus/simhash.py) (default: 3)",
    )
    parser.add_argument(
        "--shingle",
        choices=SHINGLE_KINDS,
        default="auto",
        help="word or character n-grams; auto: characters for Chinese/CJK text, words otherwise (default: auto)",
    )
    parser.add_argument("--ngram", type=int, default=5, help="shingle size in words or characters (default: 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the MinHash permutations (default: 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes for sketching and verification (default: 2; 1 = in-process)",
    )
    parser.add_argument(
        "--tmp-dir", help="directory for the temporary signature file (default: the directory of --output)"
    )
    add_bad_line_arguments(parser, repairs_text=False)  # kept lines are copied verbatim
    return parser


def _checked_inputs(parser, args):
    """``(config, its bands and rows, input paths, clusters path)``; parser.error on bad flags or inputs."""
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.num_perm < 1 or args.ngram < 1 or args.workers < 1:
        parser.error("--num-perm, --ngram and --workers must be >= 1")
    config = DedupConfig(
        json_key=args.json_key,
        method=args.method,
        threshold=args.threshold,
        num_perm=args.num_perm,
        bands=args.bands,
        rows=args.rows,
        shingle=args.shingle,
        ngram=args.ngram,
        seed=args.seed,
        verify=args.verify,
        max_distance=args.max_distance,
    )
    try:
        bands, rows = config.banding()
        paths = expand_inputs(args.input)
        clusters_path = args.clusters or os.path.splitext(args.output)[0] + ".clusters.jsonl"
        for output, flag in ((args.output, "--output"), (clusters_path, "--clusters")):
            check_output_not_input(output, paths, flag)
    except (InputError, ValueError) as error:
        parser.error(str(error))
    compressed = [path for path in paths if is_compressed(path)]
    if compressed:
        parser.error(
            f"--input {compressed[0]!r}: compressed input is not supported (verification seeks to byte offsets); decompress it first"
        )
    if len(paths) > 65535:
        parser.error(f"--input: at most 65535 files per run, got {len(paths)}")
    return config, (bands, rows), paths, clusters_path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config, (bands, rows), paths, clusters_path = _checked_inputs(parser, args)
    started = time.perf_counter()
    input_bytes = total_bytes(paths)
    temporary_directory = args.tmp_dir or os.path.dirname(os.path.abspath(args.output))
    os.makedirs(temporary_directory, exist_ok=True)
    prepare()
    store = SketchStore(config, paths, temporary_directory, strict=args.strict)
    try:
        with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="sketch") as progress:
            batches = iter_line_batches(paths, batch_lines=256, progress=progress)
            for batch in ordered_map(sketch_batch, batches, args.workers, init_worker, (config,)):
                store.add(batch)
        sketches = store.finish()
        result = find_duplicates(sketches, config, paths, args.workers, progress=tqdm)
        kept = int(result.keep.sum())
        with atomic_output(clusters_path) as handle:
            clusters = write_clusters(handle, sketches, result, paths)
        with (
            atomic_output(args.output) as handle,
            tqdm(total=input_bytes, unit="B", unit_scale=True, desc="write") as progress,
        ):
            for file_index, kept_lines in enumerate(kept_lines_by_file(sketches, result, len(paths))):
                _copy_lines(paths[file_index], file_index, kept_lines, handle, progress)
    except StrictModeError as error:  # raised while sketching: nothing written yet
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    elapsed = time.perf_counter() - started

    documents = len(sketches.line)
    peak_mib = (
        max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        / 1024
    )
    method = (
        f"minhash (num_perm={config.num_perm}, bands={bands} x rows={rows}, threshold={config.threshold}, verify={config.verify})"
        if config.method == "minhash"
        else f"simhash (64 bits, max distance {config.max_distance})"
    )
    print(
        f"dedup summary: {len(paths)} input file(s), {input_bytes / 1e6:.1f} MB, method {method}, shingles {config.shingle} {config.ngram}-grams"
    )
    print(
        f"  documents: {documents}, kept: {kept}, removed: {documents - kept} (exact: {result.exact_duplicates}, near: {documents - kept - result.exact_duplicates})"
    )
    print("\n".join(store.bad.table(indent="  ")))
    print(f"  clusters: {clusters} -> {clusters_path}; kept documents -> {args.output}")
    print(f"  candidate comparisons: {result.candidate_checks}, exact Jaccard checks: {result.exact_jaccard_checks}")
    print(
        f"  time {elapsed:.1f} s, {documents / elapsed:.0f} docs/s, {input_bytes / 1e6 / elapsed:.2f} MB/s, peak RSS {peak_mib:.0f} MiB (largest process)"
    )
    return 0


def _copy_lines(path: str, file_index: int, kept_lines, handle, progress) -> None:
    """Copy the kept lines (sorted 1-based numbers) of one input file verbatim."""
    position = 0
    for _, line_number, _, raw in iter_lines(path, file_index):
        progress.update(len(raw) if raw is not None else 0)  # (over-long lines were never kept)
        if position < len(kept_lines) and kept_lines[position] == line_number:
            handle.write(raw if raw.endswith(b"\n") else raw + b"\n")
            position += 1


if __name__ == "__main__":
    sys.exit(main())
