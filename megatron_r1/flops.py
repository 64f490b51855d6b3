"""Parameter counts and training FLOPs of the model ``pretrain_r1.py`` builds, from its flags alone
(no model is built, so a 671B shape is counted on a laptop).

Parameters follow megatron-core's modules exactly (tests/test_flops.py checks the count against
built models): per decoder layer two norms, attention (GQA ``linear_qkv`` + ``linear_proj``, or MLA's
q/kv down/up projections), and a dense MLP or an MoE block (router, routed experts, shared experts)
as ``--moe-layer-freq`` says; the final norm; word (and learned position) embeddings; the output
layer unless tied; and per MTP layer ``enorm``, ``hnorm``, ``eh_proj``, a transformer layer shaped
as the last decoder layer, and a final norm (its embedding and output layer are the main model's).

*Active* parameters are those one token's forward pass multiplies with or normalises by: the top-k
routed experts instead of all of them; the embedding lookup is left out (DeepSeek's published
"37B activated" counts the output head but not the embedding), except that tied embeddings count
as the output projection.

Training FLOPs per token follow Megatron-LM's ``num_floating_point_operations`` (the same terms,
except that the router's GEMM is counted and norms are not):

* every weight matrix a token meets costs 2 FLOPs per weight forward and 4 backward (input and
  weight gradients): ``6 x active matmul weights`` (router and MTP's ``eh_proj`` included; biases,
  norms, activations and softmax are not counted), the output layer once for the model and once per
  MTP layer;
* core attention, causal: a query attends to ``s/2`` keys on average (the area of the triangular
  mask, as Megatron-LM counts it), so per layer ``6 x heads x (d_qk + d_v) x s/2`` for ``QK^T`` and
  ``softmax(QK^T) V``, where ``d_qk = d_v = kv_channels`` for GQA and ``d_qk = qk_head_dim +
  qk_pos_emb_head_dim``, ``d_v = v_head_dim`` for MLA. With ``--window-size L R`` the mask's area is
  that of a band of width ``L`` below the diagonal: ``(s^2 - max(s - L, 0)^2) / 2s`` keys per query.

FLOPs per iteration = FLOPs per token x ``global_batch_size x seq_length`` (the full
``--seq-length``: with a sequence-length curriculum, count each phase at its own length).
"""

from __future__ import annotations

import dataclasses

from megatron_r1.layers import uses_window_attention
from megatron_r1.tokenizer import vocab_size_with_padding

COMPONENTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "output_layer",
    "mtp",
)

# Each GEMM runs three times in training (forward, input gradient, weight gradient) at 2 FLOPs per
# multiply-accumulate.
_TRAINING_FLOPS_PER_WEIGHT = 6


