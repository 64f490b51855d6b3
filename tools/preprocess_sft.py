"""Tokenize instruction / chat JSONL into the indexed SFT dataset that `finetune_r1.py --data-path
PREFIX` reads: PREFIX.bin/.idx (tokens) and PREFIX_loss_mask.bin/.idx (1 on response tokens).

Records are rendered with finetune_r1.py's chat template (megatron_r1/data/sft.py): instruction
format {"instruction", "input", "output"} or chat format {"messages": [{"role", "content"}, ...]}.
Malformed lines are skipped and reported with file:line, or stop the run with --strict. The
outputs appear only when complete (written under temporary names, then renamed).

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
from megatron_r1.data.jsonl import BadInputError, is_compressed
from megatron_r1.data.sft import LOSS_MASK_SUFFIX, ChatTemplate, read_conversations, render_sample, write_sft_dataset
from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES, add_tokenizer_arguments, build_tokenizer

SKIPPED_SHOWN = 10  # skipped lines listed in the summary (all are counted)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_arguments(parser, types=MODEL_TOKENIZER_TYPES)  # chat templates need named tokens
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s) or glob pattern(s), one record per line (.gz read through gzip).")
    parser.add_argument("--output-prefix", required=True, help=f"Writes PREFIX.bin/.idx and PREFIX{LOSS_MASK_SUFFIX}.bin/.idx.")
    parser.add_argument("--strict", action="store_true", help="Stop with an error at the first malformed line instead of skipping it.")
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

    def __init__(self, input_files: list[str], template: ChatTemplate, strict: bool):
        self.input_files, self.template, self.strict = input_files, template, strict
        self.records = self.tokens = self.response_tokens = 0
        self.skipped = 0
        self.skipped_examples: list[str] = []  # the first BadInputError messages, each starting with file:line

    def _skip(self, error: BadInputError) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < SKIPPED_SHOWN:
            self.skipped_examples.append(str(error))

    def samples(self, progress: tqdm):
        on_bad_record = None if self.strict else self._skip
        for path in self.input_files:
            for _, messages, consumed in read_conversations(path, on_bad_record):
                tokens, mask = render_sample(self.template, messages)
                self.records += 1
                self.tokens += len(tokens)
                self.response_tokens += int(mask.sum())
                progress.update(consumed)
                yield tokens, mask
        if not self.records:
            # Raised inside the writers' block: nothing is published.
            raise BadInputError(f"{' '.join(self.input_files)}: no usable record ({self.skipped} malformed lines)")


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    work = SFTPreprocessing(args.input_files, ChatTemplate(tokenizer), args.strict)
    start = time.perf_counter()
    try:
        # Progress counts bytes read: decompressed ones for .gz inputs, whose total is unknown.
        total = None if any(is_compressed(path) for path in args.input_files) else total_bytes(args.input_files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="rendering") as progress:
            write_sft_dataset(work.samples(progress), args.output_prefix, tokenizer.vocab_size)
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    except (OSError, BadInputError) as error:  # bad input under --strict, or no usable record
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = max(time.perf_counter() - start, 1e-9)
    print(f"files: {len(args.input_files)}  vocab: {tokenizer.vocab_size}  time: {seconds:.2f} s")
    share = 100 * work.response_tokens / max(work.tokens, 1)
    print(f"records: {work.records}  tokens: {work.tokens}  response tokens: {work.response_tokens} ({share:.1f}%)")
    print(f"throughput: {work.records / seconds:.1f} docs/s  {work.tokens / seconds:.0f} tokens/s")
    print(f"skipped: {work.skipped}")
    for message in work.skipped_examples:
        print(f"  {message}")
    if work.skipped > len(work.skipped_examples):
        print(f"  ... and {work.skipped - len(work.skipped_examples)} more")
    for prefix in (args.output_prefix, args.output_prefix + LOSS_MASK_SUFFIX):
        print(f"wrote {bin_path(prefix)} / {idx_path(prefix)}")
    return 0


if __name__ == "__main__":
    # A plain kill (SIGTERM) cleans up like Ctrl-C: the writers remove their temporary files.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
