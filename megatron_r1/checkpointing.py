"""Checkpoints in Megatron-LM's layout, through megatron-core's dist_checkpointing (torch_dist):

    <save>/iter_0000100/                  model, optimizer (incl. distributed-optimizer state) and
                                          every rank's RNG state, sharded; any TP/PP/EP/DP layout
    <save>/iter_0000100/megatron_r1.json  iteration, consumed samples, LR-schedule state, counters
                                          and the model-shape arguments (JSON: nothing executable)
    <save>/latest_checkpointed_iteration.txt

A checkpoint is written as ``iter_XXXXXXX.tmp`` and renamed only once every rank has finished,
then the tracker file is replaced; a crash mid-save leaves the previous checkpoint the latest.
"""

import json
import os
import random
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "megatron_r1.json"
# Flags that fix the shapes of the weights: a checkpoint only loads into the same values.
MODEL_SHAPE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq", "mtp_num_layers",
    "swiglu", "disable_bias_linear", "normalization", "position_embedding_type", "untie_embeddings_and_output_weights",
    "padded_vocab_size", "moe_router_enable_expert_bias",
)  # fmt: skip
# Optimizer state in a layout that reloads under another data-parallel size.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _layout(args) -> dict:
    return {
        "world_size": args.world_size,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
        "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
        "expert_model_parallel_size": args.expert_model_parallel_size,
        "virtual_pipeline_model_parallel_size": args.virtual_pipeline_model_parallel_size,
    }


def _rng_state() -> ShardedObject:
    """This rank's generators; one shard per global rank, so a resume on the same layout restores
    every rank's dropout and routing noise exactly."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state_dict(model_chunks) -> dict:
    """The unwrapped (not DDP) models' state under Megatron-LM's keys: "model", or "model0",
    "model1", ... with virtual pipeline stages."""
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].module.sharded_state_dict(metadata={})}
    return {f"model{i}": chunk.module.sharded_state_dict(metadata={}) for i, chunk in enumerate(model_chunks)}


def _sharded_state_dict(state, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
    sharded = _model_state_dict(state.model)
    if with_optimizer:
        sharded["optimizer"] = state.optimizer.sharded_state_dict(
            dict(sharded), is_loading=is_loading, metadata=dict(_OPTIMIZER_METADATA)
        )
    if with_rng:
        sharded["rng_state"] = _rng_state()
    return sharded


def _write_text_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def save_checkpoint(args, state) -> str:
    """Write the checkpoint of `state.iteration` under args.save (collective: every rank)."""
    final = checkpoint_dir(args.save, state.iteration)
    temporary = f"{final}.tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(temporary, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(temporary)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state_dict(state, False, True, True), temporary)
    torch.distributed.barrier()
    if rank0:
        metadata = {
            "iteration": state.iteration,
            "consumed_samples": state.consumed_samples,
            "skipped_iterations": state.skipped_iterations,
            "nan_iterations": state.nan_iterations,
            "scheduler": state.scheduler.state_dict(),
            "layout": _layout(args),
            "model_args": {name: getattr(args, name) for name in MODEL_SHAPE_ARGS},
        }
        _write_text_atomically(os.path.join(temporary, METADATA_FILE), json.dumps(metadata, indent=1))
        if os.path.exists(final):  # saving the same iteration again
            shutil.rmtree(final)
        os.rename(temporary, final)
        _write_text_atomically(os.path.join(args.save, TRACKER_FILE), str(state.iteration))
        if args.keep_last_n:
            for old in sorted(_saved_iterations(args.save))[: -args.keep_last_n]:
                shutil.rmtree(checkpoint_dir(args.save, old))
    torch.distributed.barrier()
    return final


def _saved_iterations(root: str) -> list[int]:
    names = os.listdir(root) if os.path.isdir(root) else []
    return [int(name[5:]) for name in names if name.startswith("iter_") and name[5:].isdigit()]


def find_checkpoint(args) -> str | None:
    """The directory to resume from: --ckpt-step, else the tracker file's iteration (None when
    --load holds no checkpoint yet: a fresh start)."""
    if not args.load:
        return None
    if args.ckpt_step is not None:
        path = checkpoint_dir(args.load, args.ckpt_step)
        if not os.path.isdir(path):
            raise CheckpointError(f"--ckpt-step {args.ckpt_step}: {path} does not exist")
        return path
    tracker = os.path.join(args.load, TRACKER_FILE)
    if not os.path.exists(tracker):
        return None
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    path = checkpoint_dir(args.load, int(text))
    if not os.path.isdir(path):
        raise CheckpointError(f"{tracker} names iteration {text}, but {path} does not exist")
    return path


def _check_model_shape(args, saved: dict, path: str) -> None:
    mismatches = [
        f"--{name.replace('_', '-')} {saved[name]!r} (checkpoint) vs {getattr(args, name)!r} (now)"
        for name in MODEL_SHAPE_ARGS
        if name in saved and saved[name] != getattr(args, name)
    ]
    if mismatches:
        raise CheckpointError(f"{path} was saved for another model shape: " + "; ".join(mismatches))


def load_checkpoint(args, state) -> bool:
    """Restore `state` from the checkpoint `find_checkpoint` names; False when there is none.
    --finetune loads the weights only; --no-load-optim / --no-load-rng skip those parts. RNG
    states are per rank, so they are restored only on the layout they were saved with."""
    path = find_checkpoint(args)
    if path is None:
        return False
    metadata_path = os.path.join(path, METADATA_FILE)
    if not os.path.exists(metadata_path):
        raise CheckpointError(f"{path} has no {METADATA_FILE}: not a megatron-r1 checkpoint, or an incomplete one")
    with open(metadata_path) as f:
        metadata = json.load(f)
    _check_model_shape(args, metadata["model_args"], path)
    load_optimizer = not (args.finetune or args.no_load_optim)
    load_rng = not (args.finetune or args.no_load_rng) and metadata["layout"] == _layout(args)
    loaded = dist_checkpointing.load(_sharded_state_dict(state, True, load_optimizer, load_rng), path)
    if len(state.model) == 1:
        state.model[0].module.load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(state.model):
            chunk.module.load_state_dict(loaded[f"model{i}"])
    if load_optimizer:
        state.optimizer.load_state_dict(loaded["optimizer"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if not args.finetune:
        state.iteration = metadata["iteration"]
        state.consumed_samples = metadata["consumed_samples"]
        state.skipped_iterations = metadata["skipped_iterations"]
        state.nan_iterations = metadata["nan_iterations"]
        try:
            state.scheduler.load_state_dict(metadata["scheduler"])
        except AssertionError as mismatch:
            raise CheckpointError(
                f"{path}: {mismatch}. Pass --override-opt-param-scheduler to use the new schedule flags"
            ) from None
    return True
