"""SDPACoreAttention against an explicit softmax-attention reference."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1.layers import SDPACoreAttention


def reference_attention(query, key, value, allowed):
    """query [sq, b, h, d], key/value [sk, b, g, d*], allowed [sq, sk] -> [sq, b, h * dv]."""
    heads, groups = query.shape[2], key.shape[2]
    key = key.repeat_interleave(heads // groups, dim=2)
    value = value.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), value)
    return out.flatten(2)


def attention(window_size=None, heads=4):
    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=heads, window_size=window_size, attention_dropout=0.0
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


@pytest.mark.parametrize("groups", [4, 2])  # MHA and GQA
def test_causal_matches_reference_with_distinct_value_head_dim(groups):
    torch.manual_seed(0)
    query, key = torch.randn(6, 2, 4, 12), torch.randn(6, 2, groups, 12)
    value = torch.randn(6, 2, groups, 8)  # MLA-style: v head dim != q/k head dim
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    out = attention()(query, key, value, None)
    assert out.shape == (6, 2, 4 * 8)
    assert torch.allclose(out, reference_attention(query, key, value, causal), atol=1e-5)


def test_distinct_value_head_dim_uses_the_fused_cpu_kernel():
    """MLA's narrower v is padded so that torch's flash kernel runs on CPU (no materialised scores)."""
    torch.manual_seed(0)
    query, key, value = torch.randn(16, 2, 4, 12), torch.randn(16, 2, 4, 12), torch.randn(16, 2, 4, 8)
    with torch.profiler.profile() as profiler:
        out = attention()(query, key, value, None)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {event.key for event in profiler.key_averages()}
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.allclose(out, reference_attention(query, key, value, causal), atol=1e-5)


def test_sliding_window_only_sees_the_last_tokens():
    torch.manual_seed(0)
    query, key, value = torch.randn(8, 1, 4, 8), torch.randn(8, 1, 4, 8), torch.randn(8, 1, 4, 8)
    position = torch.arange(8)
    offset = position[None, :] - position[:, None]
    allowed = (offset <= 0) & (offset >= -2)  # window (2, 0): self and the two before
    out = attention(window_size=(2, 0))(query, key, value, None)
    assert torch.allclose(out, reference_attention(query, key, value, allowed), atol=1e-5)


def test_fewer_queries_than_keys_align_to_the_end():
    """Decoding with a KV cache: the queries are the last positions of the key sequence."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 1, 4, 8), torch.randn(5, 1, 4, 8), torch.randn(5, 1, 4, 8)
    allowed = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attention()(query, key, value, None)
    assert torch.allclose(out, reference_attention(query, key, value, allowed), atol=1e-5)
