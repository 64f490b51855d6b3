"""Tokenize instruction / chat JSONL into the indexed SFT dataset that `finetune_r1.py --data-path
PREFIX` reads: PREFIX.bin/.idx (tokens) and PREFIX_loss_mask.bin/.idx (1 on response tokens).

Records are rendered with finetune_r1.py's chat template (megatron_r1/data/sft.py): instruction
format {"instruction", "input", "output"} or chat format {"messages": [{"role", "content"}, ...]}.
Bad lines (not JSON, not a record, non-string or empty text, lone surrogates) are skipped and
counted by reason with file:line, as by tools/preprocess_data.py, or stop the run with --strict
(exit status 2). The outputs appear only when complete (written under temporary names, then renamed).

Example:
  python tools/preprocess_sft.py --input data/sft/*.jsonl --output-prefix data/sft_train \\
      --tokenizer-model data/tokenizer.model
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from tqdm import tqdm

from megatron_r1.corpus.jsonl import InputError, expand_inputs, total_bytes
from megatron_r1.data.indexed import bin_path, idx_path
from megatron_r1.data.jsonl import BadInputError, SkipCounter, StrictModeError, add_bad_line_arguments, is_compressed
from megatron_r1.data.sft import LOSS_MASK_SUFFIX, ChatTemplate, read_conversations, render_sample, write_sft_dataset
from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES, add_tokenizer_arguments, build_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_arguments(parser, types=MODEL_TOKENIZER_TYPES)  # chat templates need named tokens
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL file(s) or glob pattern(s), one record per line (.gz read through gzip).",
    )
    parser.add_argument(
        "--output-prefix", required=True, help=f"Writes PREFIX.bin/.idx and PREFIX{LOSS_MASK_SUFFIX}.bin/.idx."
    )
    add_bad_line_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.input_files = expand_inputs(args.input)
    except InputError as error:
        parser.error(str(error))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    except OSError as error:
        parser.error(f"--output-prefix {args.output_prefix}: {error}")
    return args


class SFTPreprocessing:
    """Streams the records of the input files as (tokens, loss mask) samples, counting as it goes."""

    def __init__(self, input_files: list[str], template: ChatTemplate, strict: bool, replace_surrogates: bool):
        self.input_files, self.template, self.replace_surrogates = input_files, template, replace_surrogates
        self.records = self.tokens = self.response_tokens = 0
        self.skipped = SkipCounter(strict=strict)

    def samples(self, progress: tqdm):
        for path in self.input_files:
            for _, messages, consumed in read_conversations(path, self.skipped, self.replace_surrogates):
                tokens, mask = render_sample(self.template, messages)
                self.records += 1
                self.tokens += len(tokens)
                self.response_tokens += int(mask.sum())
                progress.update(consumed)
                yield tokens, mask
        if not self.records:
            # Raised inside the writers' block: nothing is published.
            raise BadInputError("\n".join([f"{' '.join(self.input_files)}: no usable record", *self.skipped.table()]))


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    work = SFTPreprocessing(args.input_files, ChatTemplate(tokenizer), args.strict, args.replace_lone_surrogates)
    start = time.perf_counter()
    try:
        # Progress counts bytes read: decompressed ones for .gz inputs, whose total is unknown.
        total = None if any(is_compressed(path) for path in args.input_files) else total_bytes(args.input_files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="rendering") as progress:
            write_sft_dataset(work.samples(progress), args.output_prefix, tokenizer.vocab_size)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except StrictModeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, BadInputError) as error:  # no usable record
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = max(time.perf_counter() - start, 1e-9)
    print(f"files: {len(args.input_files)}  vocab: {tokenizer.vocab_size}  time: {seconds:.2f} s")
    share = 100 * work.response_tokens / max(work.tokens, 1)
    print(f"records: {work.records}  tokens: {work.tokens}  response tokens: {work.response_tokens} ({share:.1f}%)")
    print(f"throughput: {work.records / seconds:.1f} docs/s  {work.tokens / seconds:.0f} tokens/s")
    print("\n".join(work.skipped.table()))
    for prefix in (args.output_prefix, args.output_prefix + LOSS_MASK_SUFFIX):
        print(f"wrote {bin_path(prefix)} / {idx_path(prefix)}")
    return 0


if __name__ == "__main__":
    # A plain kill (SIGTERM) cleans up like Ctrl-C: the writers remove their temporary files.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
