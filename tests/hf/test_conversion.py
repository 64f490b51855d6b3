"""megatron_r1.hf: a tiny DeepSeek-V3-style model (MLA with q compression, a dense first layer, MoE
with shared experts, sigmoid group-limited routing with a trained expert bias, yarn RoPE, MTP) gives
transformers' DeepseekV3ForCausalLM the same logits after export, round-trips mcore -> HF -> mcore
bit-exactly, and bad models / weights are refused before anything is written."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_round_trip_weights, run_command
from safetensors.torch import load_file
from transformer_engine_keys import mark_as_transformer_engines, pretrain_saving_transformer_engine_keys

from megatron_r1.arguments import build_parser
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.hf.config import UnsupportedModelError, deepseek_config
from megatron_r1.hf.export import export_to_hf
from megatron_r1.hf.import_ import import_from_hf
from megatron_r1.hf.storage import McoreCheckpointReader, WeightsError
from megatron_r1.hf.verify import compare_logits

PRETRAIN = Path(__file__).resolve().parents[2] / "pretrain_r1.py"
VOCAB = 100
DEEPSEEK = ["--mock-data", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
            "--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "16", "--kv-lora-rank", "16",
            "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--rope-type", "yarn",
            "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "8", "--mscale", "1.0",
            "--mscale-all-dim", "1.0", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
            "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2",
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate", "0.05", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
            "--moe-router-topk-scaling-factor", "2.5", "--mtp-num-layers", "1", "--untie-embeddings-and-output-weights",
            "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip


@pytest.fixture(scope="module")
def process_group():
    initialize_distributed()
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deepseek")
    run_command(
        [sys.executable, str(PRETRAIN), *DEEPSEEK, "--train-iters", "3", "--save", "ckpt"], workdir, timeout=300
    )
    return workdir / "ckpt" / "iter_0000003"


@pytest.fixture(scope="module")
def exported(checkpoint, process_group, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "hf"
    export_to_hf(str(checkpoint), str(output), vocab_size=VOCAB, max_shard_bytes=100_000, progress=False)
    return output


def test_export_writes_deepseek_v3_layout(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["vocab_size"] == VOCAB
    assert (config["n_group"], config["topk_group"], config["first_k_dense_replace"]) == (2, 1, 1)
    assert config["n_shared_experts"] == 2 and config["num_nextn_predict_layers"] == 1
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1 and all((exported / name).is_file() for name in shards)
    assert not any(name.endswith(".tmp") for name in os.listdir(exported))
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.2.eh_proj.weight", "model.layers.2.shared_head.head.weight", "lm_head.weight"):  # fmt: skip
        assert name in index, name
    tensors = {}
    for shard in shards:
        tensors.update(load_file(exported / shard))
    assert tensors["model.embed_tokens.weight"].shape[0] == VOCAB and tensors["lm_head.weight"].shape[0] == VOCAB
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0, "expert bias not trained"


def test_logits_match_transformers(checkpoint, exported):
    result = compare_logits(str(checkpoint), str(exported), seq_length=32)
    assert result["max_abs_logit_diff"] <= 1e-4, result
    assert result["top1_agreement"] == 1.0, result


def _chunks(path) -> dict:
    """Checkpoint key -> (global shape, dtype, the chunks it is stored in) from its torch_dist metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    return {
        key: (
            tuple(entry.size),
            entry.properties.dtype,
            sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks),
        )
        for key, entry in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if hasattr(entry, "chunks")
    }


def test_mcore_hf_mcore_round_trip_is_bit_exact(checkpoint, exported, tmp_path):
    # Written in parts of a few KB (megatron_r1.hf.storage.TorchDistPartsWriter): tensors, the experts'
    # among them, split across parts, whose metadata is merged into the one checkpoint.
    summary = import_from_hf(
        str(exported), str(tmp_path / "back"), make_vocab_size_divisible_by=64, max_part_bytes=4000, progress=False
    )
    assert summary["parts"] > 10
    # The same tensors in the same chunks as the model's own save (pretrain_r1.py's, one process).
    saved, parts = _chunks(checkpoint), _chunks(tmp_path / "back" / "iter_0000000")
    assert {key: saved[key] for key in parts} == parts
    result = compare_logits(str(tmp_path / "back" / "iter_0000000"), str(exported), seq_length=32)
    assert result["max_abs_logit_diff"] <= 1e-4 and result["top1_agreement"] == 1.0, result
    assert_round_trip_weights(checkpoint, tmp_path / "back" / "iter_0000000", VOCAB)


