"""hf2mcore in bounded memory (megatron_r1.hf.import_): importing a model with 4x the layers raises
the process' peak memory by less than 1.5x what importing the model does (parts of half a layer),
where holding the model raised it 4x. (That the checkpoint written in parts holds the same tensors
in the same chunks as the model's own save: tests/hf/test_conversion.py's round trip.)"""

import json
from pathlib import Path

import torch
from peak_memory import needs_clear_refs, peak_rises_mib

from megatron_r1.hf.storage import ShardedSafetensorsWriter

# A DeepSeek-V3 config.json whose MoE layers (8 experts of 512x512 gate/up/down, a shared expert)
# hold ~32 MiB in fp32 each: the weights, not Python's objects, make the memory that grows.
CONFIG = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 8,
          "hidden_size": 512, "intermediate_size": 1024, "kv_lora_rank": 64, "q_lora_rank": 128, "qk_nope_head_dim": 32,
          "qk_rope_head_dim": 16, "v_head_dim": 32, "max_position_embeddings": 64, "vocab_size": 1000,
          "first_k_dense_replace": 0, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
          "moe_intermediate_size": 512, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
          "tie_word_embeddings": False, "num_nextn_predict_layers": 0}  # fmt: skip
PART_BYTES = 16 * 2**20


def _hf_dir(directory: Path, layers: int) -> int:
    """A Hugging Face directory of constant bf16 weights of CONFIG with `layers` layers; their fp32 bytes."""
    from transformers import DeepseekV3Config

    from megatron_r1.hf.export import expected_hf_shapes

    config = {**CONFIG, "num_hidden_layers": layers}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    shapes = expected_hf_shapes(DeepseekV3Config(**{k: v for k, v in config.items() if k != "model_type"}))
    writer = ShardedSafetensorsWriter(str(directory), 64 * 2**20)
    for name, shape in shapes.items():  # the values do not matter to the memory
        writer.add(name, torch.full(shape, 0.02, dtype=torch.bfloat16))
    writer.finish()
    return 2 * writer.total_bytes


@needs_clear_refs
def test_four_times_the_layers_raise_the_peak_memory_less_than_one_and_a_half_times(tmp_path):
    small_bytes = _hf_dir(tmp_path / "small", 2)
    large_bytes = _hf_dir(tmp_path / "large", 8)
    assert large_bytes > 3.5 * small_bytes > 3.5 * 50 * 2**20  # the weights dominate the small one's too
    small, large = peak_rises_mib(
        tmp_path, "megatron_r1.hf.import_:import_from_hf", PART_BYTES, tmp_path / "small", tmp_path / "large"
    )
    # Holding the model raises the peak by its fp32 size or more: ~4x (95 -> 378 MiB before parts).
    assert large < 1.5 * small, (small, large)
    assert large < large_bytes / 2**20 / 4, (large, large_bytes)
