"""Command-line arguments with Megatron-LM's flag names, and the checks that run before any
process group exists.

Model flags are named after megatron-core's TransformerConfig fields (Megatron-LM's convention), so
:func:`transformer_config_from_args` passes every flag whose name is a config field straight through;
the few flags Megatron-LM names differently are mapped in ``_CONFIG_RENAMES`` (``config.py``).

One module per concern, each with ``add_arguments(parser)`` and ``validate(args, error)``: ``model``
(with multi-latent attention and mixture of experts), ``parallelism``, ``training`` (with the
learning rate), ``data`` (with the tokenizer's flags from megatron_r1.tokenizer), ``checkpointing``
and ``logging`` (logging and evaluation); Megatron-LM's other flags are megatron_r1.megatron_lm_flags'.
Each group's ``validate`` is the one place its derived values (its module's docstring names them) are
written into ``args``.
"""

import argparse

from megatron_r1.arguments import checkpointing, data, logging, model, parallelism, training
from megatron_r1.arguments.config import transformer_config_from_args
from megatron_r1.arguments.training import current_seq_length
from megatron_r1.megatron_lm_flags import add_megatron_lm_arguments, parse_known_flags, validate_megatron_lm_arguments

__all__ = ["build_parser", "current_seq_length", "parse_args", "transformer_config_from_args", "validate_args"]

# --help lists the groups in this order.
_GROUPS = (model, parallelism, training, data, checkpointing, logging)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    for group in _GROUPS:
        group.add_arguments(parser)
    add_megatron_lm_arguments(parser)
    return parser


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = build_parser(description)
    args = parse_known_flags(parser, argv)
    validate_args(args, parser.error)
    return args


def validate_args(args, error, pretraining_data: bool = True) -> None:
    """Fill derived values and reject inconsistent layouts with one line naming the flags; runs
    before any process group exists, so a bad launch fails in seconds on every rank alike.

    The groups run in the order their derived values are needed: parallelism first (the world and
    data-parallel sizes the batch sizes need, the pipeline split), then the model (the layer
    implementation the data's checks read), Megatron-LM's compatibility flags, training, logging,
    checkpointing and data; with several faults at once, the first in this order is reported.
    ``pretraining_data=False`` skips the checks of pre-training's data (for fine-tuning, which
    checks its own): see :func:`megatron_r1.arguments.data.validate`."""
    parallelism.validate(args, error)
    model.validate(args, error)
    validate_megatron_lm_arguments(args, error)
    training.validate(args, error)
    logging.validate(args, error)
    checkpointing.validate(args, error)
    data.validate(args, error, pretraining_data=pretraining_data)
