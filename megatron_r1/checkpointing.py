"""Checkpoints in Megatron-LM's layout, through megatron-core's dist_checkpointing (torch_dist):

    <save>/iter_0000100/                  model, optimizer (incl. distributed-optimizer state) and
                                          every rank's RNG state, sharded; any TP/PP/EP/DP layout
    <save>/iter_0000100/megatron_r1.json  iteration, consumed samples, LR-schedule state, counters
                                          and the model-shape arguments (JSON: nothing executable)
    <save>/latest_checkpointed_iteration.txt

A checkpoint is written as ``iter_XXXXXXX.tmp`` and renamed only once every rank has finished,
then the tracker file is replaced; a crash mid-save leaves the previous checkpoint the latest.

Loading runs no code from the checkpoint: torch_dist unpickles its ``.metadata`` and its byte
objects (RNG states, layers' extra state) without restriction, so every pickle in a checkpoint is
first read under an allow-list (:func:`refuse_executable_pickles`); the RNG states are stored as
tensors and plain Python values so that they pass ``torch.load(weights_only=True)``.
"""

import contextlib
import functools
import io
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_r1.distributed import parameters_gathered
from megatron_r1.jsonfile import read_json_object
from megatron_r1.sharded_tensors import follow_saved_keys, full_sharded_state_dict, model_sharded_state_dict

TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "megatron_r1.json"
# Flags that fix the shapes of the weights: a checkpoint only loads into the same values.
MODEL_SHAPE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq", "mtp_num_layers",
    "swiglu", "disable_bias_linear", "normalization", "position_embedding_type", "untie_embeddings_and_output_weights",
    "padded_vocab_size", "moe_router_enable_expert_bias", "qk_layernorm",
)  # fmt: skip
# Flags that change what the model computes without changing the weights' shapes; saved beside the
# shape flags (not checked on load) so that tools (export to Hugging Face, generation) rebuild the same model.
MODEL_FUNCTION_ARGS = (
    "norm_epsilon", "max_position_embeddings", "rotary_base", "rope_type", "rotary_scaling_factor",
    "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "window_size",
    "window_attn_skip_freq", "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor", "moe_router_dtype",
    "init_method_std", "use_rope_scaling", "rope_scaling_factor",
    "transformer_impl",  # whose keys read_checkpoint maps onto the other implementation's
    "vocab_size", "tokenizer_type", "tokenizer_model", "make_vocab_size_divisible_by",
)  # fmt: skip
# Model flags added after checkpoints were first saved with these lists: absent means the default,
# which computes what those checkpoints' models computed.
MODEL_ARGS_WITH_OLD_DEFAULTS = ("window_attn_skip_freq", "transformer_impl", "use_rope_scaling", "rope_scaling_factor")
# Optimizer state in a layout that reloads under another data-parallel size.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def optimizer_parts(optimizer) -> int:
    """How many optimizers megatron-core chained (dense and expert parameters get their own when
    the expert layout differs): the optimizer state's keys depend on it."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_kind(args) -> str:
    """Which of megatron-core's optimizers the flags build: each keeps other state (the distributed
    optimizer and mixed precision keep fp32 main weights, under other keys)."""
    return f"{'distributed' if args.use_distributed_optimizer else 'plain'} {'bf16' if args.bf16 else 'fp32'}"


def optimizer_sharded_state_dict(optimizer, model_sharded: dict, is_loading: bool) -> dict:
    """The optimizer's state as our checkpoints hold it: in model space (each parameter's moments
    under its model key, "optimizer.state.exp_avg.<key>"), whatever the TP/PP/EP/DP layout."""
    return optimizer.sharded_state_dict(dict(model_sharded), is_loading=is_loading, metadata=dict(_OPTIMIZER_METADATA))


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
    numpy_state = np.random.get_state(legacy=False)  # MT19937: a key array and plain values
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {
        "random": random.getstate(),  # (version, tuple of ints, None or a float)
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state_dict(model_chunks) -> dict:
    """The unwrapped (not DDP) models' state under Megatron-LM's keys (:func:`_chunk_names`)."""
    names = _chunk_names(len(model_chunks))
    return {name: model_sharded_state_dict(chunk.module) for name, chunk in zip(names, model_chunks)}


def _sharded_state_dict(state, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
    sharded = _model_state_dict(state.model)
    if with_optimizer:
        sharded["optimizer"] = optimizer_sharded_state_dict(state.optimizer, sharded, is_loading)
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
    """Write the checkpoint of `state.iteration` under args.save (collective: every rank).

    With --async-save the shards are written by a forked process (a copy-on-write snapshot of
    this moment's state) while training goes on; the checkpoint is published (metadata, rename,
    tracker) by `finalize_async_saves` once every rank's writer has finished."""
    finalize_async_saves(blocking=True)  # one save in flight at a time: a re-save reuses the directory
    final = checkpoint_dir(args.save, state.iteration)
    temporary = f"{final}.tmp"
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(temporary, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(temporary)
    torch.distributed.barrier()
    # Taken now: training moves on before an asynchronous save is published.
    metadata = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "skipped_iterations": state.skipped_iterations,
        "nan_iterations": state.nan_iterations,
        "scheduler": state.scheduler.state_dict(),
        "layout": _layout(args),
        "optimizer_parts": 0 if args.no_save_optim else optimizer_parts(state.optimizer),
        "optimizer_kind": optimizer_kind(args),
        "rng_saved": not args.no_save_rng,
        "model_args": {name: getattr(args, name) for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS},
    }
    publish = functools.partial(_publish, args, metadata, temporary, final)
    with parameters_gathered(state.model):
        sharded = _sharded_state_dict(state, False, not args.no_save_optim, not args.no_save_rng)
        if args.async_save:
            request = dist_checkpointing.save(sharded, temporary, async_sharded_save=True)
            request.add_finalize_fn(publish)
            _async_saves().schedule_async_request(request)
        else:
            dist_checkpointing.save(sharded, temporary)
            publish()
    return final