@dataclasses.dataclass
class ComponentCount:
    total: int = 0
    active: int = 0
    flops_per_token: float = 0.0

    def add(self, other: ComponentCount) -> None:
        self.total += other.total
        self.active += other.active
        self.flops_per_token += other.flops_per_token


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """Per-component counts; ``tokens_per_iteration`` is global batch x sequence length."""

    components: dict[str, ComponentCount]
    tokens_per_iteration: int

    @property
    def total_params(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active_params(self) -> int:
        return sum(c.active for c in self.components.values())

    @property
    def flops_per_token(self) -> float:
        return sum(c.flops_per_token for c in self.components.values())

    @property
    def flops_per_iteration(self) -> float:
        return self.flops_per_token * self.tokens_per_iteration


def _linear(in_features: int, out_features: int, bias: bool) -> ComponentCount:
    """A dense linear layer every token passes through."""
    weights = in_features * out_features
    params = weights + (out_features if bias else 0)
    return ComponentCount(params, params, _TRAINING_FLOPS_PER_WEIGHT * weights)


def _norm(size: int, normalization: str) -> ComponentCount:
    params = size * (2 if normalization == "LayerNorm" else 1)  # LayerNorm has a bias
    return ComponentCount(params, params, 0.0)


def _sum(*counts: ComponentCount) -> ComponentCount:
    result = ComponentCount()
    for count in counts:
        result.add(count)
    return result


def _keys_per_query(seq_length: int, window_size) -> float:
    """Mean number of keys a query attends to under the causal (optionally banded) mask."""
    if window_size is None:
        return seq_length / 2
    band = min(window_size[0], seq_length)
    return (seq_length**2 - (seq_length - band) ** 2) / (2 * seq_length)


def moe_layer_pattern(args) -> list[int]:
    """1 for each decoder layer with an MoE block, 0 for a dense one (megatron-core's reading of
    ``--moe-layer-freq``: an int N makes every layer i with i % N == 0 MoE)."""
    if not args.num_experts:
        return [0] * args.num_layers
    if isinstance(args.moe_layer_freq, list):
        return list(args.moe_layer_freq)
    return [1 if i % args.moe_layer_freq == 0 else 0 for i in range(args.num_layers)]


def _attention(args, bias: bool, window_size) -> tuple[ComponentCount, ComponentCount]:
    """(projections, q/k norms) of one attention block."""
    heads, hidden = args.num_attention_heads, args.hidden_size
    qk_layernorm = getattr(args, "qk_layernorm", False)
    norms = []
    if args.multi_latent_attention:
        q_head_dim = args.qk_head_dim + args.qk_pos_emb_head_dim
        if args.q_lora_rank is None:
            q_projections = [_linear(hidden, heads * q_head_dim, False)]
        else:
            q_projections = [_linear(hidden, args.q_lora_rank, False),
                             _linear(args.q_lora_rank, heads * q_head_dim, False)]  # fmt: skip
            if qk_layernorm:
                norms.append(_norm(args.q_lora_rank, args.normalization))
        projections = _sum(
            *q_projections,
            _linear(hidden, args.kv_lora_rank + args.qk_pos_emb_head_dim, False),
            _linear(args.kv_lora_rank, heads * (args.qk_head_dim + args.v_head_dim), False),
            _linear(heads * args.v_head_dim, hidden, bias),
        )
        if qk_layernorm:
            norms.append(_norm(args.kv_lora_rank, args.normalization))
        qk_dim, v_dim = q_head_dim, args.v_head_dim
    else:
        kv_channels = args.kv_channels or hidden // heads
        groups = args.num_query_groups or heads
        projections = _sum(
            _linear(hidden, (heads + 2 * groups) * kv_channels, bias), _linear(heads * kv_channels, hidden, bias)
        )
        if qk_layernorm:
            norms += [_norm(kv_channels, args.normalization)] * 2
        qk_dim = v_dim = kv_channels
    keys = _keys_per_query(args.seq_length, window_size)
    projections.flops_per_token += _TRAINING_FLOPS_PER_WEIGHT * heads * (qk_dim + v_dim) * keys
    return projections, _sum(*norms)


def _mlp(args, hidden_size: int, ffn_hidden_size: int, bias: bool) -> ComponentCount:
    fc1_width = ffn_hidden_size * (2 if args.swiglu else 1)  # SwiGLU: gate and up stacked in fc1
    return _sum(_linear(hidden_size, fc1_width, bias), _linear(ffn_hidden_size, hidden_size, bias))


def _layer(args, is_moe: bool, layer_number: int) -> dict[str, ComponentCount]:
    """One transformer layer (1-based number, which --window-attn-skip-freq reads), by component."""
    bias = not args.disable_bias_linear
    hidden = args.hidden_size
    ffn_hidden_size = args.ffn_hidden_size or 4 * hidden
    windowed = uses_window_attention(args.window_size, args.window_attn_skip_freq, layer_number)
    attention, attention_norms = _attention(args, bias, args.window_size if windowed else None)
    counts = {
        "attention": attention,
        "norms": _sum(_norm(hidden, args.normalization), _norm(hidden, args.normalization), attention_norms),
    }
    if not is_moe:
        counts["dense_mlp"] = _mlp(args, hidden, ffn_hidden_size, bias)
        return counts
    expert = _mlp(args, hidden, args.moe_ffn_hidden_size or ffn_hidden_size, bias)
    counts["routed_experts"] = ComponentCount(
        expert.total * args.num_experts,
        expert.active * args.moe_router_topk,
        expert.flops_per_token * args.moe_router_topk,
    )
    counts["router"] = _linear(hidden, args.num_experts, bias)
    if args.moe_shared_expert_intermediate_size:
        counts["shared_experts"] = _mlp(args, hidden, args.moe_shared_expert_intermediate_size, bias)
    return counts


def padded_vocab_size(args) -> int:
    """The embedding rows: ``args.padded_vocab_size`` once training has set it, else --vocab-size
    padded as Megatron-LM pads it."""
    if getattr(args, "padded_vocab_size", None):
        return args.padded_vocab_size
    if not args.vocab_size:
        raise ValueError("give --vocab-size (or the tokenizer's padded vocabulary as args.padded_vocab_size)")
    return vocab_size_with_padding(args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)


def count_model(args) -> ModelCount:
    """Counts from a parsed ``megatron_r1.arguments`` namespace."""
    components = {name: ComponentCount() for name in COMPONENTS}
    hidden, vocab = args.hidden_size, padded_vocab_size(args)
    pattern = moe_layer_pattern(args)

    components["embedding"].total = vocab * hidden
    if args.position_embedding_type == "learned_absolute":
        components["embedding"].total += args.max_position_embeddings * hidden
    for layer_number, is_moe in enumerate(pattern, start=1):
        for name, count in _layer(args, is_moe, layer_number).items():
            components[name].add(count)
    components["norms"].add(_norm(hidden, args.normalization))  # final norm

    logits = _linear(hidden, vocab, False)
    if args.untie_embeddings_and_output_weights:
        components["output_layer"].add(logits)
    else:  # the embedding table is the output projection
        components["embedding"].active += logits.active
        components["output_layer"].flops_per_token += logits.flops_per_token

    for depth in range(1, (args.mtp_num_layers or 0) + 1):
        mtp_layer = _sum(
            _norm(hidden, args.normalization),  # enorm
            _norm(hidden, args.normalization),  # hnorm
            _linear(2 * hidden, hidden, False),  # eh_proj
            *_layer(args, pattern[-1], len(pattern) + depth).values(),  # the last decoder layer's kind
            _norm(hidden, args.normalization),  # final norm
        )
        # Each MTP layer computes logits again with the main model's output weights.
        mtp_layer.flops_per_token += logits.flops_per_token
        components["mtp"].add(mtp_layer)
    return ModelCount(components, args.global_batch_size * args.seq_length)


def human_count(number: float) -> str:
    """1234567 -> '1.2M'; 6.71e11 -> '671.0B'."""
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= divisor:
            return f"{number / divisor:.1f}{suffix}"
    return str(int(number))


def summary(count: ModelCount) -> str:
    """One line, e.g. 'total 682.5B params (MTP 11.5B), active 38.2B per token, 3.6e+19 FLOPs/iteration'."""
    mtp = count.components["mtp"].total
    return (
        f"total {human_count(count.total_params)} params"
        + (f" (MTP {human_count(mtp)})" if mtp else "")
        + f", active {human_count(count.active_params)} per token"
        + f", {count.flops_per_iteration:.2e} FLOPs/iteration"
    )


def breakdown_table(count: ModelCount) -> str:
    """Per-component total / active parameters and share of training FLOPs, as aligned text."""
    rows = [("component", "total", "active", "FLOPs/token", "FLOPs %")]
    for name, part in count.components.items():
        share = 100 * part.flops_per_token / count.flops_per_token
        rows.append((name, f"{part.total:,}", f"{part.active:,}", f"{part.flops_per_token:.3e}", f"{share:.1f}"))
    rows.append(("all", f"{count.total_params:,}", f"{count.active_params:,}", f"{count.flops_per_token:.3e}", "100.0"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:  # names left-aligned, figures right-aligned
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def report_model_size(args, print_fn=print) -> ModelCount:
    """Print the one-line model size at training start (``print_fn`` picks the rank that prints);
    the counts come back for callers that log FLOP rates."""
    count = count_model(args)
    print_fn(f" > model size: {summary(count)}")
    return count


# Dense bf16 peaks of known GPUs, TFLOP/s (vendor figures, without sparsity), matched against
# torch.cuda.get_device_name(); the most specific name first.
_GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0), ("GH200", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
)  # fmt: skip


def device_peak_tflops(args) -> float | None:
    """--peak-tflops, else the table's figure for this process' GPU; None when unknown (CPU)."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for model, peak in _GPU_BF16_PEAK_TFLOPS if model in name), None)
