"""Our model flags -> Hugging Face configurations, refusing what the other side cannot represent (the
other direction: megatron_r1.hf.model_flags).

MLA models export as ``DeepseekV3ForCausalLM`` (sigmoid routing, or no MoE) or ``DeepseekV2ForCausalLM``
(softmax routing). transformers' models fix a few choices that our flags leave open, so a model maps
onto one exactly only when it makes the same ones (DeepseekV3's below; DeepseekV2 differs in its
routing: softmax over all experts, the top-k not renormalised (--moe-router-pre-softmax) times
``routed_scaling_factor``, groups scored by their best expert, and has no MTP layers):

- MLA with RMS norms on the compressed q and kv (``--qk-layernorm``), SwiGLU MLPs without biases, RoPE;
- routing ``sigmoid(logits) + e_score_correction_bias`` for the choice, weights renormalised over the
  top-k (megatron-core does so whenever top-k > 1) times ``routed_scaling_factor``; group-limited routing
  scores a group by the sum of its top *2* experts (megatron-core: its top ``topk / group_topk``);
- the first ``first_k_dense_replace`` layers dense, all later ones MoE, each with shared experts of
  ``n_shared_experts * moe_intermediate_size`` channels;
- RoPE applied to de-interleaved channels (``rope_interleave``), as megatron-core's MLA always does.

GQA/MHA models (no ``--multi-latent-attention``) export as the standard architecture their flags
choose (GQA_ARCHITECTURES): ``Qwen3MoeForCausalLM`` for MoE with ``--qk-layernorm`` (any layers dense:
``mlp_only_layers``), ``MixtralForCausalLM`` for MoE without (every layer MoE), ``Qwen3ForCausalLM`` /
``LlamaForCausalLM`` for dense models with / without. Each needs RMSNorm, SwiGLU without biases, RoPE
and no sliding window and has no MTP layers; the MoE ones need softmax routing (megatron-core has expert
bias only with sigmoid routing) without shared experts, expert groups or scaling, and Mixtral also the
top-k weights renormalised (no --moe-router-pre-softmax). A near match would load and silently compute
something else, so anything else is refused, naming the flag.
"""

import argparse
import copy
import os

from megatron_r1.arguments import build_parser, transformer_config_from_args
from megatron_r1.checkpointing import (
    METADATA_FILE,
    MODEL_ARGS_WITH_OLD_DEFAULTS,
    MODEL_FUNCTION_ARGS,
    MODEL_SHAPE_ARGS,
    CheckpointError,
    find_checkpoint,
    read_metadata,
)
from megatron_r1.flops import moe_layer_pattern


class UnsupportedModelError(ValueError):
    """The model cannot be represented exactly in the other format."""


def resolve_checkpoint(path: str) -> str:
    """An ``iter_XXXXXXX`` directory, or a --save root (its latest iteration)."""
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    found = find_checkpoint(argparse.Namespace(load=path, ckpt_step=None))
    if found is None:
        raise CheckpointError(
            f"{path}: neither a checkpoint directory (no {METADATA_FILE}) nor a --save root "
            "(no latest_checkpointed_iteration.txt)"
        )
    return found


def _check_saved_types(saved: dict, defaults: argparse.Namespace, metadata_path: str) -> None:
    """Each saved model flag has the kind of value of the parser's default, where there is one."""
    for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS:
        value, default = saved.get(name), getattr(defaults, name, None)
        if value is None or default is None:
            continue
        if isinstance(default, (bool, str)):
            fits = type(value) is type(default)
        else:  # a number (an int where a float is expected is fine), or a per-layer list (--moe-layer-freq)
            number = float if isinstance(default, float) else int
            fits = not isinstance(value, bool) and isinstance(value, (int, number, list))
        if not fits:
            raise CheckpointError(f"{metadata_path}: model_args.{name} is {value!r}, not a {type(default).__name__}")


def checkpoint_args(path: str) -> argparse.Namespace:
    """The flags of the model saved in checkpoint directory `path` (parser defaults for the rest),
    laid out for one process."""
    metadata_path = os.path.join(path, METADATA_FILE)
    saved = read_metadata(path)["model_args"]
    missing = [
        name
        for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS
        if name not in saved and name not in MODEL_ARGS_WITH_OLD_DEFAULTS
    ]
    if missing:
        raise CheckpointError(
            f"{metadata_path} lacks the model flags {', '.join(missing)} (saved by an older "
            "version): load it with pretrain_r1.py --finetune and the original flags, and save again"
        )
    args = build_parser("").parse_args([])
    _check_saved_types(saved, args, metadata_path)
    vars(args).update(saved)
    # Rebuilt with megatron-core's local layers whichever wrote it (read_checkpoint maps the keys of
    # the norms TransformerEngine fuses): the same function, on any machine.
    args.transformer_impl = "local"
    args.world_size = 1
    args.virtual_pipeline_model_parallel_size = None
    return args