def _publish(args, metadata: dict, temporary: str, final: str) -> None:
    """Make a fully written checkpoint visible: metadata file, directory rename, tracker file."""
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        _write_text_atomically(os.path.join(temporary, METADATA_FILE), json.dumps(metadata, indent=1))
        if os.path.exists(final):  # saving the same iteration again
            shutil.rmtree(final)
        os.rename(temporary, final)
        _write_text_atomically(os.path.join(args.save, TRACKER_FILE), str(metadata["iteration"]))
        if args.keep_last_n:
            for old in sorted(_saved_iterations(args.save))[: -args.keep_last_n]:
                shutil.rmtree(checkpoint_dir(args.save, old))
    torch.distributed.barrier()


@contextlib.contextmanager
def temporary_checkpoint(output: str, iteration: int):
    """``output``.tmp, made anew with an empty iter_XXXXXXX, for the block to write a checkpoint into
    and then publish as `output` (:func:`publish_weights_checkpoint`); removed if the block raises,
    so that a failed write leaves nothing behind."""
    temporary = f"{output.rstrip('/')}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(checkpoint_dir(temporary, iteration))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def publish_weights_checkpoint(args, temporary: str, output: str, iteration: int, **metadata) -> str:
    """Complete the weights-only checkpoint of the model `args` describe whose weights
    ``temporary``/iter_XXXXXXX holds: its megatron_r1.json (`metadata`: the fields besides the
    defaults) and the tracker file, then rename ``temporary`` -> `output` (an existing `output` is
    replaced). Returns the iteration directory."""
    metadata = {
        "iteration": iteration, "consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0,
        "scheduler": None, "layout": _layout(args), "optimizer_parts": 0, "rng_saved": False,
        "model_args": {name: getattr(args, name) for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS},
        **metadata,
    }  # fmt: skip
    iteration_dir = checkpoint_dir(temporary, iteration)
    _write_text_atomically(os.path.join(iteration_dir, METADATA_FILE), json.dumps(metadata, indent=1))
    _write_text_atomically(os.path.join(temporary, TRACKER_FILE), str(iteration))
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(temporary, output)
    return checkpoint_dir(output, iteration)


def write_weights_checkpoint(args, model, output: str, iteration: int = 0, **metadata) -> str:
    """Save `model` (one chunk holding every weight, in a one-process world) as a weights-only
    checkpoint ``output``/iter_XXXXXXX of the model `args` describes, for pretrain_r1.py --load
    (--no-load-optim to continue, --finetune) and the tools; `metadata`: its megatron_r1.json
    fields besides the defaults (consumed_samples, scheduler, where it was converted from...).
    Written under ``output``.tmp and renamed once complete; an existing `output` is replaced.
    Returns the iteration directory."""
    with temporary_checkpoint(output, iteration) as temporary:
        dist_checkpointing.save({"model": model_sharded_state_dict(model)}, checkpoint_dir(temporary, iteration))
        return publish_weights_checkpoint(args, temporary, output, iteration, **metadata)


