"""What every recipe builds before its loop: process groups, the tokenizer, the model chunks
(DDP-wrapped), the optimizer and the learning-rate schedule, held in a TrainState."""

import logging
from dataclasses import dataclass

import torch
from megatron.core.config import set_experimental_flag
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.utils import get_model_config

from megatron_r1 import platform
from megatron_r1.arguments import transformer_config_from_args
from megatron_r1.checkpointing import saved_model_args
from megatron_r1.compat import missing_gpu_packages
from megatron_r1.distributed import initialize_distributed
from megatron_r1.model import build_model
from megatron_r1.optim import build_optimizer, build_scheduler
from megatron_r1.tokenizer import build_tokenizer, vocab_size_with_padding


@dataclass
class TrainState:
    """What a checkpoint saves and restores besides the flags: the model, its optimizer and LR
    schedule, and the run's counters."""

    model: list
    optimizer: object
    scheduler: object
    tokenizer: object
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def padded_vocab_size(args, vocab_size: int) -> int:
    """The embedding rows: --padded-vocab-size, or the vocabulary padded for TP; where this layout
    can shard it, a checkpoint's padding is kept, so that a checkpoint saved under TP=2 loads under
    TP=1 (and back) without reshaping the embeddings."""
    if args.padded_vocab_size is not None:
        if args.padded_vocab_size < vocab_size:
            raise ValueError(
                f"--padded-vocab-size ({args.padded_vocab_size}) is below the vocabulary of {vocab_size} ids"
            )
        return args.padded_vocab_size
    saved = saved_model_args(args).get("padded_vocab_size")
    if saved and saved >= vocab_size and saved % args.tensor_model_parallel_size == 0:
        return saved
    return vocab_size_with_padding(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def _process_wide_settings(args) -> None:
    if args.logging_level is not None:
        logging.basicConfig(level=args.logging_level)
    if args.enable_experimental:
        set_experimental_flag(True)
    if args.disable_bf16_reduced_precision_matmul:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    initialize_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    missing = missing_gpu_packages()
    if torch.cuda.is_available() and missing and torch.distributed.get_rank() == 0:
        print(
            f" {' and '.join(missing)} not installed: megatron-core's PyTorch implementations run instead", flush=True
        )


def fused_kernels(config) -> list[str]:
    """megatron-core's fused elementwise kernels the model of `config` runs."""
    fused = {
        "bias-activation": config.bias_activation_fusion,
        "bias-dropout-add": config.bias_dropout_fusion,
        "RoPE": config.apply_rope_fusion,
        "cross entropy": config.cross_entropy_loss_fusion,
    }
    return [name for name, on in fused.items() if on]


def _report_fusions(config) -> None:
    """One line on a GPU naming them."""
    if torch.cuda.is_available() and torch.distributed.get_rank() == 0:
        print(f" fused kernels: {', '.join(fused_kernels(config)) or 'none'}", flush=True)


def _wire_schedule(args, model) -> None:
    """The config the chunks and the schedule share: gradient finalisation, and with
    --overlap-grad-reduce the schedule holds each chunk's reduction back until its last
    micro-batch, then starts it (the wiring of Megatron-LM's training.py)."""
    config = get_model_config(model[0])
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        no_sync, start_grad_sync = [chunk.no_sync for chunk in model], [chunk.start_grad_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = start_grad_sync[0] if len(model) == 1 else start_grad_sync


def setup(args, layer_spec_transform=None, prepare_model_chunk=None) -> TrainState:
    """Process groups, tokenizer, model chunks (DDP-wrapped), optimizer and LR schedule.
    `layer_spec_transform(spec)` rewrites the decoder block spec (LoRA); `prepare_model_chunk(chunk)`
    adjusts each built chunk before DDP and the optimizer see it (freezing, dropout)."""
    _process_wide_settings(args)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    # The real vocabulary (saved with checkpoints; export drops the padding) and the embedding rows.
    args.vocab_size, args.padded_vocab_size = tokenizer.vocab_size, padded_vocab_size(args, tokenizer.vocab_size)
    config = transformer_config_from_args(args)
    config.gradient_accumulation_fusion = (
        args.gradient_accumulation_fusion and platform.gradient_accumulation_fusion_available()
    )
    # Only the trained model: megatron-core's fused RoPE cannot decode (generation builds its own).
    config.apply_rope_fusion = args.apply_rope_fusion and platform.rope_fusion_available(config)
    _report_fusions(config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
    )
    model = build_model(
        args,
        config,
        layer_spec_transform=layer_spec_transform,
        prepare_chunk=prepare_model_chunk,
        ddp_config=ddp_config,
    )
    _wire_schedule(args, model)
    optimizer = build_optimizer(args, model)
    return TrainState(model, optimizer, build_scheduler(args, optimizer), tokenizer)
