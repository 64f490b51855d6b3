"""Our model flags <-> Hugging Face configurations, refusing what one side cannot represent.

MLA models export as ``DeepseekV3ForCausalLM`` (and import from it). transformers' model fixes a few
choices that our flags leave open, so a model maps onto it exactly only when it makes the same ones:

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
import math
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
    if saved.get("transformer_impl", "local") != "local":
        raise CheckpointError(
            f"{metadata_path}: trained with --transformer-impl {saved['transformer_impl']}, whose "
            "layers keep other checkpoint keys; generation, merging and export read checkpoints "
            "of --transformer-impl local"
        )
    args = build_parser("").parse_args([])
    _check_saved_types(saved, args, metadata_path)
    vars(args).update(saved)
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


def deepseek_v3_fields(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> dict:
    """The ``config.json`` of ``DeepseekV3ForCausalLM`` for the model that `args` describes
    (UnsupportedModelError naming the flag when transformers' model would compute something else), in
    the fields that transformers 4.57 and 5.x both read alike (rope_theta and rope_scaling, which 5.x
    folds into its rope_parameters)."""
    _refuse_other_layers(args)
    config = transformer_config_from_args(args)
    rope_scaling = _rope_scaling(args, config)
    n_dense = first_dense_layers(args)
    moe = _moe_fields(args, config) if args.num_experts else {}
    return dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        **_common_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id),
        intermediate_size=config.ffn_hidden_size,
        num_key_value_heads=args.num_attention_heads,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        qk_nope_head_dim=args.qk_head_dim,
        v_head_dim=args.v_head_dim,
        first_k_dense_replace=n_dense,
        rope_scaling=rope_scaling,
        rope_interleave=True,
        # Read by DeepSeek's own modelling code and by vLLM; transformers keeps them as attributes.
        num_nextn_predict_layers=args.mtp_num_layers or 0,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        **moe,
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


def deepseek_v3_config(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The ``transformers.DeepseekV3Config`` of the model that `args` describes (see deepseek_v3_fields)."""
    return hf_config(deepseek_v3_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id))