_async_save_queue = None


def _async_saves():
    global _async_save_queue
    if _async_save_queue is None:
        _async_save_queue = AsyncCallsQueue()
    return _async_save_queue


def finalize_async_saves(blocking: bool = False) -> None:
    """Publish the asynchronous saves whose writers have finished on every rank (all of them, and
    waiting for them, with `blocking`). Collective: every rank, at the same points."""
    if _async_save_queue is not None:
        _async_save_queue.maybe_finalize_async_calls(blocking=blocking)


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
    return _latest_checkpoint(args.load)


def _latest_checkpoint(root: str) -> str | None:
    """The directory `root`'s tracker file names. Without a tracker file, the newest published
    checkpoint (a run killed between a first checkpoint's rename and the tracker's write: a directory
    under its final name is complete) or None (no checkpoint yet)."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.exists(tracker):
        published = [
            i for i in _saved_iterations(root) if os.path.isfile(os.path.join(checkpoint_dir(root, i), METADATA_FILE))
        ]
        return checkpoint_dir(root, max(published)) if published else None
    with open(tracker, "rb") as f:
        text = f.read(64).decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    path = checkpoint_dir(root, int(text))
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


# The classes torch's distributed-checkpoint metadata (.metadata) is made of; torch dtypes too.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_GLOBALS and not is_dtype:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which checkpoint metadata never holds")
        return super().find_class(module, name)


def _weights_only_load(file):
    """torch.load(weights_only=True), its refusal shortened to the reason (torch's message goes on
    to suggest weights_only=False, the very thing not to do with an untrusted checkpoint). Besides
    tensors and plain values it admits the classes megatron-core registers as safe when imported
    (megatron.core.safe_globals: argparse.Namespace, its enums, numpy arrays, ...): what Megatron-LM
    keeps in common.pt and its RNG states; nothing of them runs code when unpickled."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        reasons = [line for line in str(error).splitlines() if "WeightsUnpickler error:" in line]
        reason = reasons[0].split("WeightsUnpickler error:")[1].strip() if reasons else str(error)
        raise pickle.UnpicklingError(f"not plain data: {reason}") from None


