"""Data flags: pre-training's indexed datasets (blends, per-split paths, the train/valid/test
split) or mock data, document masking, and the tokenizer (megatron_r1.tokenizer's flags).

Derived values, written by :func:`validate` only: ``data_path`` (parsed to (prefixes, weights or
None)), ``data_per_split`` ([train, valid, None] blends from --train/valid-data-path, else None) and
``tokenizer_type`` (NullTokenizer for --mock-data without --tokenizer-model)."""

import argparse
import os
import re

from megatron_r1.data.pretrain import empty_split_error
from megatron_r1.tokenizer import add_tokenizer_arguments, tokenizer_arguments_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "data" group, then the "tokenizer" group."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="indexed-dataset prefixes, optionally weighted: 0.45 zh_text_document 0.55 en_...",
    )
    group.add_argument(
        "--train-data-path",
        nargs="*",
        default=None,
        help="instead of --data-path and --split: the training data (prefixes, optionally weighted)",
    )
    group.add_argument(
        "--valid-data-path",
        nargs="*",
        default=None,
        help="with --train-data-path: the validation data (fine-tuning: .jsonl files or "
        "tools/preprocess_sft.py prefixes; default: a --split share of --data-path)",
    )
    group.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    group.add_argument("--mock-data", action="store_true", help="synthetic data, for smoke runs")
    group.add_argument("--data-cache-path", default=None)
    group.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    group.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="tokens attend only within their own document of a sample (documents end at the end-of-document token)",
    )
    group.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="position ids restart at each document of a sample (what RoPE sees does not change: it "
        "depends on relative positions only)",
    )
    group.add_argument(
        "--no-mmap-bin-files",
        dest="mmap_bin_files",
        action="store_false",
        help="read the .bin files with file reads instead of memory maps (e.g. on network file "
        "systems where mmap is slow)",
    )
    add_tokenizer_arguments(parser, required=False)


def validate(args, error, pretraining_data: bool = True) -> None:
    """The data and tokenizer flags; the only place the data's derived values are written.

    ``pretraining_data=False`` (fine-tuning, which checks its own data afterwards) skips pre-training's
    data checks: the --data-path blends, --train/valid-data-path, --split and its empty splits, the
    tokenizer that indexed data needs, and --mock-data's need of --vocab-size or a tokenizer;
    data_path and tokenizer_type stay as given, data_per_split is None. That is what setting
    args.mock_data around validate_args did with a --tokenizer-model (fine-tuning requires one);
    without one, it would also have required --vocab-size and chosen NullTokenizer."""
    if args.reset_attention_mask and args.transformer_impl == "transformer_engine":
        error(
            "--reset-attention-mask needs --transformer-impl local (TransformerEngine's causal attention takes "
            "no document mask)"
        )
    if args.tokenizer_type == "NullTokenizer" and args.tokenizer_model:
        error("--tokenizer-type NullTokenizer reads token ids, no --tokenizer-model")
    tokenizer_type, data_path, data_per_split = args.tokenizer_type, args.data_path, None
    if pretraining_data and args.mock_data:
        tokenizer_type = _mock_data_tokenizer(args, error)
    elif pretraining_data:
        data_path, data_per_split = _indexed_data(args, error)
    args.tokenizer_type, args.data_path, args.data_per_split = tokenizer_type, data_path, data_per_split
    if args.tokenizer_model and not os.path.exists(args.tokenizer_model):
        error(f"--tokenizer-model {args.tokenizer_model}: no such file or directory")


def _mock_data_tokenizer(args, error) -> str:
    """The tokenizer type of --mock-data: NullTokenizer (ids 0..N-1, as the mock data draws them)
    without a --tokenizer-model."""
    if not (args.tokenizer_model or args.vocab_size):
        error("--mock-data needs --vocab-size or a tokenizer (--tokenizer-model)")
    return args.tokenizer_type if args.tokenizer_model else "NullTokenizer"


def _indexed_data(args, error):
    """(data_path, data_per_split) of pre-training's indexed datasets: --data-path parsed and split by
    --split, or --train-data-path/--valid-data-path's blends ([train, valid, None])."""
    per_split = args.train_data_path is not None or args.valid_data_path is not None
    if per_split and args.data_path:
        error("--data-path and --train-data-path/--valid-data-path are alternatives: give one")
    if not (args.data_path or per_split):
        error("give --data-path PREFIX [...] (indexed datasets from tools/preprocess_data.py) or --mock-data")
    if missing := tokenizer_arguments_error(args):
        error(f"--data-path needs the tokenizer the data was made with: {missing}")
    if per_split:
        return args.data_path, _per_split_blends(args, error)
    return _split_blend(args, error), None


def _per_split_blends(args, error) -> list:
    if args.train_data_path is None:
        error("--valid-data-path needs --train-data-path (or use --data-path with --split)")
    train = _parse_blend(args.train_data_path, "--train-data-path", error)
    valid = None if args.valid_data_path is None else _parse_blend(args.valid_data_path, "--valid-data-path", error)
    if valid is None and (args.eval_interval or args.skip_train):
        error("evaluation (--eval-interval, --skip-train) reads validation data: give --valid-data-path")
    return [train, valid, None]


def _split_blend(args, error):
    """--data-path's blend, checked to give every split that is read some of its documents."""
    blend = _parse_blend(args.data_path, "--data-path", error)
    proportions = r"\d*\.?\d+([,/]\d*\.?\d+){0,2}"  # up to 3 numbers, as megatron-core reads them
    if not re.fullmatch(proportions, args.split) or not any(map(float, re.split("[,/]", args.split))):
        error(f"--split {args.split}: give train,valid,test proportions such as 969,30,1")
    evaluated = bool(args.skip_train or args.eval_interval)  # evaluation reads the validation split
    try:
        message = empty_split_error(blend, args.split, [not args.skip_train, evaluated, False])
    except ValueError as bad_index:
        message = f"--data-path: {bad_index}"
    if message:
        error(message)
    return blend


def _parse_blend(tokens, flag, error):
    """`--data-path a b` or `--data-path 0.4 a 0.6 b` -> (prefixes, weights or None), with every
    prefix's .bin/.idx checked."""
    if not tokens:
        error(f"{flag}: give indexed-dataset prefixes (from tools/preprocess_data.py)")
    try:
        weights = [float(t) for t in tokens[0::2]]
        prefixes = tokens[1::2]
        if len(weights) != len(prefixes):
            error(f"{flag}: weights and prefixes must alternate, got {' '.join(tokens)}")
    except ValueError:
        weights, prefixes = None, list(tokens)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                error(f"{flag}: {prefix}{suffix} does not exist")
    return prefixes, weights
