"""DeepSeek's FP8 block format (megatron_r1.hf.fp8): quantizing and dequantizing per block with
partial edge blocks, hf2mcore of FP8 weights equal to hf2mcore of the dequantized weights, and bad
FP8 input refused with one error before anything is written."""

import json

import pytest
import torch

from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.hf.config import UnsupportedModelError
from megatron_r1.hf.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    deepseek_quantizes,
    dequantize,
    fp8_quantization_config,
    quantize,
)
from megatron_r1.hf.import_ import import_from_hf
from megatron_r1.hf.storage import SAFETENSORS_INDEX, McoreCheckpointReader, ShardedSafetensorsWriter, WeightsError

BLOCK = (16, 16)  # DeepSeek's is 128x128; 16 gives the tiny model's weights several blocks and partial ones
# A DeepSeek-V3 config.json small enough to build in transformers: MLA with q compression, a dense
# first layer, then MoE with shared experts (kv_a_proj_with_mqa has 16 + 8 = 24 rows: a partial block).
CONFIG = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 2,
          "num_attention_heads": 4, "hidden_size": 40, "intermediate_size": 56, "kv_lora_rank": 16, "q_lora_rank": 24,
          "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 32, "vocab_size": 100,
          "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
          "moe_intermediate_size": 24, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "tie_word_embeddings": False,
          "num_nextn_predict_layers": 0}  # fmt: skip


def test_blocks_are_quantized_and_dequantized_one_scale_each_with_partial_edges():
    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    weight[128:256, :128] = 0  # an all-zero block
    weight[0, 0] = 1000.0  # one block with a large outlier
    fp8, scale_inv = quantize(weight)
    assert fp8.dtype == FP8_DTYPE and scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    back = dequantize(fp8, scale_inv, (128, 128))
    for i in range(3):
        for j in range(2):
            block = weight[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            # Each block's largest magnitude is float8's largest (448) times the block's own scale.
            assert scale_inv[i, j] == max(block.abs().max() / 448, torch.finfo(torch.float32).tiny)
            restored = back[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            assert torch.equal(
                restored, fp8[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)].float() * scale_inv[i, j]
            )
            # e4m3 keeps 3 mantissa bits: within half a step (1/16) of the value, or of the smallest subnormal.
            assert ((restored - block).abs() <= block.abs() / 16 + scale_inv[i, j] * 2**-9).all()
    assert not back[128:256, :128].any() and back[0, 0] == 1000.0


def test_deepseek_quantizes_the_linear_weights_it_publishes_in_fp8_and_nothing_else():
    quantized = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.5.mlp.experts.17.gate_proj.weight",
                 "model.layers.5.mlp.shared_experts.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]  # fmt: skip
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.5.mlp.gate.weight",
            "model.layers.5.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.kv_a_layernorm.weight",
            "model.layers.61.eh_proj.weight", "model.layers.61.shared_head.head.weight", "model.layers.61.enorm.weight"]  # fmt: skip
    assert all(map(deepseek_quantizes, quantized)) and not any(map(deepseek_quantizes, kept))


@pytest.fixture(scope="module")
def process_group():
    initialize_distributed()
    yield
    destroy_distributed()


def _write_hf_dir(directory, config: dict, tensors: dict, max_shard_bytes: int = 10**9):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    writer = ShardedSafetensorsWriter(str(directory), max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    return directory


@pytest.fixture(scope="module")
def hf_weights():
    """transformers' randomly initialised DeepseekV3 weights: ``{name: fp32 tensor}``."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from megatron_r1.hf.export import published_tensors

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
    # Under the published names (transformers 5 fuses each layer's experts in its state dict).
    weights = {name: tensor.detach().clone() for name, tensor in published_tensors(model.state_dict()).items()}
    weights["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.rand(CONFIG["n_routed_experts"])
    return weights


@pytest.fixture(scope="module")
def fp8_tensors(hf_weights):
    tensors = {}
    for name, tensor in hf_weights.items():
        if deepseek_quantizes(name):
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize(tensor, BLOCK)
        else:
            tensors[name] = tensor
    return tensors


def _all_weights(checkpoint_root) -> dict:
    reader = McoreCheckpointReader(str(checkpoint_root / "iter_0000000"))
    return reader.load(reader.keys())


def test_fp8_import_equals_importing_the_dequantized_weights(hf_weights, fp8_tensors, tmp_path, process_group):
    fp8_config = {**CONFIG, "quantization_config": fp8_quantization_config(BLOCK)}
    fp8_dir = _write_hf_dir(tmp_path / "fp8", fp8_config, fp8_tensors, max_shard_bytes=4000)
    dequantized = {
        name: dequantize(tensor, fp8_tensors[name + SCALE_SUFFIX], BLOCK) if tensor.dtype == FP8_DTYPE else tensor
        for name, tensor in fp8_tensors.items()
        if not name.endswith(SCALE_SUFFIX)
    }
    assert any(not torch.equal(dequantized[name], hf_weights[name]) for name in dequantized), "nothing was rounded"
    plain_dir = _write_hf_dir(tmp_path / "plain", CONFIG, dequantized)
    import_from_hf(
        str(fp8_dir), str(tmp_path / "from_fp8"), make_vocab_size_divisible_by=64, max_part_bytes=4000, progress=False
    )
    import_from_hf(str(plain_dir), str(tmp_path / "from_plain"), make_vocab_size_divisible_by=64, progress=False)
    from_fp8, from_plain = _all_weights(tmp_path / "from_fp8"), _all_weights(tmp_path / "from_plain")
    assert from_fp8.keys() == from_plain.keys()
    assert [key for key in from_fp8 if not torch.equal(from_fp8[key], from_plain[key])] == []


def test_bad_fp8_input_is_one_error_before_anything_is_written(fp8_tensors, tmp_path, process_group):
    scale = "model.layers.1.mlp.experts.2.down_proj.weight" + SCALE_SUFFIX
    fp8_config = {**CONFIG, "quantization_config": fp8_quantization_config(BLOCK)}
    cases = {
        "missing_scale": (fp8_config, {k: v for k, v in fp8_tensors.items() if k != scale}, WeightsError,
                          f"down_proj.weight is float8 but has no {scale}"),
        "wrong_block": ({**CONFIG, "quantization_config": fp8_quantization_config((32, 32))}, fp8_tensors, WeightsError,
                        r"in 32x32 blocks \(weight_block_size\) needs"),
        "no_quantization_config": (CONFIG, fp8_tensors, WeightsError, "config.json has no quantization_config"),
        "unknown_method": ({**CONFIG, "quantization_config": {**fp8_quantization_config(BLOCK), "quant_method": "bitsandbytes"}},
                           fp8_tensors, UnsupportedModelError, "quant_method 'bitsandbytes'"),
        "unknown_fmt": ({**CONFIG, "quantization_config": {**fp8_quantization_config(BLOCK), "fmt": "e5m2"}},
                        fp8_tensors, UnsupportedModelError, "fmt 'e5m2'"),
        "missing_shard": (fp8_config, fp8_tensors, WeightsError, "names shard"),
    }  # fmt: skip
    for case, (config, tensors, error, message) in cases.items():
        directory = _write_hf_dir(tmp_path / case, config, tensors, max_shard_bytes=4000)
        if case == "missing_shard":
            shard = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"][scale]
            (directory / shard).unlink()
        with pytest.raises(error, match=message):
            import_from_hf(str(directory), str(tmp_path / "out"), make_vocab_size_divisible_by=64, progress=False)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists(), case
