"""Merge megatron-core indexed datasets (.bin/.idx pairs) into one, in file-name order.

Interface of Megatron-LM's tools/merge_datasets.py: every pair in the --input directory is merged
into --output-prefix. All inputs must share one dtype. The output appears only when complete.

Example:
  python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from megatron_r1.data.indexed import bin_path, idx_path, merge_indexed_datasets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Directory holding the PREFIX.bin/PREFIX.idx pairs to merge.")
    parser.add_argument(
        "--output-prefix", required=True, help="Output path without suffix; writes PREFIX.bin and PREFIX.idx."
    )
    parser.add_argument(
        "--multimodal", action="store_true", help="The datasets carry a mode per sequence (multimodal)."
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input}: not a directory")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    except OSError as error:
        parser.error(f"--output-prefix {args.output_prefix}: {error}")
    return args


def find_dataset_prefixes(directory: str, exclude_prefix: str | None = None) -> list[str]:
    """Prefixes of the .bin/.idx pairs in ``directory``, sorted; a file without its partner is an error."""
    names = {}
    for name in os.listdir(directory):
        stem, extension = os.path.splitext(name)
        if extension in (".bin", ".idx") and not name.startswith(".") and os.path.isfile(os.path.join(directory, name)):
            names.setdefault(stem, set()).add(extension)
    prefixes = []
    for stem in sorted(names):
        prefix = os.path.join(directory, stem)
        if exclude_prefix is not None and os.path.abspath(prefix) == os.path.abspath(exclude_prefix):
            continue
        missing = {".bin", ".idx"} - names[stem]
        if missing:
            raise FileNotFoundError(
                f"{prefix}{missing.pop()}: missing (its partner {prefix}{names[stem].pop()} exists)"
            )
        prefixes.append(prefix)
    return prefixes


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prefixes = find_dataset_prefixes(args.input, exclude_prefix=args.output_prefix)
        if not prefixes:
            print(f"error: --input {args.input}: no .bin/.idx pairs", file=sys.stderr)
            return 1
        input_bytes = sum(os.path.getsize(bin_path(prefix)) for prefix in prefixes)
        with tqdm(total=len(prefixes), unit="dataset", desc="merge") as progress:
            merged = merge_indexed_datasets(
                prefixes, args.output_prefix, args.multimodal, on_dataset_done=lambda: progress.update(1)
            )
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets ({input_bytes / 1e6:.2f} MB of tokens, dtype {merged.dtype})")
    print(
        f"documents: {merged.document_count}  sequences: {len(merged.sequence_lengths)}  tokens: {merged.token_count}"
    )
    print(f"wrote {bin_path(args.output_prefix)} and {idx_path(args.output_prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
