"""A checkpoint as TransformerEngine's layers (megatron-core's TransformerEngine spec) save it, for
tests on machines without TransformerEngine: every tensor the local spec's checkpoint holds, the
norms TransformerEngine fuses into the next linear layer under that layer's names (MLA's q and kv
norms; the norm before a dense layer's MLP, which an MoE layer keeps as pre_mlp_layernorm)."""

import json
import sys
from pathlib import Path

MLA_NORMS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
}
PRE_MLP_NORMS = ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")  # (a dense layer's, an MoE layer's)


def transformer_engine_key(key: str, dense_layers) -> str:
    """`key` of a local-spec checkpoint (any prefix: a chunk's, an optimizer state's) as
    TransformerEngine's layers name it; `dense_layers`: the numbers of the decoder's dense layers."""
    for local, fused in MLA_NORMS.items():
        key = key.replace(local, fused)
    dense, moe = PRE_MLP_NORMS
    if any(f"decoder.layers.{layer}." in key for layer in dense_layers):
        return key.replace(moe, dense)
    return key.replace(dense, moe)


def save_with_transformer_engine_keys(dense_layers) -> None:
    """Makes megatron_r1's checkpoint saves (in this process) write TransformerEngine's keys."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_r1 import checkpointing

    original = checkpointing._sharded_state_dict

    def sharded_state_dict(state, is_loading, *args, **kwargs):
        sharded = original(state, is_loading, *args, **kwargs)
        for item in nested_values(sharded):
            if not is_loading and isinstance(item, ShardedTensor):
                item.key = transformer_engine_key(item.key, dense_layers)
        return sharded

    checkpointing._sharded_state_dict = sharded_state_dict


def pretrain_saving_transformer_engine_keys(pretrain: Path, dense_layers=()) -> list[str]:
    """The command (before its flags) of `pretrain` (pretrain_r1.py) saving TransformerEngine's keys."""
    code = (
        f"import runpy, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from transformer_engine_keys import save_with_transformer_engine_keys; "
        f"save_with_transformer_engine_keys({list(dense_layers)!r}); "
        f"runpy.run_path({str(pretrain)!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def mark_as_transformer_engines(checkpoint: Path) -> None:
    """Record --transformer-impl transformer_engine in the checkpoint's model flags, as such a run does."""
    metadata_file = checkpoint / "megatron_r1.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["model_args"]["transformer_impl"] = "transformer_engine"
    metadata_file.write_text(json.dumps(metadata))
