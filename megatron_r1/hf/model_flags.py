"""A Hugging Face ``config.json`` -> our model flags: the inverse of megatron_r1.hf.config's export, for
the architectures it writes (DeepseekV3, DeepseekV2, Qwen3-MoE, Mixtral, Qwen3, Llama), refusing a
setting that our model would compute differently, naming the file and the field.

A field missing from config.json takes the installed transformers' default for that model type, as
transformers itself would when it builds the model (DeepSeek-V3's routed_scaling_factor 2.5, Mixtral's
rope_theta 1e6, ...); a null counts as missing, except where null is a setting (q_lora_rank: no query
compression). transformers 5 writes RoPE's base and scaling as ``rope_parameters``, 4.x and the
published configs as ``rope_theta`` and ``rope_scaling``: both are read.
"""

import inspect
import math

from megatron_r1.hf.config import LLAMA3_ROPE_CONSTANTS, UnsupportedModelError

_REQUIRED = object()


def transformers_defaults(model_type: str) -> dict:
    """The installed transformers' defaults of its configuration class for `model_type` (None for a
    field without one)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    parameters = inspect.signature(config_class.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    if "rope_theta" not in defaults:  # 5.x: a class attribute, rope_parameters' default
        defaults["rope_theta"] = getattr(config_class, "default_theta", 10000.0)
    return defaults


class ConfigFields:
    """Typed reads of a ``config.json`` object: a missing or ill-typed field is an
    UnsupportedModelError naming the file and the field. A field that is missing (or null) takes
    `defaults`' value, where that is not None."""

    def __init__(self, config: dict, source: str, defaults: dict, prefix: str = ""):
        self.config, self.source, self.defaults, self.prefix = config, source, defaults, prefix

    def get(self, name: str):
        value = self.config.get(name)
        return self.defaults.get(name) if value is None else value

    def refuse_unless(self, condition: bool, message: str) -> None:
        if not condition:
            raise UnsupportedModelError(f"{self.source}: {message}")

    def _read(self, name: str, default, accepts, kind: str):
        value = self.config.get(name)
        if value is None:
            if default is _REQUIRED:
                default = self.defaults.get(name)
            if default is not None and default is not _REQUIRED:
                return default
            raise UnsupportedModelError(f"{self.source}: no {self.prefix}{name!r}")
        if isinstance(value, bool) or not accepts(value):
            raise UnsupportedModelError(f"{self.source}: {self.prefix}{name} must be {kind}, got {value!r}")
        return value

    def integer(self, name: str, default=_REQUIRED, minimum: int = 1) -> int:
        return self._read(name, default, lambda v: isinstance(v, int) and v >= minimum, f"an integer >= {minimum}")

    def number(self, name: str, default=_REQUIRED) -> float:
        return self._read(name, default, lambda v: isinstance(v, (int, float)) and math.isfinite(v), "a finite number")

    def optional_integer(self, name: str) -> int | None:
        """An integer, or None where config.json says null (missing: transformers' default)."""
        return None if name in self.config and self.config[name] is None else self.integer(name)

    def flag(self, name: str) -> bool:
        value = self.get(name)
        self.refuse_unless(isinstance(value, bool), f"{self.prefix}{name} must be true or false, got {value!r}")
        return value


def args_from_hf_config(config: dict, source: str) -> list[str]:
    """Our model flags for the Hugging Face ``config.json`` (dict) read from `source`."""
    model_type = config.get("model_type")
    if model_type not in _READERS:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r}; converted are {', '.join(repr(name) for name in _READERS)}"
        )
    fields = ConfigFields(config, source, transformers_defaults(model_type))
    return [str(item) for item in _READERS[model_type](fields, model_type)]


def _common_flags(fields: ConfigFields) -> list:
    """The flags of what every architecture here has: sizes, RMSNorm, SwiGLU without biases, RoPE."""
    fields.refuse_unless(fields.get("hidden_act") == "silu", f"hidden_act {fields.get('hidden_act')!r} (only silu)")
    fields.refuse_unless(not fields.get("attention_bias"), "attention_bias true (our attention has no biases)")
    fields.refuse_unless(not fields.get("mlp_bias"), "mlp_bias true (our MLPs have no biases)")
    max_positions = fields.integer("max_position_embeddings")
    argv = [
        "--num-layers", fields.integer("num_hidden_layers"), "--hidden-size", fields.integer("hidden_size"),
        "--num-attention-heads", fields.integer("num_attention_heads"),
        "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--norm-epsilon", fields.number("rms_norm_eps"),
        "--position-embedding-type", "rope", "--rotary-base", _rope_base(fields),
        "--max-position-embeddings", max_positions, "--seq-length", max_positions,
        "--init-method-std", fields.number("initializer_range", 0.02), "--vocab-size", fields.integer("vocab_size"),
    ]  # fmt: skip
    if not fields.flag("tie_word_embeddings"):
        argv.append("--untie-embeddings-and-output-weights")
    return argv


