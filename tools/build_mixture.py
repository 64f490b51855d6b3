"""Mix cleaned JSONL sources to target token proportions, and/or write Megatron --data-path weights.

Each --source NAME=PATH[,PATH...] (files or globs) gets a --weight NAME=W (weights are normalized;
e.g. zh=45 en=35 other=20 means 45% / 35% / 20% of tokens). Tokens are counted with the tokenizer
when --tokenizer-model is given, else with a proxy (--token-proxy; see
megatron_r1/corpus/tokens.py: 'approx' = 1 per CJK character + 1 per 4 UTF-8 bytes of other text).

--output writes one mixed JSONL (lines copied verbatim): documents are sampled without replacement
(seeded) to hit the target proportions at --total-tokens, or at the largest total that needs no
repetition; a larger --total-tokens needs --allow-upsample (whole extra passes over a source).
Sources are interleaved in seeded random order. See megatron_r1/corpus/mixture.py.

--data-path-out writes the weight list that pretraining blends with, for sources preprocessed
separately: "0.45 PREFIX_zh 0.35 PREFIX_en ...", where each PREFIX is --prefix NAME=PREFIX or
DIR/NAME_{json-key}_document with DIR = --prefix-dir (the naming of tools/preprocess_data.py with
--output-prefix DIR/NAME). The line is always printed.

Example:
    python tools/build_mixture.py --source zh='clean/zh/*.jsonl' --source en=clean/en.jsonl \\
        --weight zh=0.6 --weight en=0.4 --output mixed.jsonl --data-path-out data_path.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from megatron_r1.corpus.jsonl import (
    InputError,
    atomic_output,
    check_output_not_input,
    expand_inputs,
    iter_line_batches,
    total_bytes,
)
from megatron_r1.corpus.mixture import (
    MixtureError,
    SourceCounts,
    count_batch,
    init_counter,
    interleave_order,
    iter_selected_lines,
    normalize_weights,
    plan_quotas,
    select_documents,
)
from megatron_r1.corpus.parallel import ordered_map
from megatron_r1.corpus.tokens import TOKEN_PROXIES
from megatron_r1.data.jsonl import SkipCounter, StrictModeError, add_bad_line_arguments
from megatron_r1.data.preprocess import output_prefix_for
from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES, add_tokenizer_arguments


def _name_value(text: str, flag: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _token_total(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--total-tokens expects a number such as 1000000 or 1e9, got {text!r}"
        ) from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"--total-tokens must be >= 1, got {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        type=lambda text: _name_value(text, "--source"),
        metavar="NAME=PATH[,PATH...]",
        help="a source: name and comma-separated JSONL files (plain or .gz) / globs (repeat per source)",
    )
    parser.add_argument(
        "--weight",
        action="append",
        required=True,
        type=lambda text: _name_value(text, "--weight"),
        metavar="NAME=W",
        help="target token weight of a source (repeat per source; normalized to sum 1)",
    )
    parser.add_argument(
        "--total-tokens",
        type=_token_total,
        help="token budget of the mixture (default: the largest total without repeating documents)",
    )
    parser.add_argument(
        "--allow-upsample", action="store_true", help="allow a --total-tokens that repeats documents of some source"
    )
    parser.add_argument("--output", help="write the mixed JSONL here")
    parser.add_argument("--data-path-out", metavar="FILE", help="write the pretraining --data-path weight list here")
    parser.add_argument(
        "--prefix",
        action="append",
        default=[],
        type=lambda text: _name_value(text, "--prefix"),
        metavar="NAME=PREFIX",
        help="dataset prefix of a source in the --data-path list",
    )
    parser.add_argument(
        "--prefix-dir",
        default=".",
        help="directory of the default dataset prefixes DIR/NAME_{json-key}_document (default: .)",
    )
    parser.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    parser.add_argument(
        "--token-proxy",
        choices=TOKEN_PROXIES,
        default="approx",
        help="token count without --tokenizer-model (default: approx)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="sampling and interleaving seed (default: 1234)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for token counting (default: 2)")
    add_bad_line_arguments(parser, repairs_text=False)  # selected lines are copied verbatim
    add_tokenizer_arguments(parser, required=False, types=MODEL_TOKENIZER_TYPES)  # counts tokens of text
    return parser


def _count_sources(args, paths: dict[str, list[str]], input_bytes: int, bad: SkipCounter) -> dict[str, SourceCounts]:
    """Token count and location of every usable document of each source; bad lines go to ``bad``."""
    counts: dict[str, SourceCounts] = {}
    init_args = (args.tokenizer_type, args.tokenizer_model, args.token_proxy, args.json_key)
    with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="count tokens") as progress:
        for name, source_paths in paths.items():
            located, tokens = [], []
            batches = iter_line_batches(source_paths, batch_lines=256, progress=progress)
            for batch_bad, batch_located, batch_tokens in ordered_map(
                count_batch, batches, args.workers, init_counter, init_args
            ):
                for reason, file_index, line_number in batch_bad:
                    bad.add(reason, source_paths[file_index], line_number)
                located.append(batch_located)
                tokens.append(batch_tokens)
            located_all = np.concatenate(located) if located else np.zeros((0, 2), np.uint64)
            counts[name] = SourceCounts(
                name,
                source_paths,
                located_all[:, 0].astype(np.uint16),
                located_all[:, 1].astype(np.uint32),
                np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
            )
    return counts


def _checked_sources(parser, args) -> tuple[dict, dict, dict, list]:
    """``(normalised weights, input paths by source, --prefix by source, every input path)``;
    parser.error on bad flags or inputs."""
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    sources = dict(args.source)
    if len(sources) != len(args.source):
        parser.error("--source: each source name may be given once")
    try:
        weights = {name: float(value) for name, value in args.weight}
    except ValueError as error:
        parser.error(f"--weight: {error}")
    if set(weights) != set(sources):
        parser.error(f"--weight must name exactly the sources {sorted(sources)}; got {sorted(weights)}")
    prefixes = dict(args.prefix)
    unknown = sorted(set(prefixes) - set(sources))
    if unknown:
        parser.error(f"--prefix names unknown source(s) {unknown}")
    try:
        weights = normalize_weights(weights)
        paths = {name: expand_inputs(value.split(","), flag=f"--source {name}") for name, value in sources.items()}
        every_path = [path for source_paths in paths.values() for path in source_paths]
        for output, flag in ((args.output, "--output"), (args.data_path_out, "--data-path-out")):
            if output:
                check_output_not_input(output, every_path, flag)
    except (InputError, MixtureError) as error:
        parser.error(str(error))
    return weights, paths, prefixes, every_path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    weights, paths, prefixes, every_path = _checked_sources(parser, args)
    started = time.perf_counter()
    bad = SkipCounter(strict=args.strict)
    try:
        counts = _count_sources(args, paths, total_bytes(every_path), bad)
    except StrictModeError as error:  # (counting writes nothing)
        print(f"error: {error}", file=sys.stderr)
        return 2
    available = {name: source.total_tokens for name, source in counts.items()}
    try:
        quotas, total = plan_quotas(available, weights, args.total_tokens, args.allow_upsample)
    except MixtureError as error:
        parser.error(str(error))

    rng = np.random.default_rng(args.seed)
    repeats = {name: select_documents(counts[name].tokens, quotas[name], rng) for name in counts}
    selected = {name: int((repeats[name].astype(np.int64) * counts[name].tokens).sum()) for name in counts}
    if args.output:
        names = list(counts)
        line_counts = [int(repeats[name].sum()) for name in names]
        order = interleave_order(line_counts, rng)
        streams = [iter_selected_lines(counts[name], repeats[name]) for name in names]
        with atomic_output(args.output) as handle:
            for label in tqdm(order, desc="write", unit="doc"):
                handle.write(next(streams[label]))

    data_path = " ".join(
        f"{weights[name]:.6g} {prefixes.get(name) or output_prefix_for(os.path.join(args.prefix_dir, name), args.json_key)}"
        for name in counts
    )
    if args.data_path_out:
        with atomic_output(args.data_path_out) as handle:
            handle.write((data_path + "\n").encode("utf-8"))
    elapsed = time.perf_counter() - started

    unit = f"tokens of {args.tokenizer_model}" if args.tokenizer_model else f"token proxy '{args.token_proxy}'"
    selected_total = max(sum(selected.values()), 1)
    print(
        f"mixture summary ({unit}), {elapsed:.1f} s; target total {total} (largest without repetition: {int(min(available[n] / weights[n] for n in counts))})"
    )
    print(
        f"  {'source':<12} {'docs':>9} {'available':>12} {'target':>8} {'quota':>12} {'selected':>12} {'achieved':>8} {'passes':>7}"
    )
    for name, source in counts.items():
        print(
            f"  {name:<12} {len(source.tokens):>9} {available[name]:>12} {weights[name]:>8.2%} {quotas[name]:>12.0f} {selected[name]:>12} "
            f"{selected[name] / selected_total:>8.2%} {quotas[name] / max(available[name], 1):>7.2f}"
        )
    print("\n".join(bad.table(indent="  ")))
    if args.output:
        print(
            f"  mixed JSONL: {args.output} ({sum(int(repeats[name].sum()) for name in counts)} documents, {sum(selected.values())} tokens)"
        )
    print(f"  --data-path {data_path}" + (f"  (written to {args.data_path_out})" if args.data_path_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
