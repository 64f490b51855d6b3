"""Our model flags <-> a Hugging Face ``DeepseekV3Config``, refusing what one side cannot represent.

transformers 4.57's ``DeepseekV3ForCausalLM`` fixes a few choices that our flags leave open, so a
model maps onto it exactly only when it makes the same ones:

- MLA with RMS norms on the compressed q and kv (``--qk-layernorm``), SwiGLU MLPs without biases, RoPE;
- routing ``sigmoid(logits) + e_score_correction_bias`` for the choice, weights renormalised over the
  top-k (megatron-core does so whenever top-k > 1) times ``routed_scaling_factor``; group-limited routing
  scores a group by the sum of its top *2* experts (megatron-core: its top ``topk / group_topk``);
- the first ``first_k_dense_replace`` layers dense, all later ones MoE, each with shared experts of
  ``n_shared_experts * moe_intermediate_size`` channels;
- RoPE applied to de-interleaved channels (``rope_interleave``), as megatron-core's MLA always does.

GQA models (no ``--multi-latent-attention``) are refused: none of the standard architectures matches
them in every respect our flags allow, and a near match would load and silently compute something else.
"""

import argparse
import json
import os

from megatron_r1.arguments import build_parser, transformer_config_from_args
from megatron_r1.checkpointing import (
    METADATA_FILE,
    MODEL_ARGS_WITH_OLD_DEFAULTS,
    MODEL_FUNCTION_ARGS,
    MODEL_SHAPE_ARGS,
    CheckpointError,
    find_checkpoint,
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
        raise CheckpointError(f"{path}: neither a checkpoint directory (no {METADATA_FILE}) nor a --save root "
                              "(no latest_checkpointed_iteration.txt)")  # fmt: skip
    return found


def checkpoint_args(path: str) -> argparse.Namespace:
    """The flags of the model saved in checkpoint directory `path` (parser defaults for the rest),
    laid out for one process."""
    metadata_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(metadata_path):
        raise CheckpointError(f"{path} has no {METADATA_FILE}: not a megatron-r1 checkpoint, or an incomplete one")
    with open(metadata_path) as f:
        saved = json.load(f)["model_args"]
    missing = [name for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS
               if name not in saved and name not in MODEL_ARGS_WITH_OLD_DEFAULTS]  # fmt: skip
    if missing:
        raise CheckpointError(f"{metadata_path} lacks the model flags {', '.join(missing)} (saved by an older "
                              "version): load it with pretrain_r1.py --finetune and the original flags, and save again")  # fmt: skip
    args = build_parser("").parse_args([])
    vars(args).update(saved)
    args.world_size = 1
    args.virtual_pipeline_model_parallel_size = None
    return args


def first_dense_layers(args) -> int:
    """DeepSeek-V3's first_k_dense_replace; UnsupportedModelError unless the dense layers lead."""
    pattern = moe_layer_pattern(args)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if any(flag == 0 for flag in pattern[k:]):
        raise UnsupportedModelError(f"--moe-layer-freq {pattern}: DeepseekV3 needs the dense layers first and only MoE "
                                    "layers after them (first_k_dense_replace)")  # fmt: skip
    return k


def _refuse_unless(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)


def deepseek_v3_config(args, vocab_size: int, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """The ``transformers.DeepseekV3Config`` of the model that `args` describes (UnsupportedModelError
    naming the flag when transformers' model would compute something else)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor
    from transformers import DeepseekV3Config

    _refuse_unless(args.multi_latent_attention, "GQA models (no --multi-latent-attention) have no exact Hugging Face "
                   "architecture here: DeepseekV3ForCausalLM needs MLA, and no standard GQA MoE architecture matches our "
                   "flags in every respect (shared experts, dense layers, expert bias, routing)")  # fmt: skip
    _refuse_unless(args.normalization == "RMSNorm", "--normalization LayerNorm: DeepseekV3 uses RMSNorm")
    _refuse_unless(args.swiglu, "DeepseekV3's MLPs are SwiGLU: the model needs --swiglu")
    _refuse_unless(args.disable_bias_linear, "DeepseekV3's linear layers have no biases: the model needs --disable-bias-linear")
    _refuse_unless(args.qk_layernorm, "DeepseekV3 normalises the compressed q and kv (q_a_layernorm, kv_a_layernorm): "
                   "the model needs --qk-layernorm")  # fmt: skip
    _refuse_unless(args.position_embedding_type == "rope", f"--position-embedding-type {args.position_embedding_type}: "
                   "DeepseekV3 uses RoPE")  # fmt: skip
    _refuse_unless(args.window_size is None, "--window-size: DeepseekV3 has no sliding-window attention")
    config = transformer_config_from_args(args)
    rope_scaling = None
    if args.rope_type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": args.rotary_scaling_factor,
            "original_max_position_embeddings": config.original_max_position_embeddings,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            "mscale": args.mscale,
            "mscale_all_dim": args.mscale_all_dim,
            # megatron-core's cos/sin scale, stated so that transformers does not re-derive it differently.
            "attention_factor": _yarn_get_concentration_factor(args.rotary_scaling_factor, args.mscale, args.mscale_all_dim),
        }
    else:
        _refuse_unless(args.rotary_scaling_factor <= 1 or not args.mscale_all_dim,
                       "--rope-type rope with --rotary-scaling-factor > 1 and --mscale-all-dim scales the attention "
                       "softmax, which DeepseekV3 does only with yarn RoPE")  # fmt: skip
    n_dense = first_dense_layers(args)
    moe = {}
    if args.num_experts:
        _refuse_unless(args.moe_router_score_function == "sigmoid", "--moe-router-score-function softmax: DeepseekV3 "
                       "routes with sigmoid scores (topk_method noaux_tc)")  # fmt: skip
        shared = args.moe_shared_expert_intermediate_size
        expert_size = config.moe_ffn_hidden_size
        _refuse_unless(bool(shared) and shared % expert_size == 0, f"--moe-shared-expert-intermediate-size {shared}: "
                       f"DeepseekV3 has n_shared_experts >= 1 shared experts of --moe-ffn-hidden-size ({expert_size}) channels")  # fmt: skip
        groups, group_topk = args.moe_router_num_groups or 1, args.moe_router_group_topk or 1
        if groups > 1:
            _refuse_unless(args.moe_router_topk == 2 * group_topk, f"--moe-router-topk {args.moe_router_topk} with "
                           f"--moe-router-group-topk {group_topk}: DeepseekV3 scores a group by its top 2 experts, "
                           "megatron-core by its top topk/group_topk; they agree only when topk = 2 x group_topk")  # fmt: skip
        else:
            _refuse_unless(args.num_experts >= 2, "DeepseekV3 needs at least 2 routed experts")
        moe = dict(
            n_routed_experts=args.num_experts,
            moe_intermediate_size=expert_size,
            n_shared_experts=shared // expert_size,
            num_experts_per_tok=args.moe_router_topk,
            n_group=groups,
            topk_group=group_topk if groups > 1 else 1,
            norm_topk_prob=args.moe_router_topk > 1,
            routed_scaling_factor=args.moe_router_topk_scaling_factor or 1.0,
        )
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        qk_nope_head_dim=args.qk_head_dim,
        v_head_dim=args.v_head_dim,
        first_k_dense_replace=n_dense,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.init_method_std,
        rms_norm_eps=args.norm_epsilon,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        rope_theta=float(args.rotary_base),
        rope_scaling=rope_scaling,
        rope_interleave=True,
        attention_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        # Read by DeepSeek's own modelling code and by vLLM; transformers keeps them as attributes.
        num_nextn_predict_layers=args.mtp_num_layers or 0,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        architectures=["DeepseekV3ForCausalLM"],
        torch_dtype="float32",
        **moe,
    )


def args_from_deepseek_v3(config: dict, source: str) -> list[str]:
    """Our model flags for a Hugging Face ``config.json`` (dict) read from `source`."""
    def need(name):
        if name not in config:
            raise UnsupportedModelError(f"{source}: no {name!r}")
        return config[name]

    model_type = config.get("model_type")
    _refuse_unless(model_type == "deepseek_v3", f"{source}: model_type {model_type!r}; only 'deepseek_v3' (DeepseekV3ForCausalLM) converts")
    _refuse_unless(config.get("hidden_act", "silu") == "silu", f"{source}: hidden_act {config.get('hidden_act')!r} (only silu)")
    _refuse_unless(not config.get("attention_bias", False), f"{source}: attention_bias true (our MLA has no biases)")
    _refuse_unless(config.get("rope_interleave", True), f"{source}: rope_interleave false (megatron-core's MLA "
                   "always de-interleaves the rotary channels)")  # fmt: skip
    _refuse_unless(config.get("scoring_func", "sigmoid") == "sigmoid", f"{source}: scoring_func {config.get('scoring_func')!r}")
    layers, heads = need("num_hidden_layers"), need("num_attention_heads")
    _refuse_unless(config.get("num_key_value_heads", heads) == heads, f"{source}: num_key_value_heads != num_attention_heads")
    argv = [
        "--num-layers", layers, "--hidden-size", need("hidden_size"), "--ffn-hidden-size", need("intermediate_size"),
        "--num-attention-heads", heads, "--multi-latent-attention", "--qk-layernorm",
        "--kv-lora-rank", need("kv_lora_rank"), "--qk-head-dim", need("qk_nope_head_dim"),
        "--qk-pos-emb-head-dim", need("qk_rope_head_dim"), "--v-head-dim", need("v_head_dim"),
        "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--norm-epsilon", config.get("rms_norm_eps", 1e-6),
        "--position-embedding-type", "rope", "--rotary-base", int(config.get("rope_theta", 10000)),
        "--max-position-embeddings", need("max_position_embeddings"), "--seq-length", need("max_position_embeddings"),
        "--init-method-std", config.get("initializer_range", 0.02), "--vocab-size", need("vocab_size"),
    ]  # fmt: skip
    if float(config.get("rope_theta", 10000)) != int(config.get("rope_theta", 10000)):
        raise UnsupportedModelError(f"{source}: rope_theta {config['rope_theta']} is not an integer (--rotary-base)")
    if config.get("q_lora_rank") is not None:
        argv += ["--q-lora-rank", config["q_lora_rank"]]
    if not config.get("tie_word_embeddings", False):
        argv.append("--untie-embeddings-and-output-weights")
    rope_scaling = config.get("rope_scaling")
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        _refuse_unless(kind == "yarn", f"{source}: rope_scaling type {kind!r} (only yarn)")
        argv += ["--rope-type", "yarn", "--rotary-scaling-factor", rope_scaling["factor"],
                 "--original-max-position-embeddings", rope_scaling.get("original_max_position_embeddings") or config["max_position_embeddings"],
                 "--beta-fast", rope_scaling.get("beta_fast", 32), "--beta-slow", rope_scaling.get("beta_slow", 1),
                 "--mscale", rope_scaling.get("mscale", 1.0), "--mscale-all-dim", rope_scaling.get("mscale_all_dim", 0.0)]  # fmt: skip
        if "attention_factor" in rope_scaling:
            from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

            ours = _yarn_get_concentration_factor(rope_scaling["factor"], rope_scaling.get("mscale", 1.0),
                                                  rope_scaling.get("mscale_all_dim", 0.0))  # fmt: skip
            _refuse_unless(abs(ours - rope_scaling["attention_factor"]) < 1e-6, f"{source}: rope_scaling.attention_factor "
                           f"{rope_scaling['attention_factor']} differs from megatron-core's yarn factor {ours}")  # fmt: skip
    n_dense = need("first_k_dense_replace")
    if n_dense < layers:
        experts, topk = need("n_routed_experts"), need("num_experts_per_tok")
        n_shared, expert_size = need("n_shared_experts"), need("moe_intermediate_size")
        _refuse_unless(n_shared >= 1, f"{source}: n_shared_experts {n_shared} (our MoE layers take >= 1 shared expert)")
        _refuse_unless(bool(config.get("norm_topk_prob", True)) == (topk > 1), f"{source}: norm_topk_prob "
                       f"{config.get('norm_topk_prob')} with num_experts_per_tok {topk}: megatron-core renormalises "
                       "sigmoid routing weights exactly when top-k > 1")  # fmt: skip
        groups, group_topk = config.get("n_group") or 1, config.get("topk_group") or 1
        argv += ["--num-experts", experts, "--moe-ffn-hidden-size", expert_size,
                 "--moe-shared-expert-intermediate-size", n_shared * expert_size,
                 "--moe-layer-freq", f"[0]*{n_dense}+[1]*{layers - n_dense}", "--moe-router-topk", topk,
                 "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                 "--moe-router-topk-scaling-factor", config.get("routed_scaling_factor", 1.0)]  # fmt: skip
        if groups > 1:
            _refuse_unless(topk == 2 * group_topk, f"{source}: num_experts_per_tok {topk} with topk_group {group_topk}: "
                           "megatron-core scores a group by its top topk/topk_group experts, DeepseekV3 by its top 2")  # fmt: skip
            argv += ["--moe-router-num-groups", groups, "--moe-router-group-topk", group_topk]
    if config.get("num_nextn_predict_layers"):
        argv += ["--mtp-num-layers", config["num_nextn_predict_layers"]]
    return [str(item) for item in argv]