def first_dense_layers(args) -> int:
    """DeepSeek-V3's first_k_dense_replace; UnsupportedModelError unless the dense layers lead."""
    pattern = moe_layer_pattern(args)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if any(flag == 0 for flag in pattern[k:]):
        raise UnsupportedModelError(
            f"--moe-layer-freq {pattern}: DeepseekV3 needs the dense layers first and only MoE "
            "layers after them (first_k_dense_replace)"
        )
    return k


def _refuse_unless(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)


def deepseek_fields(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict:
    """The ``config.json`` of ``DeepseekV3ForCausalLM`` or, for softmax routing, ``DeepseekV2ForCausalLM``
    for the model that `args` describes (UnsupportedModelError naming the flag when transformers' model
    would compute something else), in the fields that transformers 4.57 and 5.x both read alike
    (rope_theta and rope_scaling, which 5.x folds into its rope_parameters)."""
    _refuse_other_layers(args)
    config = transformer_config_from_args(args)
    fields = dict(
        **_common_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id),
        intermediate_size=config.ffn_hidden_size,
        num_key_value_heads=args.num_attention_heads,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        qk_nope_head_dim=args.qk_head_dim,
        v_head_dim=args.v_head_dim,
        first_k_dense_replace=first_dense_layers(args),
        rope_scaling=_rope_scaling(args, config),
    )
    if args.num_experts and args.moe_router_score_function == "softmax":
        return dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", **fields,
                    mlp_bias=False, **_deepseek_v2_moe_fields(args, config))  # fmt: skip
    return dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        **fields,
        rope_interleave=True,
        # Read by DeepSeek's own modelling code and by vLLM; transformers keeps them as attributes.
        num_nextn_predict_layers=args.mtp_num_layers or 0,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        **(_moe_fields(args, config) if args.num_experts else {}),
    )


def _common_fields(args, vocab_size: int, bos_token_id, eos_token_id, pad_token_id) -> dict:
    """The ``config.json`` fields that every architecture here has and fills alike."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.init_method_std,
        rms_norm_eps=args.norm_epsilon,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        rope_theta=float(args.rotary_base),
        attention_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )


def hf_config(fields: dict):
    """The installed transformers' configuration object for the ``config.json`` `fields` (a copy: 5.x
    rewrites the rope_scaling it is given)."""
    from transformers import AutoConfig

    fields = copy.deepcopy(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def deepseek_config(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The ``transformers.DeepseekV3Config`` (or V2's) of the model that `args` describes (deepseek_fields)."""
    return hf_config(deepseek_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id))


def _refuse_other_layers(args) -> None:
    """UnsupportedModelError unless attention, norms, MLPs and positions are DeepSeek's."""
    _refuse_unless(
        args.multi_latent_attention,
        "GQA models (no --multi-latent-attention) are not DeepSeek's: they export as Qwen3-MoE, Mixtral, "
        "Qwen3 or Llama (export_fields)",
    )
    _refuse_unlike_standard_layers(args, "DeepSeek")
    _refuse_unless(
        args.qk_layernorm,
        "DeepSeek normalises the compressed q and kv (q_a_layernorm, kv_a_layernorm): the model needs --qk-layernorm",
    )


def _refuse_unlike_standard_layers(args, name: str) -> None:
    """UnsupportedModelError unless norms, MLPs and positions are those every architecture here has."""
    _refuse_unless(args.normalization == "RMSNorm", f"--normalization LayerNorm: {name} uses RMSNorm")
    _refuse_unless(args.swiglu, f"{name}'s MLPs are SwiGLU: the model needs --swiglu")
    _refuse_unless(
        args.disable_bias_linear, f"{name}'s linear layers have no biases: the model needs --disable-bias-linear"
    )
    _refuse_unless(
        args.position_embedding_type == "rope",
        f"--position-embedding-type {args.position_embedding_type}: {name} uses RoPE",
    )
    _refuse_unless(args.window_size is None, f"--window-size: {name} is exported without sliding-window attention")


# The standard architecture of a GQA/MHA model (no MLA), by (MoE, --qk-layernorm): Qwen3's q_norm and
# k_norm are megatron-core's q/k layernorms (RMS over each head's channels, before RoPE).
GQA_ARCHITECTURES = {
    (True, True): ("Qwen3MoeForCausalLM", "qwen3_moe"),
    (True, False): ("MixtralForCausalLM", "mixtral"),
    (False, True): ("Qwen3ForCausalLM", "qwen3"),
    (False, False): ("LlamaForCausalLM", "llama"),
}