def _rope_parameters(fields: ConfigFields) -> tuple[ConfigFields, ConfigFields | None]:
    """``(the fields holding rope_theta, those of the RoPE scaling or None)``: transformers 5's
    rope_parameters, or rope_theta and rope_scaling."""
    parameters = fields.config.get("rope_parameters")
    if parameters is not None:
        fields.refuse_unless(isinstance(parameters, dict), f"rope_parameters must be an object, got {parameters!r}")
        rope = ConfigFields(parameters, fields.source, fields.defaults, "rope_parameters.")
        return rope, None if parameters.get("rope_type", "default") == "default" else rope
    scaling = fields.config.get("rope_scaling")
    fields.refuse_unless(
        scaling is None or isinstance(scaling, dict), f"rope_scaling must be an object, got {scaling!r}"
    )
    return fields, ConfigFields(scaling, fields.source, {}, "rope_scaling.") if scaling else None


def _rope_base(fields: ConfigFields) -> int:
    base = _rope_parameters(fields)[0].number("rope_theta")
    fields.refuse_unless(float(base) == int(base), f"rope_theta {base} is not an integer (--rotary-base)")
    return int(base)


def _deepseek_flags(fields: ConfigFields, model_type: str) -> list:
    """DeepseekV3 / DeepseekV2: MLA with the compressed q and kv normalised, RoPE on de-interleaved
    channels (as DeepSeek's complex rotation of adjacent pairs: the same attention scores), the first
    first_k_dense_replace layers dense, MoE after them."""
    layers, heads = fields.integer("num_hidden_layers"), fields.integer("num_attention_heads")
    fields.refuse_unless(
        fields.integer("num_key_value_heads", heads) == heads, "num_key_value_heads != num_attention_heads"
    )
    fields.refuse_unless(
        fields.get("rope_interleave") in (None, True),
        "rope_interleave false (megatron-core's MLA always de-interleaves the rotary channels)",
    )
    argv = _common_flags(fields) + [
        "--ffn-hidden-size", fields.integer("intermediate_size"), "--multi-latent-attention", "--qk-layernorm",
        "--kv-lora-rank", fields.integer("kv_lora_rank"), "--qk-head-dim", fields.integer("qk_nope_head_dim"),
        "--qk-pos-emb-head-dim", fields.integer("qk_rope_head_dim"), "--v-head-dim", fields.integer("v_head_dim"),
    ]  # fmt: skip
    q_lora_rank = fields.optional_integer("q_lora_rank")
    if q_lora_rank is not None:
        argv += ["--q-lora-rank", q_lora_rank]
    _, scaling = _rope_parameters(fields)
    if scaling is not None:
        argv += _yarn_flags(scaling, fields.integer("max_position_embeddings"))
    n_dense = fields.integer("first_k_dense_replace", minimum=0)
    if n_dense < layers:
        moe = _deepseek_v3_moe_flags if model_type == "deepseek_v3" else _deepseek_v2_moe_flags
        argv += _routed_experts_flags(fields, layers, n_dense) + moe(fields)
    if model_type == "deepseek_v3" and fields.integer("num_nextn_predict_layers", 0, minimum=0):
        argv += ["--mtp-num-layers", fields.config["num_nextn_predict_layers"]]
    return argv


def _yarn_flags(scaling: ConfigFields, max_positions: int) -> list:
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    kind = scaling.config.get("rope_type", scaling.config.get("type"))
    scaling.refuse_unless(kind == "yarn", f"{scaling.prefix}rope_type {kind!r} (only yarn)")
    factor, mscale, mscale_all_dim = (
        scaling.number("factor"), scaling.number("mscale", 1.0), scaling.number("mscale_all_dim", 0.0)
    )  # fmt: skip
    flags = ["--rope-type", "yarn", "--rotary-scaling-factor", factor,
             "--original-max-position-embeddings", scaling.integer("original_max_position_embeddings", max_positions),
             "--beta-fast", scaling.number("beta_fast", 32), "--beta-slow", scaling.number("beta_slow", 1),
             "--mscale", mscale, "--mscale-all-dim", mscale_all_dim]  # fmt: skip
    if scaling.config.get("attention_factor") is not None:
        given = scaling.number("attention_factor")
        scaling.refuse_unless(factor > 0, f"{scaling.prefix}factor {factor} must be positive")
        ours = _yarn_get_concentration_factor(factor, mscale, mscale_all_dim)
        scaling.refuse_unless(
            abs(ours - given) < 1e-6,
            f"{scaling.prefix}attention_factor {given} differs from megatron-core's yarn factor {ours}",
        )
    return flags


