"""Tensor-by-tensor mapping between our torch_dist checkpoint keys (megatron-core's sharded keys,
the same for every TP/PP/EP layout) and the keys of the published DeepSeek-V3 / V2 checkpoints (MLA
models), or of Qwen3-MoE, Mixtral, Qwen3 and Llama checkpoints (GQA/MHA models:
megatron_r1.hf.config.GQA_ARCHITECTURES).

The mapping is a list of groups, one per transformer layer plus the embedding and the head, so that
either direction holds one layer's tensors at a time. Every :class:`TensorMap` converts one of our
tensors to one or more Hugging Face tensors and back:

=============  =====================================================================================
``copy``       same tensor (norms, attention projections, router, ...)
``vocab``      embedding / output rows: ours are padded to a multiple of --make-vocab-size-divisible-by x TP
``glu``        ``linear_fc1`` = cat(gate_proj, up_proj) along the output dim
``experts``    our experts are one tensor [E, out, in]; DeepSeek-V3 has ``mlp.experts.{e}.*_proj`` each
``experts_glu``  both of the above
``zeros``      e_score_correction_bias of a model trained without expert bias (export only)
``qkv``        GQA's ``linear_qkv``, per query group its heads' q rows, then k, then v; ``q/k/v_proj``
=============  =====================================================================================

MTP layer i is published as ``model.layers.{num_layers + i}``: the transformer layer's keys plus
``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` (its final norm) and copies of the embedding
and output layer (``embed_tokens``, ``shared_head.head``), which megatron-core shares with the main model.
"""

from dataclasses import dataclass

import torch

from megatron_r1.arguments import transformer_config_from_args
from megatron_r1.flops import moe_layer_pattern
from megatron_r1.hf.config import first_dense_layers, gqa_architecture


@dataclass(frozen=True)
class TensorMap:
    mcore: str
    hf: tuple
    kind: str = "copy"
    export_only: bool = False  # a copy of a tensor that another map imports
    heads: tuple = ()  # qkv: (attention heads, query groups)

    def to_hf(self, tensor: torch.Tensor, vocab_size: int) -> dict:
        if self.kind == "copy":
            return {self.hf[0]: tensor}
        if self.kind == "qkv":
            heads, groups = self.heads
            per_group = tensor.view(groups, -1, tensor.shape[-1])
            head_dim = per_group.shape[1] // (heads // groups + 2)
            parts = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
            return {name: part.reshape(-1, tensor.shape[-1]) for name, part in zip(self.hf, parts, strict=True)}
        if self.kind == "vocab":
            return {self.hf[0]: tensor[:vocab_size]}
        if self.kind == "glu":
            gate, up = torch.chunk(tensor, 2, dim=0)
            return {self.hf[0]: gate, self.hf[1]: up}
        if self.kind == "experts":
            return {name: tensor[e] for e, name in enumerate(self.hf)}
        if self.kind == "experts_glu":
            out = {}
            for e in range(tensor.shape[0]):
                gate, up = torch.chunk(tensor[e], 2, dim=0)
                out[self.hf[2 * e]], out[self.hf[2 * e + 1]] = gate, up
            return out
        if self.kind == "zeros":
            return {self.hf[0]: torch.zeros(tensor.shape[0], dtype=tensor.dtype)}
        raise AssertionError(self.kind)

    def to_mcore(self, tensors: dict, padded_vocab_size: int) -> torch.Tensor:
        if self.kind == "copy":
            return tensors[self.hf[0]]
        if self.kind == "qkv":
            groups, hidden = self.heads[1], tensors[self.hf[0]].shape[-1]
            parts = [tensors[name].reshape(groups, -1, hidden) for name in self.hf]
            return torch.cat(parts, dim=1).reshape(-1, hidden)
        if self.kind == "vocab":
            rows = tensors[self.hf[0]]
            padding = rows.new_zeros(padded_vocab_size - rows.shape[0], *rows.shape[1:])
            return torch.cat([rows, padding])
        if self.kind == "glu":
            return torch.cat([tensors[self.hf[0]], tensors[self.hf[1]]])
        if self.kind == "experts":
            return torch.stack([tensors[name] for name in self.hf])
        if self.kind == "experts_glu":
            pairs = zip(self.hf[0::2], self.hf[1::2])
            return torch.stack([torch.cat([tensors[gate], tensors[up]]) for gate, up in pairs])
        raise AssertionError(self.kind)


