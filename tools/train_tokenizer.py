"""Train a SentencePiece BPE tokenizer on JSONL text.

One streaming pass over the input reservoir-samples up to --max-sentences lines (paragraphs) of the
--json-keys texts, so a corpus of any size is never loaded whole; SentencePiece then trains on the
sample. The model has byte fallback (no unknown tokens), split digits, and the special-token ids
documented in megatron_r1/tokenizer.py (pad 0, unk 1, bos 2, eos/eod 3, then the
--user-defined-symbols). Writes PREFIX.model and PREFIX.vocab, each only when complete.

Example (quickstart, bundled corpus, tiny vocabulary):
  python tools/train_tokenizer.py --input megatron_r1/assets/tiny_corpus.jsonl \\
      --vocab-size 4000 --output-prefix data/tokenizer
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from tqdm import tqdm

from megatron_r1.corpus.jsonl import InputError, expand_inputs
from megatron_r1.data.jsonl import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    BadInputError,
    ByteRange,
    SkipCounter,
    StrictModeError,
    add_bad_line_arguments,
    parse_document,
    read_lines,
)
from megatron_r1.tokenizer import DEFAULT_MAX_SENTENCE_BYTES, SPECIAL_TOKENS, train_sentencepiece


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL file(s) or glob pattern(s) (.gz read through gzip)."
    )
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="Keys whose text to train on (default: text).")
    parser.add_argument("--output-prefix", required=True, help="Writes PREFIX.model and PREFIX.vocab.")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=128000,
        help="Vocabulary size (default: %(default)s, a real-model size; use ~4000 for the tiny corpus).",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9999,
        help="Share of characters covered by pieces; the rest fall back to bytes (default: %(default)s).",
    )
    parser.add_argument(
        "--user-defined-symbols",
        nargs="*",
        default=list(SPECIAL_TOKENS),
        help="Special tokens kept whole, ids from 4 (default: %(default)s).",
    )
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="Lines sampled from the corpus for training (default: %(default)s).",
    )
    parser.add_argument(
        "--max-sentence-bytes",
        type=int,
        default=DEFAULT_MAX_SENTENCE_BYTES,
        help="Longer sample lines are cut to this size (default: %(default)s).",
    )
    parser.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="Skip (count) JSONL lines longer than this (default: %(default)s).",
    )
    add_bad_line_arguments(parser)
    parser.add_argument("--seed", type=int, default=1234, help="Sampling seed (default: %(default)s).")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="SentencePiece training threads (default: %(default)s).",
    )
    parser.add_argument("--verbose", action="store_true", help="Show SentencePiece's training log.")
    args = parser.parse_args(argv)
    for flag in ("vocab_size", "max_sentences", "max_sentence_bytes", "max_document_bytes", "num_threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.character_coverage <= 1:
        parser.error("--character-coverage must be in (0, 1]")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    except OSError as error:
        parser.error(f"--output-prefix {args.output_prefix}: {error}")
    try:
        args.input_files = expand_inputs(args.input)
    except InputError as error:
        parser.error(str(error))
    return args


class SentenceReservoir:
    """A uniform sample of at most ``capacity`` lines from a stream (reservoir sampling)."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.seen = 0
        self.lines: list[str] = []
        self._random = random.Random(seed)

    def offer(self, line: str) -> None:
        self.seen += 1
        if len(self.lines) < self.capacity:
            self.lines.append(line)
        else:
            slot = self._random.randrange(self.seen)
            if slot < self.capacity:
                self.lines[slot] = line


def training_lines(text: str, max_bytes: int):
    """The non-blank lines of ``text``, each cut to ``max_bytes`` of UTF-8 (SentencePiece trains on
    lines and ignores longer ones)."""
    for line in text.split("\n"):
        if line.strip():
            encoded = line.encode("utf-8")
            yield line if len(encoded) <= max_bytes else encoded[:max_bytes].decode("utf-8", errors="ignore")


def sample_corpus(args) -> tuple[SentenceReservoir, int, SkipCounter]:
    reservoir = SentenceReservoir(args.max_sentences, args.seed)
    skipped = SkipCounter(strict=args.strict)
    documents = 0
    total_bytes = sum(os.path.getsize(path) for path in args.input_files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="sample") as progress:
        for path in args.input_files:
            byte_range = ByteRange(path, 0, None, os.path.getsize(path))
            for line_number, (line, consumed) in enumerate(read_lines(byte_range, args.max_document_bytes), start=1):
                texts, reason = (
                    parse_document(line, args.json_keys, args.replace_lone_surrogates)
                    if line is not None
                    else (None, "too_large")
                )
                if reason is not None:
                    skipped.add(reason, path, line_number)
                else:
                    documents += 1
                    for text in texts:
                        for sentence in training_lines(text, args.max_sentence_bytes):
                            reservoir.offer(sentence)
                progress.update(consumed)
    return reservoir, documents, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        reservoir, documents, skipped = sample_corpus(args)
        if not reservoir.lines:
            print(f"error: --input: no usable text under --json-keys {' '.join(args.json_keys)}", file=sys.stderr)
            print("\n".join(skipped.table()), file=sys.stderr)
            return 1
        sampled_at = time.perf_counter()
        tokenizer = train_sentencepiece(
            reservoir.lines,
            args.output_prefix,
            vocab_size=args.vocab_size,
            character_coverage=args.character_coverage,
            user_defined_symbols=args.user_defined_symbols,
            max_sentence_bytes=args.max_sentence_bytes,
            num_threads=args.num_threads,
            verbose=args.verbose,
        )
    except StrictModeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (BadInputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        # SentencePiece reports impossible settings (e.g. fewer pieces than required characters) this way.
        print(
            f"error: SentencePiece training failed: {error}\nhint: adjust --vocab-size / --character-coverage",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    finished = time.perf_counter()
    print(f"documents: {documents}  lines seen: {reservoir.seen}  sampled: {len(reservoir.lines)}")
    print("\n".join(skipped.table()))
    print(
        f"vocab size: {tokenizer.vocab_size} (requested {args.vocab_size})  pad {tokenizer.pad}  bos {tokenizer.bos}  eod {tokenizer.eod}"
    )
    print(
        "user-defined symbols: "
        + " ".join(f"{symbol}={tokenizer.token_to_id(symbol)}" for symbol in args.user_defined_symbols)
    )
    print(f"time: sampling {sampled_at - started:.1f} s, training {finished - sampled_at:.1f} s")
    print(f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