def _refuse_other_layers(args) -> None:
    """UnsupportedModelError unless attention, norms, MLPs and positions are DeepseekV3's."""
    _refuse_unless(
        args.multi_latent_attention,
        "GQA models (no --multi-latent-attention) are not DeepseekV3's: they export as Qwen3-MoE, Mixtral, "
        "Qwen3 or Llama (export_fields)",
    )
    _refuse_unlike_standard_layers(args, "DeepseekV3")
    _refuse_unless(
        args.qk_layernorm,
        "DeepseekV3 normalises the compressed q and kv (q_a_layernorm, kv_a_layernorm): the model needs --qk-layernorm",
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
    exactly: DeepseekV3 for MLA, else by the flags (GQA_ARCHITECTURES); UnsupportedModelError naming
    the flag that none of them represents."""
    if args.multi_latent_attention:
        return deepseek_v3_fields(args, vocab_size, bos_token_id, eos_token_id, pad_token_id)
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
        rope_scaling=None,
        attention_dropout=0.0,
    )
    if model_type == "llama":
        return {**fields, "intermediate_size": config.ffn_hidden_size, "mlp_bias": False}
    if model_type == "qwen3":
        return {**fields, "intermediate_size": config.ffn_hidden_size, "use_sliding_window": False}
    return {**fields, **_gqa_moe_fields(args, config, name)}


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


def _moe_fields(args, config) -> dict:
    """DeepseekV3Config's MoE fields; UnsupportedModelError where its routing or shared experts differ."""
    _refuse_unless(
        args.moe_router_score_function == "sigmoid",
        "--moe-router-score-function softmax: DeepseekV3 routes with sigmoid scores (topk_method noaux_tc)",
    )
    shared = args.moe_shared_expert_intermediate_size
    expert_size = config.moe_ffn_hidden_size
    _refuse_unless(
        bool(shared) and shared % expert_size == 0,
        f"--moe-shared-expert-intermediate-size {shared}: "
        f"DeepseekV3 has n_shared_experts >= 1 shared experts of --moe-ffn-hidden-size ({expert_size}) channels",
    )
    groups, group_topk = _router_groups(args)
    return dict(
        n_routed_experts=args.num_experts,
        moe_intermediate_size=expert_size,
        n_shared_experts=shared // expert_size,
        num_experts_per_tok=args.moe_router_topk,
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


_REQUIRED = object()


class _ConfigFields:
    """Typed reads of a ``config.json`` object: a missing or ill-typed field is an
    UnsupportedModelError naming the file and the field. A null counts as absent where there is a
    default (transformers writes null for unset fields)."""

    def __init__(self, config: dict, source: str, prefix: str = ""):
        self.config, self.source, self.prefix = config, source, prefix

    def get(self, name: str, default=None):
        return self.config.get(name, default)

    def _read(self, name: str, default, accepts, kind: str):
        value = self.config.get(name)
        if value is None and default is not _REQUIRED:
            return default
        if name not in self.config:
            raise UnsupportedModelError(f"{self.source}: no {self.prefix}{name!r}")
        if isinstance(value, bool) or not accepts(value):
            raise UnsupportedModelError(f"{self.source}: {self.prefix}{name} must be {kind}, got {value!r}")
        return value

    def integer(self, name: str, default=_REQUIRED, minimum: int = 1) -> int:
        return self._read(name, default, lambda v: isinstance(v, int) and v >= minimum, f"an integer >= {minimum}")

    def number(self, name: str, default=_REQUIRED) -> float:
        return self._read(name, default, lambda v: isinstance(v, (int, float)) and math.isfinite(v), "a finite number")


def args_from_deepseek_v3(config: dict, source: str) -> list[str]:
    """Our model flags for a Hugging Face ``config.json`` (dict) read from `source`."""
    fields = _ConfigFields(config, source)
    model_type = config.get("model_type")
    _refuse_unless(
        model_type == "deepseek_v3",
        f"{source}: model_type {model_type!r}; only 'deepseek_v3' (DeepseekV3ForCausalLM) converts",
    )
    _refuse_unless(
        config.get("hidden_act", "silu") == "silu", f"{source}: hidden_act {config.get('hidden_act')!r} (only silu)"
    )
    _refuse_unless(not config.get("attention_bias", False), f"{source}: attention_bias true (our MLA has no biases)")
    _refuse_unless(
        config.get("rope_interleave", True),
        f"{source}: rope_interleave false (megatron-core's MLA always de-interleaves the rotary channels)",
    )
    _refuse_unless(
        config.get("scoring_func", "sigmoid") == "sigmoid", f"{source}: scoring_func {config.get('scoring_func')!r}"
    )
    layers, heads = fields.integer("num_hidden_layers"), fields.integer("num_attention_heads")
    _refuse_unless(
        config.get("num_key_value_heads", heads) == heads, f"{source}: num_key_value_heads != num_attention_heads"
    )
    rope_theta = fields.number("rope_theta", 10000)
    if float(rope_theta) != int(rope_theta):
        raise UnsupportedModelError(f"{source}: rope_theta {rope_theta} is not an integer (--rotary-base)")
    max_positions = fields.integer("max_position_embeddings")
    argv = [
        "--num-layers", layers, "--hidden-size", fields.integer("hidden_size"), "--ffn-hidden-size", fields.integer("intermediate_size"),
        "--num-attention-heads", heads, "--multi-latent-attention", "--qk-layernorm",
        "--kv-lora-rank", fields.integer("kv_lora_rank"), "--qk-head-dim", fields.integer("qk_nope_head_dim"),
        "--qk-pos-emb-head-dim", fields.integer("qk_rope_head_dim"), "--v-head-dim", fields.integer("v_head_dim"),
        "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--norm-epsilon", fields.number("rms_norm_eps", 1e-6),
        "--position-embedding-type", "rope", "--rotary-base", int(rope_theta),
        "--max-position-embeddings", max_positions, "--seq-length", max_positions,
        "--init-method-std", fields.number("initializer_range", 0.02), "--vocab-size", fields.integer("vocab_size"),
    ]  # fmt: skip
    if fields.integer("q_lora_rank", None) is not None:
        argv += ["--q-lora-rank", config["q_lora_rank"]]
    if not config.get("tie_word_embeddings", False):
        argv.append("--untie-embeddings-and-output-weights")
    if config.get("rope_scaling"):
        argv += _yarn_flags(config["rope_scaling"], max_positions, source)
    n_dense = fields.integer("first_k_dense_replace", minimum=0)
    if n_dense < layers:
        argv += _moe_flags(fields, layers, n_dense)
    if fields.integer("num_nextn_predict_layers", 0, minimum=0):
        argv += ["--mtp-num-layers", config["num_nextn_predict_layers"]]
    return [str(item) for item in argv]


def _yarn_flags(rope_scaling, max_positions: int, source: str) -> list:
    if not isinstance(rope_scaling, dict):
        raise UnsupportedModelError(f"{source}: rope_scaling must be an object, got {rope_scaling!r}")
    fields = _ConfigFields(rope_scaling, source, "rope_scaling.")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    _refuse_unless(kind == "yarn", f"{source}: rope_scaling type {kind!r} (only yarn)")
    factor, mscale, mscale_all_dim = (
        fields.number("factor"),
        fields.number("mscale", 1.0),
        fields.number("mscale_all_dim", 0.0),
    )
    flags = ["--rope-type", "yarn", "--rotary-scaling-factor", factor,
             "--original-max-position-embeddings", fields.integer("original_max_position_embeddings", max_positions),
             "--beta-fast", fields.number("beta_fast", 32), "--beta-slow", fields.number("beta_slow", 1),
             "--mscale", mscale, "--mscale-all-dim", mscale_all_dim]  # fmt: skip
    if "attention_factor" in rope_scaling:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

        given = fields.number("attention_factor")
        _refuse_unless(factor > 0, f"{source}: rope_scaling.factor {factor} must be positive")
        ours = _yarn_get_concentration_factor(factor, mscale, mscale_all_dim)
        _refuse_unless(
            abs(ours - given) < 1e-6,
            f"{source}: rope_scaling.attention_factor {given} differs from megatron-core's yarn factor {ours}",
        )
    return flags


def _moe_flags(fields: _ConfigFields, layers: int, n_dense: int) -> list:
    source = fields.source
    experts, topk = fields.integer("n_routed_experts"), fields.integer("num_experts_per_tok")
    n_shared, expert_size = fields.integer("n_shared_experts", minimum=0), fields.integer("moe_intermediate_size")
    _refuse_unless(n_shared >= 1, f"{source}: n_shared_experts {n_shared} (our MoE layers take >= 1 shared expert)")
    _refuse_unless(
        bool(fields.get("norm_topk_prob", True)) == (topk > 1),
        f"{source}: norm_topk_prob "
        f"{fields.get('norm_topk_prob')} with num_experts_per_tok {topk}: megatron-core renormalises "
        "sigmoid routing weights exactly when top-k > 1",
    )
    groups, group_topk = fields.integer("n_group", 1), fields.integer("topk_group", 1)
    flags = ["--num-experts", experts, "--moe-ffn-hidden-size", expert_size,
             "--moe-shared-expert-intermediate-size", n_shared * expert_size,
             "--moe-layer-freq", f"[0]*{n_dense}+[1]*{layers - n_dense}", "--moe-router-topk", topk,
             "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
             "--moe-router-topk-scaling-factor", fields.number("routed_scaling_factor", 1.0)]  # fmt: skip
    if groups > 1:
        _refuse_unless(
            topk == 2 * group_topk,
            f"{source}: num_experts_per_tok {topk} with topk_group {group_topk}: "
            "megatron-core scores a group by its top topk/topk_group experts, DeepseekV3 by its top 2",
        )
        flags += ["--moe-router-num-groups", groups, "--moe-router-group-topk", group_topk]
    return flags


def fp8_block_size(config: dict, source: str) -> tuple[int, int] | None:
    """The weight block size of DeepSeek's FP8 format when `config` (config.json read from `source`)
    has a ``quantization_config``; None without one; UnsupportedModelError for another quantization."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    _refuse_unless(
        isinstance(quantization, dict), f"{source}: quantization_config must be an object, got {quantization!r}"
    )
    method, fmt = quantization.get("quant_method"), quantization.get("fmt")
    _refuse_unless(
        method == "fp8",
        f"{source}: quantization_config.quant_method {method!r}; only DeepSeek's 'fp8' block format is read",
    )
    _refuse_unless(fmt == "e4m3", f"{source}: quantization_config.fmt {fmt!r}; only 'e4m3' (float8_e4m3fn) is read")
    block = quantization.get("weight_block_size")
    _refuse_unless(
        isinstance(block, list) and len(block) == 2 and all(type(n) is int and n > 0 for n in block),
        f"{source}: quantization_config.weight_block_size must be two positive integers, got {block!r}",
    )
    return block[0], block[1]