def _transformer_layer(ours: str, theirs: str, args, moe: bool) -> list[TensorMap]:
    attention = [
        TensorMap(f"{ours}input_layernorm.weight", (f"{theirs}input_layernorm.weight",)),
        TensorMap(
            f"{ours}self_attention.linear_kv_down_proj.weight", (f"{theirs}self_attn.kv_a_proj_with_mqa.weight",)
        ),
        TensorMap(f"{ours}self_attention.kv_layernorm.weight", (f"{theirs}self_attn.kv_a_layernorm.weight",)),
        TensorMap(f"{ours}self_attention.linear_kv_up_proj.weight", (f"{theirs}self_attn.kv_b_proj.weight",)),
        TensorMap(f"{ours}self_attention.linear_proj.weight", (f"{theirs}self_attn.o_proj.weight",)),
        TensorMap(f"{ours}pre_mlp_layernorm.weight", (f"{theirs}post_attention_layernorm.weight",)),
    ]
    if args.q_lora_rank:
        attention += [
            TensorMap(f"{ours}self_attention.linear_q_down_proj.weight", (f"{theirs}self_attn.q_a_proj.weight",)),
            TensorMap(f"{ours}self_attention.q_layernorm.weight", (f"{theirs}self_attn.q_a_layernorm.weight",)),
            TensorMap(f"{ours}self_attention.linear_q_up_proj.weight", (f"{theirs}self_attn.q_b_proj.weight",)),
        ]
    else:
        attention.append(TensorMap(f"{ours}self_attention.linear_q_proj.weight", (f"{theirs}self_attn.q_proj.weight",)))
    if not moe:
        return attention + _swiglu_mlp(f"{ours}mlp.", f"{theirs}mlp.")
    routing = [TensorMap(f"{ours}mlp.router.weight", (f"{theirs}mlp.gate.weight",))]
    if args.moe_router_score_function == "sigmoid":  # DeepseekV3's gate has an expert bias, V2's none
        bias_key = f"{theirs}mlp.gate.e_score_correction_bias"
        routing.append(
            TensorMap(f"{ours}mlp.router.expert_bias", (bias_key,))
            if args.moe_router_enable_expert_bias
            else TensorMap(f"{ours}mlp.router.weight", (bias_key,), "zeros", export_only=True)
        )
    experts = _routed_experts(f"{ours}mlp.experts.experts.", f"{theirs}mlp.experts.", args.num_experts, DEFAULT_MOE[1])
    return attention + routing + experts + _swiglu_mlp(f"{ours}mlp.shared_experts.", f"{theirs}mlp.shared_experts.")


def _swiglu_mlp(ours: str, theirs: str) -> list[TensorMap]:
    """A SwiGLU MLP (a dense layer's, the shared experts'): our fc1 holds the gate then the up projection."""
    return [
        TensorMap(f"{ours}linear_fc1.weight", (f"{theirs}gate_proj.weight", f"{theirs}up_proj.weight"), "glu"),
        TensorMap(f"{ours}linear_fc2.weight", (f"{theirs}down_proj.weight",)),
    ]


def _routed_experts(ours: str, theirs: str, count: int, projections: tuple) -> list[TensorMap]:
    """The routed experts: one tensor of ours per projection, `{theirs}{e}.{name}.weight` per expert of
    theirs (`projections`: the published names of the gate, up and down projections)."""
    gate, up, down = projections
    gate_up = tuple(f"{theirs}{e}.{proj}.weight" for e in range(count) for proj in (gate, up))
    return [
        TensorMap(f"{ours}linear_fc1.weight", gate_up, "experts_glu"),
        TensorMap(f"{ours}linear_fc2.weight", tuple(f"{theirs}{e}.{down}.weight" for e in range(count)), "experts"),
    ]