def test_a_checkpoint_with_transformer_engines_keys_exports_the_same_weights(exported, tmp_path):
    """The same training saved as a --transformer-impl transformer_engine run saves it (MLA's q and kv
    norms, the dense layer's norm before its MLP under the names of the linear layers they fuse
    into) exports to the same Hugging Face weights, tensor for tensor."""
    command = pretrain_saving_transformer_engine_keys(PRETRAIN, dense_layers=[0])
    run_command([*command, *DEEPSEEK, "--train-iters", "3", "--save", "te"], tmp_path, timeout=300)
    saved = tmp_path / "te" / "iter_0000003"
    keys = _chunks(saved)
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys, sorted(keys)
    assert "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.layer_norm_weight" in keys
    mark_as_transformer_engines(saved)
    export_to_hf(str(saved), str(tmp_path / "hf"), vocab_size=VOCAB, progress=False)
    ours, theirs = _hf_tensors(tmp_path / "hf"), _hf_tensors(exported)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def _hf_tensors(directory: Path) -> dict:
    return {name: tensor for shard in directory.glob("*.safetensors") for name, tensor in load_file(shard).items()}


def test_unrepresentable_models_are_refused():
    def args_for(*flags):
        args = build_parser("").parse_args(
            [
                "--multi-latent-attention",
                "--qk-layernorm",
                "--swiglu",
                "--disable-bias-linear",
                "--num-experts",
                "4",
                "--moe-shared-expert-intermediate-size",
                "32",
                "--moe-ffn-hidden-size",
                "16",
                "--moe-router-score-function",
                "sigmoid",
                *flags,
            ]
        )
        args.max_position_embeddings, args.virtual_pipeline_model_parallel_size = args.seq_length, None
        return args

    deepseek_config(args_for(), 100)  # representable
    cases = {
        ("--moe-router-score-function", "softmax"): r"DeepseekV2 \(softmax routing\) does not",
        ("--moe-router-num-groups", "2", "--moe-router-group-topk", "2", "--moe-router-topk", "2"): "top 2",
        ("--moe-layer-freq", "[1,0]"): "dense layers first",
        ("--moe-shared-expert-intermediate-size", "24"): "n_shared_experts",
        ("--normalization", "LayerNorm"): "RMSNorm",
    }
    for flags, message in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            deepseek_config(args_for(*flags), 100)
    no_qk_norm = args_for()
    no_qk_norm.qk_layernorm = False
    with pytest.raises(UnsupportedModelError, match="--qk-layernorm"):
        deepseek_config(no_qk_norm, 100)
    gqa = args_for()
    gqa.multi_latent_attention = False
    with pytest.raises(UnsupportedModelError, match="GQA"):
        deepseek_config(gqa, 100)


def _copy(directory: Path, target: Path) -> Path:
    target.mkdir()
    for name in os.listdir(directory):
        (target / name).write_bytes((directory / name).read_bytes())
    return target