def _torch_dist_metadata(path: str):
    """Checkpoint `path`'s torch_dist ``.metadata``, unpickled under the allow-list of its classes."""
    metadata_file = os.path.join(path, ".metadata")
    try:
        with open(metadata_file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as error:
        raise CheckpointError(f"{metadata_file}: refused, {error}") from None


def saved_tensor_shapes(path: str) -> dict[str, tuple]:
    """Checkpoint key -> global shape of every tensor checkpoint `path` holds (from its metadata)."""
    metadata = _torch_dist_metadata(path)
    return {
        key: tuple(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if not isinstance(item, BytesStorageMetadata)
    }


def read_common_state(path: str) -> dict:
    """Checkpoint `path`'s ``common.pt`` (its non-sharded state: Megatron-LM keeps its args, iteration
    and LR-schedule state there), once every pickle of the checkpoint passed
    :func:`refuse_executable_pickles`."""
    refuse_executable_pickles(path)
    common_file = os.path.join(path, "common.pt")
    if not os.path.exists(common_file):
        raise CheckpointError(f"{path} has no common.pt")
    state = _weights_only_load(common_file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{common_file}: holds a {type(state).__name__}, not a state dict")
    return state


def refuse_executable_pickles(path: str):
    """Raise CheckpointError unless every pickle megatron-core's torch_dist loader would unpickle
    from checkpoint `path` is data only; return its checked ``.metadata``. That loader reads
    ``.metadata`` with plain pickle.load and the byte objects (ShardedObjects) with
    torch.load(weights_only=False): a crafted checkpoint
    could run code. Here ``.metadata`` may reference only torch's checkpoint-metadata classes, and
    the byte objects and ``common.pt`` must pass torch.load(weights_only=True); tensors themselves
    are already read with weights_only=True."""
    metadata = _torch_dist_metadata(path)
    byte_objects = {key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, storage in metadata.storage_data.items():
        if index.fqn not in byte_objects:
            continue
        shard_file = os.path.join(path, storage.relative_path)
        if storage.transform_descriptors:
            raise CheckpointError(
                f"{shard_file}: {index.fqn} is stored transformed {storage.transform_descriptors}; "
                f"such objects cannot be checked for code before loading"
            )
        with open(shard_file, "rb") as f:
            f.seek(storage.offset)
            payload = f.read(storage.length)
        try:
            _weights_only_load(io.BytesIO(payload))
        except Exception as error:
            raise CheckpointError(f"{shard_file}: object {index.fqn} refused, {error}") from None
    common_file = os.path.join(path, "common.pt")
    if os.path.exists(common_file):
        try:
            _weights_only_load(common_file)
        except Exception as error:
            raise CheckpointError(f"{common_file}: refused, {error}") from None
    return metadata


# What every reader of a checkpoint's megatron_r1.json relies on, with its JSON type.
_METADATA_FIELDS = {"iteration": int, "consumed_samples": int, "skipped_iterations": int, "nan_iterations": int,
                    "layout": dict, "model_args": dict}  # fmt: skip
_JSON_KINDS = {int: "an integer", dict: "an object"}


def read_metadata(path: str) -> dict:
    """Checkpoint directory `path`'s megatron_r1.json; CheckpointError naming the file (and line)
    unless it is a JSON object with the fields every reader uses."""
    metadata_path = os.path.join(path, METADATA_FILE)
    if not os.path.exists(metadata_path) and os.path.exists(os.path.join(path, "common.pt")):
        raise CheckpointError(
            f"{path} has no {METADATA_FILE} but a common.pt: a Megatron-LM checkpoint? Convert it first: "
            "python tools/convert_checkpoint.py --direction mlm2mcore --load ... --save ..."
        )
    if not os.path.exists(metadata_path):
        raise CheckpointError(f"{path} has no {METADATA_FILE}: not a megatron-r1 checkpoint, or an incomplete one")
    metadata = read_json_object(metadata_path, CheckpointError)
    for field, kind in _METADATA_FIELDS.items():
        if not isinstance(metadata.get(field), kind) or isinstance(metadata.get(field), bool):
            raise CheckpointError(f"{metadata_path}: {field!r} is missing or not {_JSON_KINDS[kind]}")
    return metadata


def saved_model_args(args) -> dict:
    """The model-shape arguments of the checkpoint `load_checkpoint` will load ({} if none)."""
    path = find_checkpoint(args)
    return read_metadata(path)["model_args"] if path else {}


def read_checkpoint(path: str, sharded: dict, strict: str = "assume_ok_unexpected") -> dict:
    """The one way this project reads a torch_dist checkpoint (resume, --finetune,
    --pretrained-checkpoint, --teacher-load, merging, generation, export): nothing in it is
    unpickled before every pickle passed :func:`refuse_executable_pickles`."""
    saved = refuse_executable_pickles(path).state_dict_metadata
    follow_saved_keys(sharded, saved)  # a checkpoint written by the other layer implementation too
    return dist_checkpointing.load(sharded, path, strict=strict)


def _chunk_names(count: int) -> list[str]:
    """Megatron-LM's top-level keys of the model chunks: "model", or "model0", "model1", ..."""
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def load_weights(path: str, modules: list, keep=None) -> None:
    """Load into each (unwrapped) model chunk of `modules` its weights from checkpoint `path`,
    those whose keys `keep(key)` accepts (default: all); weights the checkpoint lacks are an
    error naming them."""
    names = _chunk_names(len(modules))
    sharded = {
        name: {key: value for key, value in full_sharded_state_dict(module).items() if keep is None or keep(key)}
        for name, module in zip(names, modules)
    }
    loaded = read_checkpoint(path, sharded)
    for name, module in zip(names, modules):
        result = module.load_state_dict(loaded[name], strict=False)
        missing = [
            key for key in result.missing_keys if (keep is None or keep(key)) and not key.endswith("_extra_state")
        ]
        if missing:
            raise CheckpointError(f"{path} lacks weights of this model: {', '.join(missing[:5])}")


def _load_into(state, path: str, load_optimizer: bool, load_rng: bool, strict: str) -> None:
    """Model weights (and optimizer state, and this rank's RNG states) from `path` into `state`;
    `strict`: --dist-ckpt-strictness."""
    loaded = read_checkpoint(path, _sharded_state_dict(state, True, load_optimizer, load_rng), strict=strict)
    for name, chunk in zip(_chunk_names(len(state.model)), state.model):
        chunk.module.load_state_dict(loaded[name])
    if load_optimizer:
        state.optimizer.load_state_dict(loaded["optimizer"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])


def _load_scheduler(state, metadata: dict, path: str) -> None:
    if metadata.get("scheduler") is None:
        raise CheckpointError(
            f"{path} holds no learning-rate schedule (converted weights): start from it with --finetune"
        )
    state.scheduler.num_steps = 0  # load_state_dict steps forward by the saved count from the current one
    try:
        state.scheduler.load_state_dict(metadata["scheduler"])
    except AssertionError as mismatch:
        raise CheckpointError(
            f"{path}: {mismatch}. Pass --override-opt-param-scheduler to use the new schedule flags"
        ) from None


def load_checkpoint(args, state) -> bool:
    """Restore `state` from the checkpoint `find_checkpoint` names; False when there is none.
    --finetune loads the weights only; --no-load-optim / --no-load-rng skip those parts, and
    --skip-train the optimizer and LR schedule (an evaluation needs neither). RNG
    states are per rank, so they are restored only on the layout they were saved with."""
    path = find_checkpoint(args)
    if path is None:
        return False
    metadata = read_metadata(path)
    _check_model_shape(args, metadata["model_args"], path)
    load_optimizer = not (args.finetune or args.no_load_optim or args.skip_train)
    load_rng = not (args.finetune or args.no_load_rng) and metadata["layout"] == _layout(args)
    load_rng = load_rng and metadata.get("rng_saved", True)  # --no-save-rng: the streams go on from --seed
    # Weights-only loads (generation, conversion) pass a state without an optimizer.
    saved_parts = metadata.get("optimizer_parts", 1)
    if load_optimizer and saved_parts == 0:
        raise CheckpointError(
            f"{path}: saved without its optimizer state (--no-save-optim); resume from it with "
            "--no-load-optim (fresh optimizer moments) or --finetune"
        )
    saved_kind = metadata.get("optimizer_kind", optimizer_kind(args))  # older checkpoints: not recorded
    if load_optimizer and saved_kind != optimizer_kind(args):
        raise CheckpointError(
            f"{path}: its optimizer state is a {saved_kind} optimizer's, these flags build a {optimizer_kind(args)} one "
            "(--use-distributed-optimizer, --bf16), which keeps other state: resume with the saved run's "
            "flags, or with --no-load-optim (fresh optimizer moments)"
        )
    if load_optimizer and saved_parts != optimizer_parts(state.optimizer):
        raise CheckpointError(
            f"{path}: its optimizer state was saved in {saved_parts} part(s) (layout {metadata['layout']}), this layout "
            f"has {optimizer_parts(state.optimizer)} (dense and expert parameters); load it with --no-load-optim (fresh optimizer moments), or "
            "resume on an expert layout like the saved one"
        )
    _load_into(state, path, load_optimizer, load_rng, args.dist_ckpt_strictness)
    if not args.finetune:
        state.iteration = metadata["iteration"]
        state.consumed_samples = metadata["consumed_samples"]
        state.skipped_iterations = metadata["skipped_iterations"]
        state.nan_iterations = metadata["nan_iterations"]
        if not args.skip_train:  # evaluation alone has no schedule to continue
            _load_scheduler(state, metadata, path)
    return True


def rollback_to_last_checkpoint(args, state) -> int:
    """--rollback-after-bad-steps: undo the updates since the latest checkpoint under --save
    (weights, optimizer state, LR schedule); returns its iteration.

    The iteration counter, the data position and the RNG streams go on: the batches since that
    checkpoint, the bad ones included, are not trained on again (replaying them from the restored
    RNG state would reproduce a data-caused fault exactly), the run still ends after --train-iters
    batches, and the undone iterations count as skipped ones, as if their updates had been."""
    path = _latest_checkpoint(args.save)
    if path is None:
        raise CheckpointError(f"no checkpoint under --save {args.save} to roll back to")
    metadata = read_metadata(path)
    _load_into(state, path, load_optimizer=True, load_rng=False, strict=args.dist_ckpt_strictness)
    _load_scheduler(state, metadata, path)
    state.skipped_iterations = metadata["skipped_iterations"] + state.iteration - metadata["iteration"]
    return metadata["iteration"]