def conversion_groups(args) -> list[tuple[str, list[TensorMap]]]:
    """(name, maps) per unit of work, in file order: embedding, each layer, each MTP layer, head."""
    tied = not args.untie_embeddings_and_output_weights
    embedding = "embedding.word_embeddings.weight"
    output = embedding if tied else "output_layer.weight"
    groups = [("embedding", [TensorMap(embedding, ("model.embed_tokens.weight",), "vocab")])]
    groups += _deepseek_layers(args, embedding, output) if args.multi_latent_attention else _gqa_layers(args)
    head = [TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not tied:
        head.append(TensorMap(output, ("lm_head.weight",), "vocab"))
    groups.append(("head", head))
    return groups


def _deepseek_layers(args, embedding: str, output: str) -> list[tuple[str, list[TensorMap]]]:
    n_dense = first_dense_layers(args)
    groups = []
    for layer in range(args.num_layers):
        maps = _transformer_layer(f"decoder.layers.{layer}.", f"model.layers.{layer}.", args, layer >= n_dense)
        groups.append((f"layer {layer}", maps))
    for i in range(args.mtp_num_layers or 0):
        ours, theirs = f"mtp.layers.{i}.", f"model.layers.{args.num_layers + i}."
        # megatron-core builds MTP layers with the last decoder layer's spec.
        maps = _transformer_layer(f"{ours}transformer_layer.", theirs, args, args.num_layers > n_dense)
        maps += [
            TensorMap(f"{ours}enorm.weight", (f"{theirs}enorm.weight",)),
            TensorMap(f"{ours}hnorm.weight", (f"{theirs}hnorm.weight",)),
            TensorMap(f"{ours}eh_proj.weight", (f"{theirs}eh_proj.weight",)),
            TensorMap(f"{ours}final_layernorm.weight", (f"{theirs}shared_head.norm.weight",)),
            TensorMap(embedding, (f"{theirs}embed_tokens.weight",), "vocab", export_only=True),
            TensorMap(output, (f"{theirs}shared_head.head.weight",), "vocab", export_only=True),
        ]
        groups.append((f"mtp layer {i}", maps))
    return groups


# Where a GQA architecture publishes a MoE layer: its block's name and each expert's gate, up and down.
PUBLISHED_MOE = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}
DEFAULT_MOE = ("mlp", ("gate_proj", "up_proj", "down_proj"))


def _gqa_layers(args) -> list[tuple[str, list[TensorMap]]]:
    """A GQA/MHA model's layers under their keys in its standard architecture. megatron-core's local
    spec keeps the input and pre-MLP norms as TransformerEngine names them (fused into the next linear)."""
    config = transformer_config_from_args(args)
    heads = (config.num_attention_heads, config.num_query_groups)
    block, (gate, up, down) = PUBLISHED_MOE.get(gqa_architecture(args)[1], DEFAULT_MOE)
    groups = []
    for layer, moe in enumerate(moe_layer_pattern(args)):
        ours, theirs = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attention = f"{theirs}self_attn."
        maps = [
            TensorMap(f"{ours}self_attention.linear_qkv.layer_norm_weight", (f"{theirs}input_layernorm.weight",)),
            TensorMap(
                f"{ours}self_attention.linear_qkv.weight",
                tuple(f"{attention}{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj")),
                "qkv",
                heads=heads,
            ),
            TensorMap(f"{ours}self_attention.linear_proj.weight", (f"{attention}o_proj.weight",)),
            TensorMap(f"{ours}mlp.linear_fc1.layer_norm_weight", (f"{theirs}post_attention_layernorm.weight",)),
        ]
        if args.qk_layernorm:
            maps += [
                TensorMap(f"{ours}self_attention.q_layernorm.weight", (f"{attention}q_norm.weight",)),
                TensorMap(f"{ours}self_attention.k_layernorm.weight", (f"{attention}k_norm.weight",)),
            ]
        if moe:
            maps.append(TensorMap(f"{ours}mlp.router.weight", (f"{theirs}{block}.gate.weight",)))
            maps += _routed_experts(
                f"{ours}mlp.experts.experts.", f"{theirs}{block}.experts.", args.num_experts, (gate, up, down)
            )
        else:
            maps += _swiglu_mlp(f"{ours}mlp.", f"{theirs}mlp.")
        groups.append((f"layer {layer}", maps))
    return groups
