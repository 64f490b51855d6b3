"""GQA/MHA models (no MLA) both ways: the checkpoint's flags choose the standard architecture that
computes the model exactly (Qwen3-MoE, Mixtral, Qwen3, Llama), tools/convert_checkpoint.py --verify
gives transformers' logits, the directory imports back (hf2mcore) to the same flags and weights, and
flags or config.json fields that none of them represents are refused by name. Qwen3-MoE and Mixtral are
also exported under both transformers versions in test_transformers_versions.py."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_round_trip_weights, run_command

from megatron_r1.arguments import build_parser
from megatron_r1.checkpointing import MODEL_FUNCTION_ARGS, MODEL_SHAPE_ARGS
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.flops import moe_layer_pattern
from megatron_r1.hf.config import UnsupportedModelError, checkpoint_args, export_fields
from megatron_r1.hf.export import export_to_hf
from megatron_r1.hf.keys import TensorMap

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--mock-data", "--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
          "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear", "--seq-length", "32",
          "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip
MODELS = {
    # Dense with q/k norms, one query group (MQA), heads of 12 channels.
    "Qwen3ForCausalLM": ["--qk-layernorm", "--group-query-attention", "--num-query-groups", "1", "--kv-channels", "12"],
    # Dense MHA, untied output, another RoPE base, Llama 3.1's RoPE scaling.
    "LlamaForCausalLM": ["--rotary-base", "500000", "--untie-embeddings-and-output-weights", "--use-rope-scaling"],
    # A dense first layer (mlp_only_layers), top-1 of the softmax over all experts, not renormalised
    # (norm_topk_prob false).
    "Qwen3MoeForCausalLM": ["--qk-layernorm", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
                            "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-layer-freq", "[0,1]"],
    # MoE in every layer, the top 2 renormalised, GQA, another RoPE base.
    "MixtralForCausalLM": ["--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-router-topk", "2",
                           "--group-query-attention", "--num-query-groups", "2", "--rotary-base", "1000000"],
}  # fmt: skip
PUBLISHED = {
    "Qwen3ForCausalLM": ["model.layers.1.self_attn.k_norm.weight", "model.layers.1.mlp.up_proj.weight"],
    "LlamaForCausalLM": ["model.layers.1.self_attn.v_proj.weight", "lm_head.weight"],
    "Qwen3MoeForCausalLM": ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight"],
    "MixtralForCausalLM": ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"],
}  # fmt: skip


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """(working directory, architecture, tools/convert_checkpoint.py's summary) of a trained
    checkpoint of COMMON + MODELS[architecture] exported with --verify into hf/."""
    workdir = tmp_path_factory.mktemp(request.param)
    command = [sys.executable, str(REPO / "pretrain_r1.py"), *COMMON, *MODELS[request.param]]
    run_command([*command, "--train-iters", "3", "--save", "ckpt"], workdir, timeout=300)
    return workdir, request.param, _convert(workdir, "--direction", "mcore2hf", "--load", "ckpt", "--save", "hf")


def _convert(workdir: Path, *flags: str) -> dict:
    """tools/convert_checkpoint.py `flags` --verify: its summary and the model flags it prints."""
    command = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *flags, "--verify", "--no-progress"]
    output = run_command(command, workdir).stdout
    summary = json.loads(output[output.index("{") : output.rindex("}") + 1])
    assert summary["verify"]["max_abs_logit_diff"] <= 1e-4 and summary["verify"]["top1_agreement"] == 1.0, summary
    return {**summary, "printed": output[output.rindex("}") + 1 :]}


def test_the_flags_choose_the_architecture_and_verify_gives_its_logits(exported):
    workdir, architecture, summary = exported
    assert summary["verify"]["max_abs_logit_diff"] <= 1e-4 and summary["verify"]["top1_agreement"] == 1.0, summary
    config = json.loads((workdir / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["vocab_size"] == 100
    index = json.loads((workdir / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(name in index for name in PUBLISHED[architecture]), sorted(index)
    if architecture == "Qwen3ForCausalLM":
        assert (config["num_key_value_heads"], config["head_dim"]) == (1, 12)
    if architecture == "Qwen3MoeForCausalLM":
        assert (config["norm_topk_prob"], config["mlp_only_layers"]) == (False, [0])


def test_the_export_imports_back_to_the_same_flags_and_weights(exported, process_group):
    workdir, architecture, _ = exported
    imported = _convert(workdir, "--direction", "hf2mcore", "--load", "hf", "--save", "back",
                        "--make-vocab-size-divisible-by", "64")  # fmt: skip
    trained = checkpoint_args(str(workdir / "ckpt" / "iter_0000003"))
    back = checkpoint_args(str(workdir / "back" / "iter_0000000"))
    different = {
        name for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS if getattr(back, name) != getattr(trained, name)
    }
    assert different <= {"moe_layer_freq", "seq_length", "max_position_embeddings"}, imported["printed"]
    assert moe_layer_pattern(back) == moe_layer_pattern(trained)
    assert_round_trip_weights(workdir / "ckpt" / "iter_0000003", workdir / "back" / "iter_0000000", 100)


def test_llama3_rope_scaling_is_what_transformers_computes(exported, process_group, tmp_path):
    """Within 32 positions Llama 3's scaling moves logits little: the export gives transformers' logits
    to rounding, the same directory without its rope_scaling measurably others."""
    from megatron_r1.hf.verify import compare_logits

    workdir, architecture, _ = exported
    if architecture != "LlamaForCausalLM":
        pytest.skip("the Llama model is the one with --use-rope-scaling")
    shutil.copytree(workdir / "hf", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**config, "rope_scaling": None}))
    checkpoint = str(workdir / "ckpt" / "iter_0000003")
    scaled = compare_logits(checkpoint, str(workdir / "hf"))["max_abs_logit_diff"]
    plain = compare_logits(checkpoint, str(tmp_path / "plain"))["max_abs_logit_diff"]
    assert scaled <= 1e-6 and plain > 10 * max(scaled, 1e-6), (scaled, plain)


@pytest.fixture
def process_group():
    initialize_distributed()
    yield
    destroy_distributed()


def test_fp8_is_deepseeks_format_only(exported, process_group, tmp_path):
    workdir, architecture, _ = exported
    with pytest.raises(UnsupportedModelError, match=f"--fp8 writes DeepSeek's FP8 block format; {architecture}"):
        export_to_hf(str(workdir / "ckpt" / "iter_0000003"), str(tmp_path / "fp8"), fp8=True, progress=False)
    assert not (tmp_path / "fp8").exists() and not (tmp_path / "fp8.tmp").exists()


def _args(*flags):
    args = build_parser("").parse_args([*COMMON, "--num-experts", "4", "--moe-ffn-hidden-size", "16", *flags])
    args.max_position_embeddings, args.virtual_pipeline_model_parallel_size = args.seq_length, None
    return args


def test_gqa_flags_that_no_standard_architecture_represents_are_refused_by_name():
    assert export_fields(_args("--qk-layernorm", "--moe-layer-freq", "[0,1]"), 100)["mlp_only_layers"] == [0]
    assert export_fields(_args(), 100)["architectures"] == ["MixtralForCausalLM"]
    cases = {
        ("--moe-shared-expert-intermediate-size", "16"): "--moe-shared-expert-intermediate-size 16: Qwen3Moe",
        ("--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"): "--moe-router-score-function sigmoid",
        ("--moe-router-num-groups", "2", "--moe-router-group-topk", "1"): "--moe-router-num-groups 2",
        ("--moe-router-topk-scaling-factor", "2.5"): "--moe-router-topk-scaling-factor 2.5",
        ("--mtp-num-layers", "1"): "--mtp-num-layers 1: Qwen3MoeForCausalLM has no MTP",
        ("--normalization", "LayerNorm"): "--normalization LayerNorm: Qwen3MoeForCausalLM uses RMSNorm",
        ("--window-size", "8", "0"): "--window-size",
        ("--position-embedding-type", "learned_absolute"): "--position-embedding-type learned_absolute",
    }  # fmt: skip
    for flags, message in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            export_fields(_args("--qk-layernorm", *flags), 100)
    mixtral = {("--moe-layer-freq", "[0,1]"): r"--moe-layer-freq \[0, 1\]: MixtralForCausalLM has MoE in every layer",
               ("--moe-router-pre-softmax",): "--moe-router-pre-softmax: MixtralForCausalLM renormalises"}  # fmt: skip
    for flags, message in mixtral.items():
        with pytest.raises(UnsupportedModelError, match=message):
            export_fields(_args(*flags), 100)
    dense = _args()
    dense.num_experts, dense.swiglu = None, False
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM's MLPs are SwiGLU"):
        export_fields(dense, 100)


def test_qkv_splits_each_query_group_into_its_heads_q_then_k_then_v():
    # 4 heads in 2 groups of 3 channels: rows per group [q head 0, q head 1, k, v] -> q = both groups' q heads.
    qkv = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).view(24, 5)
    m = TensorMap("qkv", ("q", "k", "v"), "qkv", heads=(4, 2))
    parts = m.to_hf(qkv, 0)
    assert torch.equal(parts["q"], torch.cat([qkv[0:6], qkv[12:18]]))
    assert torch.equal(parts["k"], torch.cat([qkv[6:9], qkv[18:21]]))
    assert torch.equal(parts["v"], torch.cat([qkv[9:12], qkv[21:24]]))
    assert torch.equal(m.to_mcore(parts, 0), qkv)
