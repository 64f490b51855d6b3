"""Fine-tuning's flags (starting weights, packing, dropout, unfreezing, early stopping, LoRA,
distillation) and their checks, on top of the shared ones."""

import argparse
import os

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.data.indexed import bin_path, idx_path
from megatron_r1.data.sft import LOSS_MASK_SUFFIX, is_jsonl
from megatron_r1.finetuning.unfreezing import parse_unfreeze_schedule
from megatron_r1.megatron_lm_flags import parse_known_flags


def add_model_preparation_arguments(parser: argparse.ArgumentParser) -> None:
    """The starting weights, per-component dropout and LoRA: what setup_finetuning reads (SFT and GRPO)."""
    group = parser.add_argument_group("starting weights and dropout")
    group.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="checkpoint directory to start from (weights only); none: random initialisation",
    )
    group.add_argument(
        "--embedding-dropout", type=float, default=None, help="on the embeddings; default --hidden-dropout"
    )
    group.add_argument(
        "--ffn-dropout",
        type=float,
        default=0.0,
        help="on the FFN's inner activations (dense, shared and routed experts)",
    )
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base model")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--lora-alpha", type=float, default=32.0)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=["attention", "mlp", "shared_experts", "experts"],
        help="components (attention, mlp, shared_experts, experts), linear names (linear_qkv, linear_proj, "
        "linear_fc1, linear_fc2, MLA's linear_q_proj/linear_q_down_proj/linear_q_up_proj/"
        "linear_kv_down_proj/linear_kv_up_proj) or COMPONENT.LINEAR",
    )


def validate_model_preparation_args(args, error) -> None:
    if args.lora:
        if args.transformer_impl != "local":
            error("--lora needs --transformer-impl local (adapters wrap megatron-core's local linears)")
        if args.lora_rank < 1:
            error(f"--lora-rank ({args.lora_rank}) must be >= 1")
        # The base model is frozen, its routers' load-balancing biases too.
        args.moe_router_bias_update_rate = 0.0
    for flag, probability in (("--embedding-dropout", args.embedding_dropout), ("--ffn-dropout", args.ffn_dropout)):
        if probability is not None and not 0 <= probability < 1:
            error(f"{flag} ({probability}) must be in [0, 1)")


def add_finetuning_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_preparation_arguments(parser)
    group = parser.add_argument_group("fine-tuning")
    group.add_argument(
        "--no-pack-sequences", action="store_true", help="one sample per sequence (padded) instead of packing several"
    )
    group.add_argument(
        "--unfreeze-schedule",
        nargs="+",
        default=None,
        metavar="ITER:LAYERS",
        help="progressive unfreezing, top layers first: e.g. 0:1 50:2 100:all trains the top 1 layer "
        "(with the final norm and output layer; tied word embeddings count as the output layer) from iteration 0, "
        "the top 2 from 50, everything from 100",
    )
    group.add_argument(
        "--early-stop-patience",
        type=int,
        default=3,
        help="stop after this many evaluations without a better validation loss (0: never)",
    )
    group.add_argument(
        "--early-stop-min-delta", type=float, default=0.0, help="smallest decrease that counts as better"
    )

    kd = parser.add_argument_group("knowledge distillation")
    kd.add_argument(
        "--teacher-load", default=None, help="teacher checkpoint directory (its shape from its megatron_r1.json)"
    )
    kd.add_argument("--kd-ce-weight", type=float, default=0.5, help="weight of the cross entropy on the labels")
    kd.add_argument("--kd-kl-weight", type=float, default=0.5, help="weight of T^2 x KL to the teacher")
    kd.add_argument("--kd-temperature", type=float, default=2.0)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_data_paths(paths, flag, error) -> list:
    for path in paths:
        if is_jsonl(path):
            if not os.path.isfile(path):
                error(f"{flag}: {path} does not exist")
        else:
            for part in (path, path + LOSS_MASK_SUFFIX):
                for file in (bin_path(part), idx_path(part)):
                    if not os.path.isfile(file):
                        error(f"{flag}: {file} does not exist (give .jsonl files or tools/preprocess_sft.py prefixes)")
    return paths


def validate_finetuning_args(args, error) -> None:
    if args.train_data_path is not None:
        if args.data_path:
            error("--data-path and --train-data-path are alternatives: give one")
        args.data_path = args.train_data_path
    if not args.data_path:
        error("give --data-path with .jsonl files or tools/preprocess_sft.py prefixes")
    if not args.tokenizer_model:
        error("fine-tuning data is rendered with the chat template: give --tokenizer-model")
    if any(_is_number(p) for p in args.data_path):
        error("--data-path: fine-tuning data takes no blend weights, only files and prefixes")
    if args.eod_mask_loss:
        error("--eod-mask-loss is for pre-training documents: fine-tuning samples carry their own loss masks")
    if args.reset_attention_mask or args.reset_position_ids:
        error(
            "--reset-attention-mask/--reset-position-ids are for pre-training documents: packed fine-tuning "
            "samples never attend to each other and count their own positions"
        )
    validate_args(args, error, pretraining_data=False)  # SFT data is checked below
    if args.transformer_impl == "transformer_engine" and not args.no_pack_sequences:
        error(
            "packed fine-tuning samples need --transformer-impl local (TransformerEngine's causal attention takes "
            "no per-sample mask and would attend across samples), or --no-pack-sequences"
        )
    args.data_path = _check_data_paths(args.data_path, "--data-path", error)
    if args.valid_data_path:
        args.valid_data_path = _check_data_paths(args.valid_data_path, "--valid-data-path", error)
    if args.seq_length_curriculum:
        error("--seq-length-curriculum is for pre-training (packed samples must not be cut)")
    validate_model_preparation_args(args, error)
    if args.unfreeze_schedule:
        if args.lora:
            error("--unfreeze-schedule is for full-parameter fine-tuning, not --lora")
        if args.bf16 or args.use_distributed_optimizer:
            error(
                "--unfreeze-schedule supports the fp32, non-distributed optimizer only (no --bf16, "
                "no --use-distributed-optimizer)"
            )
        args.unfreeze_schedule = parse_unfreeze_schedule(args.unfreeze_schedule, args.num_layers, error)
    if args.teacher_load:
        if args.pipeline_model_parallel_size > 1:
            error("--teacher-load needs --pipeline-model-parallel-size 1")
        if not os.path.isdir(args.teacher_load):
            error(f"--teacher-load {args.teacher_load}: no such directory")
        if args.kd_temperature <= 0:
            error(f"--kd-temperature ({args.kd_temperature}) must be > 0")
    if args.early_stop_patience < 0:
        error(f"--early-stop-patience ({args.early_stop_patience}) must be >= 0")


def parse_finetuning_args(description: str, argv=None) -> argparse.Namespace:
    parser = build_parser(description)
    add_finetuning_arguments(parser)
    parser.set_defaults(split="98,2,0", lr=1e-5, lr_decay_style="cosine")
    args = parse_known_flags(parser, argv)
    validate_finetuning_args(args, parser.error)
    return args