def test_bad_hf_directories_fail_before_writing(exported, tmp_path, process_group):
    missing_shard = _copy(exported, tmp_path / "missing_shard")
    shard = json.loads((missing_shard / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (missing_shard / shard).unlink()
    mismatch = _copy(exported, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "kv_lora_rank": 8}))
    no_mtp = _copy(exported, tmp_path / "no_mtp")
    (no_mtp / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    other = _copy(exported, tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_moe"}))
    cases = [(missing_shard, WeightsError, f"shard.*{shard}"), (mismatch, WeightsError, "kv_a_proj_with_mqa"),
             (no_mtp, WeightsError, "does not account for.*model.layers.2"),
             (other, UnsupportedModelError, "model_type 'qwen2_moe'")]  # fmt: skip
    for directory, error, message in cases:
        with pytest.raises(error, match=message):
            import_from_hf(str(directory), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_older_checkpoints_load_without_flags_added_since(checkpoint, tmp_path):
    """A model flag added after checkpoints were first saved may be absent (its default computes
    what those models did); any other missing flag is named."""
    import shutil

    from megatron_r1.checkpointing import METADATA_FILE, CheckpointError
    from megatron_r1.hf.config import checkpoint_args

    older = tmp_path / "iter_0000003"
    shutil.copytree(checkpoint, older)
    metadata = json.loads((older / METADATA_FILE).read_text())
    del metadata["model_args"]["window_attn_skip_freq"]
    (older / METADATA_FILE).write_text(json.dumps(metadata))
    assert checkpoint_args(str(older)).window_attn_skip_freq is None
    del metadata["model_args"]["rotary_base"]
    (older / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="lacks the model flags rotary_base"):
        checkpoint_args(str(older))


def test_fp8_export_reimports_as_dequantized_quantized_weights_with_the_reported_error(
    checkpoint, tmp_path, process_group
):
    from megatron_r1.hf.config import checkpoint_args
    from megatron_r1.hf.fp8 import FP8_DTYPE, SCALE_SUFFIX, deepseek_quantizes, dequantize, quantize
    from megatron_r1.hf.keys import conversion_groups

    summary = export_to_hf(str(checkpoint), str(tmp_path / "fp8"), vocab_size=VOCAB, fp8=True, progress=False)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = load_file(tmp_path / "fp8" / index["model.layers.1.mlp.experts.3.down_proj.weight"])
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == FP8_DTYPE
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight" + SCALE_SUFFIX].dtype == torch.float32
    scaled = {name[: -len(SCALE_SUFFIX)] for name in index if name.endswith(SCALE_SUFFIX)}
    assert (
        "model.layers.0.self_attn.q_a_proj.weight" in scaled
        and "model.layers.2.mlp.shared_experts.gate_proj.weight" in scaled
    )
    # Left as DeepSeek's release leaves them: embeddings, norms, router, MTP's eh_proj, output heads.
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.2.eh_proj.weight",
                 "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.2.shared_head.head.weight"):  # fmt: skip
        assert name in index and name not in scaled, name

    import_from_hf(str(tmp_path / "fp8"), str(tmp_path / "back"), make_vocab_size_divisible_by=64, progress=False)
    original, back = (
        McoreCheckpointReader(str(checkpoint)),
        McoreCheckpointReader(str(tmp_path / "back" / "iter_0000000")),
    )
    first, second = original.load(original.keys()), back.load(back.keys())
    maps = {
        m.mcore: m
        for _, group in conversion_groups(checkpoint_args(str(checkpoint)))
        for m in group
        if not m.export_only
    }
    quantized = [key for key, m in maps.items() if all(map(deepseek_quantizes, m.hf))]
    assert len(scaled) == summary["fp8"]["tensors"] == sum(len(maps[key].hf) for key in quantized)
    errors = []
    for key in quantized:  # each Hugging Face piece (an expert's gate, up) quantized on its own
        pieces = maps[key].to_hf(first[key], VOCAB)
        expected = maps[key].to_mcore(
            {name: dequantize(*quantize(piece), (128, 128)) for name, piece in pieces.items()}, 0
        )
        assert torch.equal(second[key], expected), key
        errors.append((second[key] - first[key]).abs().max().item())
    for key in set(first) - set(quantized):
        rows = slice(None, VOCAB) if key in ("embedding.word_embeddings.weight", "output_layer.weight") else slice(None)
        assert torch.equal(first[key][rows], second[key][rows]), key
    assert 0 < summary["fp8"]["max_abs_error"] == max(errors)
    assert 0 < summary["fp8"]["relative_rms_error"] < 0.05
