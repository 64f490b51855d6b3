"""config.json -> our model flags (megatron_r1.hf.model_flags): what we export reads back to a model that
exports the same config.json; a field left out takes the installed transformers' default, as
transformers itself reads it; transformers 5's rope_parameters read as rope_theta/rope_scaling; and a
setting our model would compute otherwise is refused naming the field."""

import pytest
from conftest import preset_model_flags

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.checkpointing import MODEL_FUNCTION_ARGS, MODEL_SHAPE_ARGS
from megatron_r1.flops import moe_layer_pattern
from megatron_r1.hf.config import UnsupportedModelError, export_fields
from megatron_r1.hf.model_flags import args_from_hf_config

COMMON = ["--vocab-size", "100", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu",
          "--disable-bias-linear", "--seq-length", "32", "--untie-embeddings-and-output-weights"]  # fmt: skip
MLA = ["--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank", "16", "--qk-head-dim", "8",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "8", "--moe-ffn-hidden-size", "16",
       "--moe-shared-expert-intermediate-size", "16", "--moe-layer-freq", "[0]*1+[1]*3"]  # fmt: skip
MODELS = {
    "deepseek_v3": [*MLA, "--q-lora-rank", "16", "--moe-router-score-function", "sigmoid",
                    "--moe-router-enable-expert-bias", "--moe-router-topk", "4", "--moe-router-num-groups", "4",
                    "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "2.5", "--mtp-num-layers", "1",
                    "--rope-type", "yarn", "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "8",
                    "--mscale", "1.0", "--mscale-all-dim", "1.0"],
    "deepseek_v2": [*MLA, "--moe-router-score-function", "softmax", "--moe-router-pre-softmax", "--moe-router-topk",
                    "2", "--moe-router-topk-scaling-factor", "16"],
    "qwen3_moe": ["--qk-layernorm", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
                  "--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-router-topk", "2",
                  "--moe-layer-freq", "[0,1,0,1]"],
    "mixtral": ["--group-query-attention", "--num-query-groups", "1", "--num-experts", "4", "--moe-ffn-hidden-size",
                "16", "--moe-router-topk", "2", "--rotary-base", "1000000"],
    "qwen3": ["--qk-layernorm", "--kv-channels", "12"],
    "llama": ["--rotary-base", "500000", "--norm-epsilon", "1e-5", "--use-rope-scaling", "--rope-scaling-factor", "32"],
}  # fmt: skip


# The published config.json files (their model fields; auto_map, torch_dtype and the like left out).
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "attention_bias": False, "first_k_dense_replace": 3, "hidden_act": "silu",
               "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
               "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
               "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
               "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
               "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
               "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
               "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4,
               "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280}  # fmt: skip