def _routed_experts_flags(fields: ConfigFields, layers: int, n_dense: int) -> list:
    """DeepSeek's experts: routed ones of moe_intermediate_size channels, and >= 1 shared one."""
    expert_size, n_shared = fields.integer("moe_intermediate_size"), fields.integer("n_shared_experts", minimum=0)
    fields.refuse_unless(n_shared >= 1, f"n_shared_experts {n_shared} (our MoE layers take >= 1 shared expert)")
    return ["--num-experts", fields.integer("n_routed_experts"), "--moe-ffn-hidden-size", expert_size,
            "--moe-shared-expert-intermediate-size", n_shared * expert_size,
            "--moe-layer-freq", f"[0]*{n_dense}+[1]*{layers - n_dense}",
            "--moe-router-topk", fields.integer("num_experts_per_tok")]  # fmt: skip


def _scaling_flags(fields: ConfigFields) -> list:
    """routed_scaling_factor as the routing weights' scale, where it scales them (not 1.0)."""
    scale = fields.number("routed_scaling_factor")
    return [] if scale == 1.0 else ["--moe-router-topk-scaling-factor", scale]


def _deepseek_v3_moe_flags(fields: ConfigFields) -> list:
    """sigmoid scores plus the expert bias choose; the chosen scores renormalised when top-k > 1."""
    topk = fields.integer("num_experts_per_tok")
    fields.refuse_unless(
        (fields.get("scoring_func") or "sigmoid") == "sigmoid", f"scoring_func {fields.get('scoring_func')!r}"
    )
    fields.refuse_unless(
        bool(fields.get("norm_topk_prob")) == (topk > 1),
        f"norm_topk_prob {fields.get('norm_topk_prob')} with num_experts_per_tok {topk}: megatron-core "
        "renormalises sigmoid routing weights exactly when top-k > 1",
    )
    flags = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", *_scaling_flags(fields)]
    groups = fields.integer("n_group")
    if groups > 1:
        group_topk = fields.integer("topk_group")
        fields.refuse_unless(
            topk == 2 * group_topk,
            f"num_experts_per_tok {topk} with topk_group {group_topk}: megatron-core scores a group by its "
            "top topk/topk_group experts, DeepseekV3 by its top 2",
        )
        flags += ["--moe-router-num-groups", groups, "--moe-router-group-topk", group_topk]
    return flags


def _deepseek_v2_moe_flags(fields: ConfigFields) -> list:
    """softmax over all experts, the top-k not renormalised (transformers' DeepseekV2 never does), times
    routed_scaling_factor; greedy, or group-limited with groups scored by their best expert."""
    topk = fields.integer("num_experts_per_tok")
    fields.refuse_unless(
        (fields.get("scoring_func") or "softmax") == "softmax", f"scoring_func {fields.get('scoring_func')!r}"
    )
    fields.refuse_unless(
        not fields.get("norm_topk_prob"),
        "norm_topk_prob true: transformers' DeepseekV2 ignores it and DeepSeek's code renormalises the top-k "
        "weights; the two compute different models",
    )
    fields.refuse_unless(
        fields.get("moe_layer_freq") in (None, 1), f"moe_layer_freq {fields.get('moe_layer_freq')!r} (only 1)"
    )
    flags = ["--moe-router-score-function", "softmax", "--moe-router-pre-softmax", *_scaling_flags(fields)]
    method = fields.get("topk_method")
    if method == "greedy":
        return flags
    fields.refuse_unless(
        method == "group_limited_greedy", f"topk_method {method!r} (DeepseekV2: greedy or group_limited_greedy)"
    )
    groups, group_topk = fields.integer("n_group"), fields.integer("topk_group")
    fields.refuse_unless(
        topk // group_topk == 1,
        f"num_experts_per_tok {topk} with topk_group {group_topk}: DeepseekV2 scores a group by its best "
        "expert, megatron-core by its top topk/topk_group (they agree only when topk < 2 x topk_group)",
    )
    return flags + ["--moe-router-num-groups", groups, "--moe-router-group-topk", group_topk]