def gqa_architecture(args) -> tuple[str, str]:
    """(class name, model_type) of the standard architecture for GQA/MHA model flags `args`."""
    return GQA_ARCHITECTURES[bool(args.num_experts), bool(args.qk_layernorm)]


def export_fields(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict:
    """The ``config.json`` of the standard architecture that computes the model `args` describes
    exactly: DeepseekV3 or V2 for MLA, else by the flags (GQA_ARCHITECTURES); UnsupportedModelError
    naming the flag that none of them represents."""
    if args.multi_latent_attention:
        return deepseek_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id)
    return gqa_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id)


def gqa_fields(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict:
    """The ``config.json`` of the GQA/MHA model `args` describes: Qwen3-MoE, Mixtral, Qwen3 or Llama
    (megatron-core's RoPE rotates de-interleaved halves over every channel of a head, as they do)."""
    name, model_type = gqa_architecture(args)
    _refuse_unlike_standard_layers(args, name)
    _refuse_unless(not args.mtp_num_layers, f"--mtp-num-layers {args.mtp_num_layers}: {name} has no MTP layers")
    config = transformer_config_from_args(args)
    fields = dict(
        architectures=[name],
        model_type=model_type,
        **_common_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id),
        num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        rope_scaling=_llama3_rope_scaling(args, name),
        attention_dropout=0.0,
    )
    if model_type == "llama":
        return {**fields, "intermediate_size": config.ffn_hidden_size, "mlp_bias": False}
    if model_type == "qwen3":
        return {**fields, "intermediate_size": config.ffn_hidden_size, "use_sliding_window": False}
    return {**fields, **_gqa_moe_fields(args, config, name)}


# megatron-core's Llama 3.1 RoPE scaling fixes all but the factor.
LLAMA3_ROPE_CONSTANTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_rope_scaling(args, name: str) -> dict | None:
    """The rope_scaling of --use-rope-scaling (transformers' llama3 type), None without it."""
    if not args.use_rope_scaling:
        return None
    _refuse_unless(name != "MixtralForCausalLM", "--use-rope-scaling: MixtralForCausalLM is exported with plain RoPE")
    return {"rope_type": "llama3", "factor": args.rope_scaling_factor, **LLAMA3_ROPE_CONSTANTS}


def _gqa_moe_fields(args, config, name: str) -> dict:
    """Qwen3-MoE's or Mixtral's MoE fields: softmax over the experts, top-k, the top-k weights
    renormalised (megatron-core: softmax over the top-k logits) unless --moe-router-pre-softmax."""
    _refuse_unless(
        args.moe_router_score_function == "softmax",
        f"--moe-router-score-function {args.moe_router_score_function}: {name} routes with softmax scores "
        "(sigmoid routing, with or without expert bias, exports as DeepseekV3: --multi-latent-attention)",
    )
    _refuse_unless(
        not args.moe_shared_expert_intermediate_size,
        f"--moe-shared-expert-intermediate-size {args.moe_shared_expert_intermediate_size}: {name} has no shared "
        "experts (Qwen2-MoE's shared expert has a gate that megatron-core's lacks; DeepseekV3 needs MLA)",
    )
    _refuse_unless(
        (args.moe_router_num_groups or 1) == 1, f"--moe-router-num-groups {args.moe_router_num_groups}: {name} routes "
        "without expert groups"
    )  # fmt: skip
    _refuse_unless(
        args.moe_router_topk_scaling_factor in (None, 1.0),
        f"--moe-router-topk-scaling-factor {args.moe_router_topk_scaling_factor}: {name} does not scale the "
        "routing weights",
    )
    pattern = moe_layer_pattern(args)
    if name == "MixtralForCausalLM":
        _refuse_unless(
            all(pattern),
            f"--moe-layer-freq {pattern}: MixtralForCausalLM has MoE in every layer (Qwen3MoeForCausalLM, "
            "which takes dense layers, has q/k norms: --qk-layernorm)",
        )
        _refuse_unless(
            not args.moe_router_pre_softmax,
            "--moe-router-pre-softmax: MixtralForCausalLM renormalises the top-k routing weights",
        )
        return dict(num_local_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                    intermediate_size=config.moe_ffn_hidden_size, sliding_window=None, output_router_logits=False)  # fmt: skip
    return dict(num_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                moe_intermediate_size=config.moe_ffn_hidden_size, intermediate_size=config.ffn_hidden_size,
                norm_topk_prob=not args.moe_router_pre_softmax, decoder_sparse_step=1,
                mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe], use_sliding_window=False,
                output_router_logits=False)  # fmt: skip


