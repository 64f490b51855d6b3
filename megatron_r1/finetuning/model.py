"""The fine-tuned model: LoRA adapters and freezing, per-component dropout, the starting weights
(--pretrained-checkpoint) and the LoRA configuration saved beside the adapters."""

import argparse
import json
import os
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import MLP

from megatron_r1.checkpointing import (
    CheckpointError,
    _check_model_shape,
    _write_text_atomically,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    read_metadata,
)
from megatron_r1.lora import (
    LoRAConfig,
    add_adapters_to_duplicated_linears,
    checkpoint_adapters_only,
    freeze_base_model,
    is_adapter_key,
    lora_spec_transform,
)
from megatron_r1.training import print_rank_last, setup

LORA_CONFIG_FILE = "lora.json"


def lora_config(args) -> LoRAConfig:
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_target_modules))


def _ffn_activation_dropout(probability, module, inputs):
    """Dropout on linear_fc2's input (the FFN's inner activations), which TP shards: those ranks
    draw from the model-parallel RNG stream."""
    if not module.training:
        return None
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return (torch.nn.functional.dropout(inputs[0], probability),) + inputs[1:]
    return (torch.nn.functional.dropout(inputs[0], probability),) + inputs[1:]


def prepare_model_chunk(args, chunk) -> None:
    """Before DDP and the optimizer see the chunk: LoRA freezing, per-component dropout."""
    if args.embedding_dropout is not None and chunk.pre_process:
        chunk.embedding.embedding_dropout.p = args.embedding_dropout
    if args.ffn_dropout > 0:
        for module in chunk.modules():
            if isinstance(module, MLP):
                module.linear_fc2.register_forward_pre_hook(partial(_ffn_activation_dropout, args.ffn_dropout))
    if args.lora:
        add_adapters_to_duplicated_linears(chunk, lora_config(args))
        trainable = freeze_base_model(chunk)
        total = sum(p.numel() for p in chunk.parameters())
        print_rank_last(
            f" LoRA: {trainable} trainable parameters of {total} on this rank ({100 * trainable / total:.2f}%)"
        )
        checkpoint_adapters_only(chunk)


def load_pretrained(args, state) -> str | None:
    """Load --pretrained-checkpoint's weights into every chunk (LoRA adapters keep their
    initialisation); returns the directory loaded, None without the flag."""
    if not args.pretrained_checkpoint:
        return None
    path = find_checkpoint(argparse.Namespace(load=args.pretrained_checkpoint, ckpt_step=None))
    if path is None:
        raise CheckpointError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there")
    _check_model_shape(args, read_metadata(path)["model_args"], path)
    load_weights(path, [chunk.module for chunk in state.model], keep=lambda key: not is_adapter_key(key))
    return path


def write_lora_config(args) -> None:
    """<save>/lora.json: what tools/merge_lora.py needs besides the adapters."""
    if not (args.lora and args.save) or torch.distributed.get_rank() != 0:
        return
    os.makedirs(args.save, exist_ok=True)
    config = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
              "target_modules": list(args.lora_target_modules), "pretrained_checkpoint": args.pretrained_checkpoint}  # fmt: skip
    _write_text_atomically(os.path.join(args.save, LORA_CONFIG_FILE), json.dumps(config, indent=1))


def _prepare_then(args, also, chunk) -> None:
    prepare_model_chunk(args, chunk)
    if also is not None:
        also(chunk)


def setup_finetuning(args, also_prepare_chunk=None):
    """training.setup with the fine-tuning model changes (and a recipe's own, `also_prepare_chunk(chunk)`
    after them), then the starting weights: pretrained, then this run's own checkpoint when resuming."""
    spec_transform = lora_spec_transform(lora_config(args), args.swiglu) if args.lora else None
    prepare = partial(_prepare_then, args, also_prepare_chunk)
    state = setup(args, layer_spec_transform=spec_transform, prepare_model_chunk=prepare)
    loaded = load_pretrained(args, state)
    print_rank_last(f" starting weights: {loaded}" if loaded else " no --pretrained-checkpoint: random initialisation")
    if load_checkpoint(args, state):
        print_rank_last(f" resumed from iteration {state.iteration} ({state.consumed_samples} samples consumed)")
    write_lora_config(args)
    return state