def _gqa_flags(fields: ConfigFields, model_type: str) -> list:
    """Qwen3-MoE, Mixtral, Qwen3, Llama: GQA with RoPE over each head's channels (de-interleaved halves,
    as megatron-core's), q/k RMS norms for the Qwen3 ones, no sliding window."""
    hidden, heads = fields.integer("hidden_size"), fields.integer("num_attention_heads")
    # transformers' defaults where it has them, else (None) what its attention takes: MHA, hidden / heads.
    query_groups = fields.integer("num_key_value_heads", fields.defaults.get("num_key_value_heads") or heads)
    head_dim = fields.integer("head_dim", fields.defaults.get("head_dim") or hidden // heads)
    _, scaling = _rope_parameters(fields)
    if model_type == "mixtral":
        fields.refuse_unless(fields.get("sliding_window") is None, "sliding_window: we convert without sliding windows")
    fields.refuse_unless(not fields.get("use_sliding_window"), "use_sliding_window: we convert without sliding windows")
    argv = _common_flags(fields) + (_llama3_flags(scaling) if scaling else [])
    if query_groups != heads:
        argv += ["--group-query-attention", "--num-query-groups", query_groups]
    if head_dim != hidden // heads:
        argv += ["--kv-channels", head_dim]
    if model_type in ("qwen3", "qwen3_moe"):
        argv.append("--qk-layernorm")
    if model_type == "mixtral":  # every layer MoE: intermediate_size is the experts'
        expert_size = fields.integer("intermediate_size")
        return argv + ["--moe-ffn-hidden-size", expert_size,
                       "--num-experts", fields.integer("num_local_experts"),
                       "--moe-router-topk", fields.integer("num_experts_per_tok"), "--moe-router-score-function", "softmax"]  # fmt: skip
    argv += ["--ffn-hidden-size", fields.integer("intermediate_size")]
    return argv + (_qwen3_moe_flags(fields) if model_type == "qwen3_moe" else [])


def _llama3_flags(scaling: ConfigFields) -> list:
    """Llama 3.1's RoPE scaling (transformers' llama3 type), where its constants are megatron-core's."""
    kind = scaling.config.get("rope_type", scaling.config.get("type"))
    scaling.refuse_unless(
        kind == "llama3",
        f"{scaling.prefix}rope_type {kind!r}: Qwen3, Mixtral and Llama models convert with plain RoPE or llama3's",
    )
    for name, value in LLAMA3_ROPE_CONSTANTS.items():
        given = scaling.number(name)
        scaling.refuse_unless(
            given == value,
            f"{scaling.prefix}{name} {given}: megatron-core's Llama 3 RoPE scaling fixes it at {value:g}",
        )
    return ["--use-rope-scaling", "--rope-scaling-factor", scaling.number("factor")]


def _qwen3_moe_flags(fields: ConfigFields) -> list:
    """Qwen3-MoE's layer pattern (MoE every decoder_sparse_step-th layer, not in mlp_only_layers) and
    routing: softmax over all experts, the top-k renormalised when norm_topk_prob (megatron-core:
    softmax over the top-k logits), else not (--moe-router-pre-softmax)."""
    layers, step = fields.integer("num_hidden_layers"), fields.integer("decoder_sparse_step", 1)
    dense = fields.get("mlp_only_layers") or []
    fields.refuse_unless(
        isinstance(dense, list) and all(type(i) is int for i in dense),
        f"mlp_only_layers must be a list of layer numbers, got {dense!r}",
    )
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    fields.refuse_unless(any(pattern), "no MoE layer (mlp_only_layers, decoder_sparse_step)")
    flags = ["--num-experts", fields.integer("num_experts"), "--moe-ffn-hidden-size", fields.integer("moe_intermediate_size"),
             "--moe-router-topk", fields.integer("num_experts_per_tok"), "--moe-router-score-function", "softmax",
             "--moe-layer-freq", str(pattern).replace(" ", "")]  # fmt: skip
    return flags if fields.flag("norm_topk_prob") else flags + ["--moe-router-pre-softmax"]


_READERS = {
    "deepseek_v3": _deepseek_flags,
    "deepseek_v2": _deepseek_flags,
    "qwen3_moe": _gqa_flags,
    "mixtral": _gqa_flags,
    "qwen3": _gqa_flags,
    "llama": _gqa_flags,
}


def fp8_block_size(config: dict, source: str) -> tuple[int, int] | None:
    """The weight block size of DeepSeek's FP8 format when `config` (config.json read from `source`)
    has a ``quantization_config``; None without one; UnsupportedModelError for another quantization."""
    fields = ConfigFields(config, source, {})
    quantization = config.get("quantization_config")
    if quantization is None:
        return None
    fields.refuse_unless(isinstance(quantization, dict), f"quantization_config must be an object, got {quantization!r}")
    method, fmt = quantization.get("quant_method"), quantization.get("fmt")
    fields.refuse_unless(
        method == "fp8", f"quantization_config.quant_method {method!r}; only DeepSeek's 'fp8' block format is read"
    )
    fields.refuse_unless(fmt == "e4m3", f"quantization_config.fmt {fmt!r}; only 'e4m3' (float8_e4m3fn) is read")
    block = quantization.get("weight_block_size")
    fields.refuse_unless(
        isinstance(block, list) and len(block) == 2 and all(type(n) is int and n > 0 for n in block),
        f"quantization_config.weight_block_size must be two positive integers, got {block!r}",
    )
    return block[0], block[1]
