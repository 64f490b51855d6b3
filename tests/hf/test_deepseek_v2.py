"""DeepSeek-V2 / V2-Lite both ways: an MLA model with softmax routing (no query compression,
group-limited routing where groups are scored by their best expert, a routing scale) exports as
DeepseekV2ForCausalLM with transformers' logits, imports back bit-exactly, and the V2 settings that
megatron-core would compute otherwise are refused by name in either direction."""

import json
import sys
from pathlib import Path

import pytest
from conftest import assert_round_trip_weights, run_command

from megatron_r1.arguments import build_parser
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.hf.config import UnsupportedModelError, export_fields
from megatron_r1.hf.model_flags import args_from_hf_config

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
# 8 experts in 4 groups of 2: the 2 groups with the best experts, then the top 3 of their 4 experts.
V2 = ["--mock-data", "--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
      "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
      "--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank", "16", "--qk-head-dim", "8",
      "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "8", "--moe-ffn-hidden-size", "16",
      "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "3",
      "--moe-router-score-function", "softmax", "--moe-router-pre-softmax", "--moe-router-num-groups", "4",
      "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "16", "--untie-embeddings-and-output-weights",
      "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip


@pytest.fixture
def process_group():
    initialize_distributed()
    yield
    destroy_distributed()


def _convert(workdir: Path, *flags: str) -> dict:
    output = run_command([sys.executable, str(TOOL), *flags, "--verify", "--no-progress"], workdir).stdout
    return json.loads(output[output.index("{") : output.rindex("}") + 1])


def test_v2_exports_with_transformers_logits_and_imports_back_bit_exactly(tmp_path, process_group):
    run_command([sys.executable, str(REPO / "pretrain_r1.py"), *V2, "--train-iters", "3", "--save", "ckpt"], tmp_path)
    exported = _convert(tmp_path, "--direction", "mcore2hf", "--load", "ckpt", "--save", "hf")
    assert exported["verify"]["max_abs_logit_diff"] <= 1e-4 and exported["verify"]["top1_agreement"] == 1.0, exported
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForCausalLM"] and config["q_lora_rank"] is None
    routing = ("topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "scoring_func")
    assert [config[name] for name in routing] == ["group_limited_greedy", 4, 2, False, 16.0, "softmax"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight" in index
    assert not any("e_score_correction_bias" in name for name in index)  # V2's gate has no expert bias

    imported = _convert(tmp_path, "--direction", "hf2mcore", "--load", "hf", "--save", "back",
                        "--make-vocab-size-divisible-by", "64")  # fmt: skip
    assert imported["verify"]["max_abs_logit_diff"] <= 1e-4, imported
    assert_round_trip_weights(tmp_path / "ckpt" / "iter_0000003", tmp_path / "back" / "iter_0000000", 100)


def _args(*flags):
    args = build_parser("").parse_args([*V2, *flags])
    args.max_position_embeddings, args.virtual_pipeline_model_parallel_size = args.seq_length, None
    return args


def test_v2_settings_megatron_core_computes_otherwise_are_refused_by_name():
    export = {
        ("--moe-router-pre-softmax",): "without --moe-router-pre-softmax renormalises",
        ("--moe-router-topk", "4"): "--moe-router-topk 4 with --moe-router-group-topk 2: DeepseekV2 scores a group",
        ("--mtp-num-layers", "1"): "--mtp-num-layers 1: DeepseekV2",
    }
    for flags, message in export.items():
        args = _args(*flags)
        if flags == ("--moe-router-pre-softmax",):
            args.moe_router_pre_softmax = False
        with pytest.raises(UnsupportedModelError, match=message):
            export_fields(args, 100)
    config = export_fields(_args(), 100)
    assert args_from_hf_config(config, "config.json")  # what we export imports
    refused = {
        ("norm_topk_prob", True): "norm_topk_prob true: transformers' DeepseekV2 ignores it",
        ("topk_method", "noaux_tc"): "topk_method 'noaux_tc'",
        ("num_experts_per_tok", 4): "num_experts_per_tok 4 with topk_group 2: DeepseekV2 scores a group by its best",
        ("scoring_func", "sigmoid"): "scoring_func 'sigmoid'",
        ("n_shared_experts", 0): "n_shared_experts 0",
        ("moe_layer_freq", 2): "moe_layer_freq 2",
    }
    for (name, value), message in refused.items():
        with pytest.raises(UnsupportedModelError, match=f"^config.json: {message}"):
            args_from_hf_config({**config, name: value}, "config.json")