DEEPSEEK_V2_LITE = {"model_type": "deepseek_v2", "attention_bias": False, "first_k_dense_replace": 1, "hidden_act": "silu",
                    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
                    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
                    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
                    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
                    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                    "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
                    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False, "topk_group": 1,
                    "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400}  # fmt: skip


def _validated(argv):
    args = build_parser("").parse_args([*argv, "--mock-data", "--micro-batch-size", "1"])
    validate_args(args, lambda message: pytest.fail(message))
    return args


@pytest.mark.parametrize("config, script", [(DEEPSEEK_V3, "pretrain_deepseek_v3.sh"),
                                            (DEEPSEEK_V2_LITE, "pretrain_deepseek_v2_lite.sh")])  # fmt: skip
def test_the_published_configs_give_the_presets_model(config, script):
    """The DeepSeek presets are the published models: the same model flags as DeepSeek's config.json
    (the presets' own context length and initialisation aside)."""
    imported = _validated(args_from_hf_config(config, "config.json"))
    preset = _validated([*preset_model_flags(script), "--vocab-size", str(config["vocab_size"])])
    own = {"seq_length", "max_position_embeddings", "init_method_std", "moe_layer_freq", "moe_router_dtype"}
    names = [name for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS if name not in own]
    assert {name: getattr(imported, name) for name in names} == {name: getattr(preset, name) for name in names}
    assert moe_layer_pattern(imported) == moe_layer_pattern(preset)


def _args(argv):
    args = build_parser("").parse_args(argv)
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.virtual_pipeline_model_parallel_size = None
    return args


def _exported(model_type: str) -> dict:
    return export_fields(_args([*COMMON, *MODELS[model_type]]), 100)


@pytest.mark.parametrize("model_type", list(MODELS))
def test_what_we_export_reads_back_to_a_model_that_exports_the_same_config(model_type):
    config = _exported(model_type)
    assert config["model_type"] == model_type
    assert export_fields(_args(args_from_hf_config(config, "config.json")), 100) == config


def test_missing_fields_take_transformers_defaults():
    v3 = {name: value for name, value in _exported("deepseek_v3").items() if name != "routed_scaling_factor"}
    flags = args_from_hf_config(v3, "config.json")
    assert flags[flags.index("--moe-router-topk-scaling-factor") + 1] == "2.5"  # DeepseekV3Config's default
    no_groups = {name: value for name, value in v3.items() if name not in ("n_group", "topk_group")}
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok 4 with topk_group 4"):  # 8 groups, 4 chosen
        args_from_hf_config(no_groups, "config.json")
    mixtral = {
        name: value for name, value in _exported("mixtral").items() if name not in ("rope_theta", "rms_norm_eps")
    }
    flags = args_from_hf_config(mixtral, "config.json")
    assert flags[flags.index("--rotary-base") + 1] == "1000000" and flags[flags.index("--norm-epsilon") + 1] == "1e-05"
    v2 = _exported("deepseek_v2")
    assert "--q-lora-rank" not in args_from_hf_config(v2, "config.json")  # null: no query compression
    assert "1536" in args_from_hf_config({k: v for k, v in v2.items() if k != "q_lora_rank"}, "config.json")


def test_transformers_5_rope_parameters_read_as_rope_theta_and_scaling():
    for model_type in ("deepseek_v3", "llama"):
        config = _exported(model_type)
        theta, scaling = config.pop("rope_theta"), config.pop("rope_scaling")
        config["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
        assert args_from_hf_config(config, "config.json") == args_from_hf_config(_exported(model_type), "config.json")


def test_qwen3_moe_layer_pattern_comes_from_decoder_sparse_step_and_mlp_only_layers():
    config = {**_exported("qwen3_moe"), "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    flags = args_from_hf_config(config, "config.json")
    assert flags[flags.index("--moe-layer-freq") + 1] == "[0,1,0,0]"


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}  # fmt: skip
REFUSED = [
    (
        "llama",
        {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
        "rope_scaling.rope_type 'linear': Qwen3, Mixtral",
    ),
    ("llama", {"rope_scaling": {**LLAMA3, "low_freq_factor": 2}}, "rope_scaling.low_freq_factor 2: megatron-core's"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("llama", {"attention_bias": True}, "attention_bias true"),
    ("qwen3_moe", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("qwen3_moe", {"mlp_only_layers": [0, 1, 2, 3]}, "no MoE layer"),
    ("qwen3_moe", {"mlp_only_layers": "0"}, "mlp_only_layers must be a list"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads != num_attention_heads"),
    ("deepseek_v3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
    ("qwen2_moe", {}, "model_type 'qwen2_moe'; converted are 'deepseek_v3'"),
]


@pytest.mark.parametrize("model_type, changes, message", REFUSED)
def test_settings_our_model_computes_otherwise_are_refused_naming_the_field(model_type, changes, message):
    config = {**_exported("qwen3_moe" if model_type == "qwen2_moe" else model_type), **changes}
    config["model_type"] = model_type
    with pytest.raises(UnsupportedModelError, match=f"^config.json: {message}"):
        args_from_hf_config(config, "config.json")