def _rope_scaling(args, config) -> dict | None:
    """DeepseekV3Config's rope_scaling: the yarn parameters, or None for plain RoPE (refused where
    plain RoPE would scale the attention softmax)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    if args.rope_type != "yarn":
        _refuse_unless(
            args.rotary_scaling_factor <= 1 or not args.mscale_all_dim,
            "--rope-type rope with --rotary-scaling-factor > 1 and --mscale-all-dim scales the attention "
            "softmax, which DeepseekV3 does only with yarn RoPE",
        )
        return None
    return {
        "rope_type": "yarn",
        "factor": args.rotary_scaling_factor,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "beta_fast": args.beta_fast,
        "beta_slow": args.beta_slow,
        "mscale": args.mscale,
        "mscale_all_dim": args.mscale_all_dim,
        # megatron-core's cos/sin scale, stated so that transformers does not re-derive it differently.
        "attention_factor": _yarn_get_concentration_factor(
            args.rotary_scaling_factor, args.mscale, args.mscale_all_dim
        ),
    }


def _experts_fields(args, config) -> dict:
    """DeepSeek's expert fields: routed experts and >= 1 shared expert of the same size."""
    shared = args.moe_shared_expert_intermediate_size
    expert_size = config.moe_ffn_hidden_size
    _refuse_unless(
        bool(shared) and shared % expert_size == 0,
        f"--moe-shared-expert-intermediate-size {shared}: "
        f"DeepSeek has n_shared_experts >= 1 shared experts of --moe-ffn-hidden-size ({expert_size}) channels",
    )
    return dict(n_routed_experts=args.num_experts, moe_intermediate_size=expert_size,
                n_shared_experts=shared // expert_size, num_experts_per_tok=args.moe_router_topk)  # fmt: skip


def _deepseek_v2_moe_fields(args, config) -> dict:
    """DeepseekV2Config's MoE fields: softmax over all experts, the top-k unrenormalised, greedy or
    group-limited by each group's best expert; UnsupportedModelError where ours would route otherwise."""
    _refuse_unless(
        not args.mtp_num_layers,
        f"--mtp-num-layers {args.mtp_num_layers}: DeepseekV2 (softmax routing) has no MTP layers",
    )
    _refuse_unless(
        args.moe_router_pre_softmax,
        "--moe-router-score-function softmax without --moe-router-pre-softmax renormalises the top-k weights; "
        "DeepseekV2 (softmax routing) does not",
    )
    groups, group_topk = args.moe_router_num_groups or 1, args.moe_router_group_topk or 1
    if groups > 1:
        _refuse_unless(
            args.moe_router_topk // group_topk == 1,
            f"--moe-router-topk {args.moe_router_topk} with --moe-router-group-topk {group_topk}: DeepseekV2 "
            "scores a group by its best expert, megatron-core by its top topk/group_topk",
        )
    return dict(
        **_experts_fields(args, config),
        topk_method="group_limited_greedy" if groups > 1 else "greedy",
        n_group=groups,
        topk_group=group_topk if groups > 1 else 1,
        norm_topk_prob=False,
        routed_scaling_factor=args.moe_router_topk_scaling_factor or 1.0,
        scoring_func="softmax",
    )


def _moe_fields(args, config) -> dict:
    """DeepseekV3Config's MoE fields; UnsupportedModelError where its routing or shared experts differ."""
    groups, group_topk = _router_groups(args)
    return dict(
        **_experts_fields(args, config),
        n_group=groups,
        topk_group=group_topk if groups > 1 else 1,
        norm_topk_prob=args.moe_router_topk > 1,
        routed_scaling_factor=args.moe_router_topk_scaling_factor or 1.0,
    )


def _router_groups(args) -> tuple[int, int]:
    """(groups, group top-k) of the routing; UnsupportedModelError where DeepseekV3 would route otherwise."""
    groups, group_topk = args.moe_router_num_groups or 1, args.moe_router_group_topk or 1
    if groups > 1:
        _refuse_unless(
            args.moe_router_topk == 2 * group_topk,
            f"--moe-router-topk {args.moe_router_topk} with "
            f"--moe-router-group-topk {group_topk}: DeepseekV3 scores a group by its top 2 experts, "
            "megatron-core by its top topk/group_topk; they agree only when topk = 2 x group_topk",
        )
    else:
        _refuse_unless(args.num_experts >= 2, "DeepseekV3 needs at least 2 routed experts")
    return groups, group_topk
