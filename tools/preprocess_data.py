"""Tokenize JSONL into megatron-core indexed datasets ({prefix}_{key}_document.bin/.idx).

Interface of Megatron-LM's tools/preprocess_data.py. Bad lines (invalid JSON, missing key,
non-UTF-8, empty text, lone surrogates, lines over --max-document-bytes) are skipped and counted
with file:line, or stop the run with --strict (exit status 2). Outputs appear only when complete.

Example:
  python tools/preprocess_data.py --input megatron_r1/assets/tiny_corpus.jsonl \\
      --output-prefix data/tiny --tokenizer-model data/tokenizer.model --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from megatron_r1.corpus.jsonl import InputError, expand_inputs
from megatron_r1.data.jsonl import DEFAULT_MAX_DOCUMENT_BYTES, StrictModeError, add_bad_line_arguments
from megatron_r1.data.preprocess import PreprocessConfig, preprocess
from megatron_r1.tokenizer import add_tokenizer_arguments, tokenizer_arguments_error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_arguments(parser)
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL file(s) or glob pattern(s), one document per line (.gz read through gzip).",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="Keys whose text to tokenize; one output dataset per key (default: text).",
    )
    group.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="Skip (count) lines longer than this many bytes (default: %(default)s = 16 MiB).",
    )
    add_bad_line_arguments(group)
    group = parser.add_argument_group("tokenization")
    group.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to every document.")
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True, help="Output path prefix; writes {prefix}_{key}_document.bin/.idx."
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Worker processes (default: number of CPUs, %(default)s).",
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Also write the input as N contiguous shards {prefix}_{i}_{key}_document, merged at the end (as Megatron-LM).",
    )
    args = parser.parse_args(argv)
    if message := tokenizer_arguments_error(args):
        parser.error(message)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    if args.max_document_bytes < 1:
        parser.error("--max-document-bytes must be >= 1")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    except OSError as error:
        parser.error(f"--output-prefix {args.output_prefix}: {error}")
    try:
        args.input_files = expand_inputs(args.input)
    except InputError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = PreprocessConfig(
        input_files=args.input_files,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        max_document_bytes=args.max_document_bytes,
        strict=args.strict,
        replace_surrogates=args.replace_lone_surrogates,
    )
    try:
        result = preprocess(config)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except StrictModeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = max(result.seconds, 1e-9)
    print(
        f"files: {len(args.input_files)}  workers: {args.workers}  partitions: {args.partitions}  vocab: {result.vocab_size} ({result.dtype})"
    )
    print(
        f"documents: {result.documents}  tokens: {result.tokens}  input: {result.input_bytes / 1e6:.2f} MB  time: {result.seconds:.2f} s"
    )
    print(
        f"throughput: {result.documents / seconds:.1f} docs/s  {result.input_bytes / 1e6 / seconds:.2f} MB/s  "
        f"{result.tokens / seconds:.0f} tokens/s"
    )
    print("\n".join(result.skipped.table()))
    for prefix in result.output_prefixes:
        print(f"wrote {prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    # A plain kill (SIGTERM) cleans up like Ctrl-C: temporary files removed, workers stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
