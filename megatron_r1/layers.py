"""Small layers that slot into megatron-core layer specs where the local (no TransformerEngine,
no Apex) spec has no module that fits."""

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


class SequenceParallelTorchNorm:
    """torch.nn.RMSNorm / LayerNorm usable with sequence parallelism.

    megatron-core's WrappedTorchNorm asserts ``not sequence_parallel`` (torch_norm.py), yet MoE
    with TP > 1 requires sequence parallelism (moe_layer.py). A norm is per-token, so under SP each
    rank normalises its own sequence shard correctly; only the weight gradient must be summed over
    the TP group, which ``finalize_model_grads`` does for parameters tagged ``sequence_parallel``
    (as the fused TE/Apex norms are).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def uses_window_attention(window_size, window_attn_skip_freq, layer_number: int) -> bool:
    """Whether (1-based) layer `layer_number` attends through the sliding window: megatron-core's
    rule, except that MTP layers (numbered after the decoder's) take a per-layer list's last entry
    (megatron-core would index past its end)."""
    if isinstance(window_attn_skip_freq, list):
        layer_number = min(layer_number, len(window_attn_skip_freq))
    return is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)


class SDPACoreAttention(MegatronModule):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    The local spec's DotProductAttention assumes query, key and value share one head dim, which MLA
    breaks (q/k: qk_head_dim + qk_pos_emb_head_dim, v: v_head_dim); SDPA takes them as they come,
    handles GQA, and uses the fused flash/memory-efficient kernels on CPU as on GPU. Sliding-window
    attention (``config.window_size``, in the layers ``config.window_attn_skip_freq`` leaves it) is
    applied as an explicit mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not support --context-parallel-size > 1")
        self.attn_mask_type = attn_mask_type
        windowed = uses_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_size = config.window_size if windowed else None
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        attn_mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, heads, dim] -> [b, heads, s, dim]
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        seq_q, seq_k = query.shape[2], key.shape[2]
        mask, is_causal = None, attn_mask_type == AttnMaskType.causal
        if attention_mask is not None:
            # megatron masks mark positions to drop; given with the causal type it is the whole
            # pattern, as megatron's unfused softmax takes it (packed samples: causal within each)
            mask, is_causal = ~attention_mask, False
        if self.window_size is not None or (is_causal and seq_q != seq_k):
            # Explicit mask, aligned bottom-right (queries are the last seq_q positions).
            left, right = self.window_size or (seq_k, seq_k)
            query_pos = torch.arange(seq_k - seq_q, seq_k, device=query.device)[:, None]
            offset = torch.arange(seq_k, device=query.device)[None, :] - query_pos
            window = (offset >= -left) & (offset <= (0 if is_causal else right))
            mask = window if mask is None else mask & window
            is_causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        # Same RNG discipline as megatron's DotProductAttention: outside sequence parallelism the
        # heads of one TP group draw from the model-parallel stream.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        # torch's fused CPU kernel (flash attention, which also skips the causally masked half)
        # needs v's head dim to equal q's, and otherwise falls back to materialised scores; MLA's v is
        # narrower, so it is zero-padded on CPU and the padding dropped from the output.
        v_head_dim = value.shape[-1]
        if query.device.type == "cpu" and v_head_dim < query.shape[-1]:
            value = torch.nn.functional.pad(value, (0, query.shape[-1] - v_head_dim))
        with rng:
            output = torch.nn.functional.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=key.shape[1] != query.shape[1],
            )
        # [b, heads, s, dim] -> [s, b, heads * dim]
        return output[..., :v_head_dim].permute(2, 0, 1, 3).flatten(2)
