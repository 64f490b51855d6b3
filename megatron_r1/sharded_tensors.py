"""A model's parameters as views of global (unsharded) tensors: megatron-core's sharded state dict
says, for each checkpoint key, the global shape and where this rank's pieces sit in it. Filling
the pieces from whole tensors is how weights come in from outside (Hugging Face import) and how
every layout draws the same initial weights (megatron_r1.initialization)."""

import re

import torch

# Where TransformerEngine's layers and the local spec name a norm differently (key parts, either way
# round): TransformerEngine fuses a norm into the next linear layer and names it after that layer.
# The local GQA spec files the norm before the MLP under "mlp.linear_fc1.layer_norm_" in every layer
# (megatron-core's sharded_state_dict_keys_map), TransformerEngine only in dense ones (an MoE layer
# keeps its pre_mlp_layernorm); the local MLA spec maps nothing.
_IMPLEMENTATION_KEY_PARTS = (
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("self_attention.q_layernorm.", "self_attention.linear_q_up_proj.layer_norm_"),
    ("self_attention.kv_layernorm.", "self_attention.linear_kv_up_proj.layer_norm_"),
)
_KEY_PART_ALIASES = _IMPLEMENTATION_KEY_PARTS + tuple((b, a) for a, b in _IMPLEMENTATION_KEY_PARTS)


def model_sharded_state_dict(model) -> dict:
    """A GPTModel's sharded state with one key per layer ("decoder.layers.3.mlp..."): megatron-core
    otherwise stacks the layers of a uniform model under one "decoder.layers..." key, which changes
    the checkpoint's keys with the dense/MoE layer pattern and forces a reader to load every layer
    at once (the HF converter streams layer by layer)."""
    return model.sharded_state_dict(metadata={"non_homogeneous_layers": True})


def full_sharded_state_dict(model) -> dict:
    """Base weights and LoRA adapters alike (megatron_r1.lora.checkpoint_adapters_only narrows a
    model's sharded_state_dict to its adapters and keeps the full one aside)."""
    full = getattr(model, "full_sharded_state_dict", None)
    if full is None:
        return model_sharded_state_dict(model)
    return full(metadata={"non_homogeneous_layers": True})


def other_implementation_key(key: str, saved) -> str | None:
    """The key under which the other layer implementation (TransformerEngine's or the local spec's)
    saves what `key` names, where `saved` (a checkpoint's keys) holds it under that key; it may
    carry any prefix (a model chunk's, an optimizer state's)."""
    for ours, theirs in _KEY_PART_ALIASES:
        match = re.fullmatch(rf"(.*\.)?{re.escape(ours)}(weight|bias)", key)
        if match and (alias := f"{match[1] or ''}{theirs}{match[2]}") in saved:
            return alias
    return None


def follow_saved_keys(sharded: dict, saved) -> None:
    """Point each ShardedTensor of `sharded` whose key `saved` lacks at the other implementation's
    key for it, where `saved` holds that: a checkpoint loads whichever implementation wrote it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor) and item.key not in saved:
            item.key = other_implementation_key(item.key, saved) or item.key


def flat_sharded_tensors(model) -> dict:
    """checkpoint key -> the ShardedTensors (views of the parameters) that hold its pieces."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = full_sharded_state_dict(model)
    apply_factories(sharded)  # e.g. SwiGLU's fc1 -> its gate and up halves
    pieces = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            pieces.setdefault(item.key, []).append(item)
    return pieces


def global_shape(pieces) -> tuple:
    return tuple(pieces[0].global_shape)


def local_slices(piece) -> tuple:
    """Where `piece` sits along the axes of the tensor itself (after any prepended axes, such as
    the expert's global number, which global_offset[:prepend_axis_num] gives)."""
    offsets = piece.global_offset[piece.prepend_axis_num :]
    return tuple(slice(offset, offset + size) for offset, size in zip(offsets, piece.data.shape))


def fill(pieces, tensor: torch.Tensor) -> None:
    """Copy each piece's part of the global `tensor` (prepended axes included) into the parameter
    it views."""
    for piece in pieces:
        with torch.no_grad():
            piece.data.copy_(tensor[tuple(piece.global_offset[: piece.prepend_axis_num]) + local_slices(piece)])


def meta_model(args, config):
    """The model built on the meta device: its parameters hold no memory, its sharded state dicts
    say where each checkpoint tensor's pieces lie."""
    from megatron_r1.model import build_model  # which imports this module (through initialization)

    with torch.device("meta"):
        (model,) = build_model(args, config, initialize=False, device=torch.device("meta"))
    return model


def model_layout(model, optimizer_state: dict | None = None) -> tuple[dict, list, dict]:
    """``(checkpoint key -> its pieces, the ShardedObjects, the common state)`` of `model`'s sharded
    state dict (and `optimizer_state`, the optimizer's, where given): megatron-core's factories applied
    and its check that the pieces cover each tensor exactly once passed (save_preprocess, the first
    step of its save)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    state = {"model": model_sharded_state_dict(model)}
    if optimizer_state is not None:
        state["optimizer"] = optimizer_state
    sharded, common = save_preprocess(state)
    pieces, objects = {}, []
    for item in nested_values(sharded):
        if isinstance(item, ShardedTensor):
            pieces.setdefault(item.key, []).append(item)
        else:
            objects.append(item)
    return pieces, objects, common


def meta_model_layout(args, config) -> tuple[dict, list, dict]:
    """:func:`model_layout` of the :func:`meta_model` (the pieces' data hold no memory)."""
    return model_layout(meta_model(args, config))
