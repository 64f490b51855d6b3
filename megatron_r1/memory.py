"""Per-GPU memory of a training launch, from its flags alone, for each pipeline stage (first-order
estimates: a dry run on a laptop says whether a layout can fit before any GPU is booked).

**Model state** (exact for the parameters a rank holds; megatron_r1.training's setup):

* parameters per rank: a stage's decoder layers (``megatron_r1.layout.pipeline_stages``), the
  embedding on the first stage, the final norm, output layer and MTP layers on the last (and, with
  tied embeddings and PP > 1, a copy of the embedding there). Expert weights are split over
  EP x ETP; the rest over TP, except what every TP rank keeps whole: norms, the router, MLA's q/kv
  down-projections (duplicated, megatron_r1.model) and learned position embeddings;
* weights: 2 bytes per parameter with ``--bf16``, else 4;
* gradients: 4 bytes (fp32 grad buffers), 2 with ``--grad-reduce-in-bf16``, not sharded;
* optimizer: an fp32 master copy under ``--bf16`` (4 bytes) plus Adam's two moments or Lion's one
  (4 bytes each); ``--use-distributed-optimizer`` shards these over the data-parallel ranks:
  DP for the dense parameters, expert-DP (world / (ETP x EP x PP)) for the experts.

**Activations** kept for backward, per token of a micro-batch of ``micro_batch_size x seq_length``
tokens (after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", with fused attention, so no s x s score matrix is stored):

* per layer: the inputs of the two norms and of the attention and MLP/MoE blocks (hidden each,
  divided by TP under sequence parallelism); attention's Q, K, V and output (GQA or MLA heads,
  divided by TP) plus MLA's compressed q/kv latents; the dense MLP's fc1 output and activation
  (divided by TP); for MoE, the fp32 router logits and scores, and per routed token copy (top-k
  of them, balanced over the expert ranks) its input on each of ETP ranks and the expert's fc1
  output and activation; 1-byte dropout masks when dropout is on;
* recomputation: ``full`` keeps only each recompute group's input (``uniform``: groups of
  ``--recompute-num-layers``; ``block``: that many layers per model chunk recomputed, the rest
  kept whole) plus, transiently, one group's full activations; ``selective`` recomputes core
  attention, which fused attention does not store anyway, so it costs what no recomputation does;
* pipeline: a rank of stage ``p`` holds its layers' activations for as many micro-batches as
  megatron-core's 1F1B schedule keeps in flight there: ``min(PP - p, micro-batches)``, or with
  interleaving ``2 (PP - p - 1) + (VPP - 1) PP + 1`` model-chunk passes;
* the last stage adds, for one micro-batch, the output layer's input, the logits (activation
  dtype) and the fp32 softmax the cross entropy keeps, and each MTP layer's activations and logits.

**GRPO** (a namespace with grpo_r1.py's flags, megatron_r1.rl.arguments), which runs its rollouts
in the training processes and layout, then updates on them:

* MTP layers are held but frozen (GRPO trains the next-token policy): no gradients or optimizer
  states for them. With ``--lora`` the gradients and optimizer states are still counted for every
  parameter: an upper bound (only the adapters train);
* the reference policy of the KL term: a second copy of the weights as the policy's are sharded,
  without MTP layers, in the training dtype, with no gradients or optimizer states; none with
  ``--kl-coef 0`` (no KL term) or ``--lora`` (the base model is the policy with its adapters off);
* the rollout's KV cache: megatron-core's StaticInferenceContext for one rollout batch at a time
  (megatron_r1.rl.rollout: the ``--grpo-group-size`` groups of a rank's prompts of one length, up to
  ``--rollout-batch-size`` sequences in whole groups, at least one; with 0 all of the rank's share
  of the step's prompts; counted as if their lengths were equal), each sequence up to
  ``--seq-length`` tokens (prompt + ``--max-response-length``), for each of the stage's decoder
  layers, each token keeping the K and V that
  ``Attention._allocate_memory`` allocates on one TP rank: ``max(1, query groups / TP)`` groups of
  ``kv_channels`` each for GQA/MHA; for MLA each of the ``heads / TP`` heads' up-projected K
  (``qk_head_dim + qk_pos_emb_head_dim``) and V (``v_head_dim``), since megatron-core caches the
  compressed latent (``cache_mla_latents``) only in its dynamic inference context;
* the rollout's activations: the prefill's logits over the whole (padded) vocabulary, gathered over
  TP, for the batch's prompt tokens (up to ``--seq-length - --max-response-length`` each), held twice
  while megatron-core copies them to batch-first, or one layer's prefill activations (sequence
  parallelism off) when those are larger;
* rollouts and updates take turns: the KV cache and the rollout's activations are freed before the
  update's activations are made, so the total counts the larger of the two phases.

Not counted: the CUDA context, NCCL and communication buffers, temporary tensors and allocator
fragmentation (together a few GB per GPU), so leave headroom.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from megatron_r1.flops import _layer, _norm, human_count, moe_layer_pattern, padded_vocab_size
from megatron_r1.layout import ParallelSizes, StageContents, pipeline_stages

GB = 1e9
_FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage."""

    contents: StageContents
    dense_params: float  # parameters of this rank outside the routed experts
    expert_params: float  # routed-expert parameters of this rank
    weights: int
    gradients: int
    optimizer: int
    activations: int
    in_flight: int  # micro-batches (model-chunk passes with interleaving) whose activations are held
    rollout: RolloutMemory | None = None  # GRPO's

    @property
    def total(self) -> int:
        persistent = self.weights + self.gradients + self.optimizer
        if self.rollout is None:
            return persistent + self.activations
        # Rollouts and updates take turns: the KV cache is freed before the update's activations exist.
        return persistent + self.rollout.reference + max(self.activations, self.rollout.peak)


@dataclasses.dataclass(frozen=True)
class RolloutMemory:
    """GRPO's bytes on one GPU of a pipeline stage besides the policy's training state."""

    reference: int  # the reference policy's weights (0: none)
    prompts: int  # prompts whose groups one rollout batch decodes together
    sequences: int  # the batch's sequences: prompts x --grpo-group-size
    kv_cache: int  # one rollout batch's static KV cache over the stage's layers
    activations: int  # the prefill's gathered logits (x2), or one layer's prefill activations if larger
    kv_values_per_token: int  # K and V values one layer caches per token on one TP rank
    prompt_length: int  # the longest prompt a rollout prefills
    activations_are_logits: bool  # else one layer's prefill activations

    @property
    def peak(self) -> int:
        return self.kv_cache + self.activations


def _mla_down_projections(args) -> int:
    if not args.multi_latent_attention:
        return 0
    q_down = args.hidden_size * args.q_lora_rank if args.q_lora_rank else 0
    return q_down + args.hidden_size * (args.kv_lora_rank + args.qk_pos_emb_head_dim)


def _layer_params(args, layer: int, sizes: ParallelSizes) -> tuple[float, float]:
    """(dense, expert) parameters of (0-based) decoder layer ``layer`` on one rank."""
    is_moe = moe_layer_pattern(args)[layer]
    counts = _layer(args, is_moe, layer + 1)
    expert = counts["routed_experts"].total if is_moe else 0
    replicated = counts["norms"].total + (counts["router"].total if is_moe else 0) + _mla_down_projections(args)
    split = sum(count.total for count in counts.values()) - expert - replicated
    return replicated + split / sizes.tp, expert / (sizes.ep * sizes.etp)


def stage_params(args, stage: StageContents, sizes: ParallelSizes, with_mtp: bool = True) -> tuple[float, float]:
    """(dense, expert) parameters on one rank of ``stage`` (``with_mtp=False``: without its MTP layers)."""
    hidden, vocab = args.hidden_size, padded_vocab_size(args)
    dense = expert = 0.0
    for layer in stage.layers:
        layer_dense, layer_expert = _layer_params(args, layer, sizes)
        dense, expert = dense + layer_dense, expert + layer_expert
    word_embedding = vocab * hidden / sizes.tp  # vocabulary-parallel
    if stage.embedding:
        dense += word_embedding
        if args.position_embedding_type == "learned_absolute":
            dense += args.max_position_embeddings * hidden
    if stage.output_layer:
        dense += _norm(hidden, args.normalization).total  # final norm
        if args.untie_embeddings_and_output_weights or not stage.embedding:
            dense += word_embedding  # the output layer, or the tied embedding's copy on the last stage
    for _ in range(stage.mtp_layers if with_mtp else 0):
        layer_dense, layer_expert = _layer_params(args, args.num_layers - 1, sizes)  # MTP: the last layer's kind
        norms = 3 * _norm(hidden, args.normalization).total  # enorm, hnorm, final norm
        dense += layer_dense + norms + 2 * hidden * hidden / sizes.tp  # eh_proj, column-parallel
        expert += layer_expert
    return dense, expert


def _activation_bytes(args) -> int:
    return 2 if args.bf16 else 4


def layer_activation_bytes_per_token(args, is_moe: bool, sizes: ParallelSizes) -> float:
    """Bytes one transformer layer keeps for backward per token of a micro-batch, on one rank."""
    element = _activation_bytes(args)
    hidden, heads, tp = args.hidden_size, args.num_attention_heads, sizes.tp
    sequence_split = tp if args.sequence_parallel else 1
    # Inputs of input_layernorm, the attention block, pre_mlp_layernorm and the MLP/MoE block.
    total = 4 * hidden * element / sequence_split
    if args.hidden_dropout > 0:
        total += 2 * hidden / sequence_split  # 1-byte masks after attention and MLP
    if args.multi_latent_attention:
        q_dim = args.qk_head_dim + args.qk_pos_emb_head_dim
        latents = 2 * (args.q_lora_rank or 0) + 2 * args.kv_lora_rank + args.qk_pos_emb_head_dim
        total += latents * element  # the down-projections' outputs and their norms' outputs, per TP rank
        total += heads * (2 * q_dim + 2 * args.v_head_dim) * element / tp  # Q, K, V, attention output
    else:
        kv_channels = args.kv_channels or hidden // heads
        groups = args.num_query_groups or heads
        total += (2 * heads + 2 * groups) * kv_channels * element / tp
    gate = 2 if args.swiglu else 1  # fc1 output width per intermediate unit

    def mlp(ffn_hidden_size):  # fc1 output and activation output
        return (gate + 1) * ffn_hidden_size * element

    if not is_moe:
        return total + mlp(args.ffn_hidden_size or 4 * hidden) / tp
    total += 2 * args.num_experts * _FP32_BYTES / sequence_split  # router logits and scores
    expert_ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size or 4 * hidden
    # Balanced routing: the world holds DP x tokens x top-k copies; each copy's input is kept on its
    # ETP ranks and its fc1/activation outputs split over them; per rank that is this over TP.
    total += args.moe_router_topk * (sizes.etp * hidden * element + mlp(expert_ffn)) / tp
    if args.moe_shared_expert_intermediate_size:
        total += mlp(args.moe_shared_expert_intermediate_size) / tp
    return total


def _head_activation_bytes_per_token(args, sizes: ParallelSizes, vocab: int) -> float:
    """The last stage's output layer and loss (and MTP layers) for one micro-batch."""
    element = _activation_bytes(args)
    sequence_split = sizes.tp if args.sequence_parallel else 1
    hidden_input = args.hidden_size * element / sequence_split
    logits = vocab / sizes.tp * (element + _FP32_BYTES)  # logits and the cross entropy's fp32 softmax
    total = 2 * hidden_input + logits  # final norm and output layer inputs
    mtp_layer = (
        5 * hidden_input  # the shifted tokens' embedding, enorm and hnorm inputs, eh_proj's 2-wide input
        + layer_activation_bytes_per_token(args, moe_layer_pattern(args)[-1], sizes)
        + 2 * hidden_input
        + logits  # final norm, output layer, logits again
    )
    return total + (args.mtp_num_layers or 0) * mtp_layer


def in_flight_microbatches(sizes: ParallelSizes, stage: int, num_microbatches: int) -> int:
    """Forward passes whose activations a rank of ``stage`` holds at the peak of megatron-core's 1F1B
    schedule: its warm-up forwards plus the steady state's one (model-chunk passes when interleaved)."""
    if sizes.vpp == 1:
        warmup = sizes.pp - stage - 1
    else:
        warmup = 2 * (sizes.pp - stage - 1) + (sizes.vpp - 1) * sizes.pp
    return min(warmup + 1, num_microbatches * sizes.vpp)


def _stage_activation_bytes_per_token(args, stage: StageContents, sizes: ParallelSizes, in_flight: int) -> float:
    """Activations of a rank of ``stage`` over its in-flight micro-batches, per token of one."""
    pattern = moe_layer_pattern(args)
    input_bytes = args.hidden_size * _activation_bytes(args) / (sizes.tp if args.sequence_parallel else 1)
    per_chunk = len(stage.layers) // sizes.vpp
    stored = transient = 0.0
    for first in range(0, len(stage.layers), per_chunk):  # each model chunk
        full = [
            layer_activation_bytes_per_token(args, pattern[layer], sizes)
            for layer in stage.layers[first : first + per_chunk]
        ]
        if args.recompute_granularity != "full":
            stored += sum(full)
            continue
        group = args.recompute_num_layers or 1
        if args.recompute_method == "block":  # the first `group` layers recomputed one by one
            recomputed = min(group, len(full))
            stored += recomputed * input_bytes + sum(full[recomputed:])
            transient = max([transient] + full[:recomputed])
        else:  # uniform: groups of `group` layers keep their input only
            groups = [full[i : i + group] for i in range(0, len(full), group)]
            stored += len(groups) * input_bytes
            transient = max([transient] + [sum(g) for g in groups])
    total = in_flight * stored / sizes.vpp + transient
    if stage.output_layer:
        total += _head_activation_bytes_per_token(args, sizes, padded_vocab_size(args))
    return total


def is_grpo(args) -> bool:
    """Whether ``args`` holds grpo_r1.py's flags (megatron_r1.rl.arguments.add_grpo_arguments)."""
    return hasattr(args, "grpo_group_size")


def _query_groups_per_rank(args, sizes: ParallelSizes) -> int:
    """megatron-core's num_query_groups_per_partition: one per rank when there are fewer than TP ranks."""
    groups = args.num_query_groups or args.num_attention_heads
    return 1 if groups < sizes.tp else groups // sizes.tp


def kv_cache_values_per_token(args, sizes: ParallelSizes) -> int:
    """K and V values one layer's static KV cache keeps per token on one TP rank: megatron-core's
    Attention._allocate_memory allocates [length, batch, query groups per partition, width] for each
    (MLA: one group per head)."""
    per_partition = _query_groups_per_rank(args, sizes)
    if args.multi_latent_attention:
        # Each head's up-projected K and V: megatron-core caches MLA's compressed latent
        # (cache_mla_latents) only in its dynamic inference context, not in the static one rollouts use.
        return per_partition * (args.qk_head_dim + args.qk_pos_emb_head_dim + args.v_head_dim)
    kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    return per_partition * 2 * kv_channels


def rollout_batch_prompts(args, sizes: ParallelSizes) -> int:
    """Prompts whose groups a rank decodes together at most (megatron_r1.rl.rollout batches prompts
    of one length; at worst all have the same)."""
    share, limit = args.grpo_prompts_per_step // sizes.dp, args.rollout_batch_size
    return share if limit == 0 else min(share, max(limit // args.grpo_group_size, 1))


def rollout_memory(args, stage: StageContents, sizes: ParallelSizes) -> RolloutMemory:
    """GRPO's reference policy, KV cache and rollout activations on one rank of ``stage``."""
    element = _activation_bytes(args)
    prompts = rollout_batch_prompts(args, sizes)
    sequences, prompt = prompts * args.grpo_group_size, args.seq_length - args.max_response_length
    values = kv_cache_values_per_token(args, sizes)
    reference = 0.0
    if args.kl_coef > 0 and not args.lora:  # --lora: the policy with its adapters off; no copy
        reference = sum(stage_params(args, stage, sizes, with_mtp=False)) * (2 if args.bf16 else 4)
    decoding = copy.copy(args)
    decoding.sequence_parallel = False  # one new token cannot be split over TP ranks: rollouts decode without it
    pattern = moe_layer_pattern(args)
    layer = max((layer_activation_bytes_per_token(decoding, pattern[i], sizes) for i in stage.layers), default=0)
    # The prefill's logits for every prompt position, gathered to the whole vocabulary on each TP
    # rank, exist twice while GPTModel copies them to batch-first.
    logits = 2 * sequences * prompt * padded_vocab_size(args) * element if stage.output_layer else 0
    return RolloutMemory(
        reference=math.ceil(reference),
        prompts=prompts,
        sequences=sequences,
        kv_cache=sequences * args.seq_length * len(stage.layers) * values * element,
        activations=math.ceil(max(logits, layer * sequences * prompt)),
        kv_values_per_token=values,
        prompt_length=prompt,
        activations_are_logits=logits >= layer * sequences * prompt,
    )


def estimate_memory(args) -> list[StageMemory]:
    """Per-GPU memory of each pipeline stage, from a namespace ``validate_args`` has filled (with
    GRPO's rollouts and reference policy when it holds grpo_r1.py's flags)."""
    sizes = ParallelSizes.from_args(args)
    grpo = is_grpo(args)
    weight_bytes = 2 if args.bf16 else 4
    states = 1 if args.optimizer == "lion" else 2
    optimizer_bytes = _FP32_BYTES * (states + (1 if args.bf16 else 0))  # moments (+ fp32 master weights)
    dense_shards, expert_shards = (sizes.dp, sizes.expert_dp) if args.use_distributed_optimizer else (1, 1)
    tokens = args.micro_batch_size * args.seq_length
    stages = []
    for contents in pipeline_stages(args, sizes):
        dense, expert = stage_params(args, contents, sizes)
        # GRPO freezes the MTP layers (it trains the next-token policy): no gradients or optimizer states.
        trained_dense, trained_expert = stage_params(args, contents, sizes, with_mtp=not grpo)
        in_flight = in_flight_microbatches(sizes, contents.stage, args.num_microbatches)
        activations = _stage_activation_bytes_per_token(args, contents, sizes, in_flight) * tokens
        stages.append(
            StageMemory(
                contents=contents,
                dense_params=dense,
                expert_params=expert,
                weights=math.ceil((dense + expert) * weight_bytes),
                gradients=math.ceil(
                    (trained_dense + trained_expert) * (2 if args.grad_reduce_in_bf16 else _FP32_BYTES)
                ),
                optimizer=(
                    math.ceil(trained_dense * optimizer_bytes / dense_shards)
                    + math.ceil(trained_expert * optimizer_bytes / expert_shards)
                ),
                activations=math.ceil(activations),
                in_flight=in_flight,
                rollout=rollout_memory(args, contents, sizes) if grpo else None,
            )
        )
    return stages


def peak_stage(stages: list[StageMemory]) -> StageMemory:
    return max(stages, key=lambda stage: stage.total)


def memory_table(args, stages: list[StageMemory]) -> str:
    """Per stage: parameters per GPU and GB of weights, gradients, optimizer states and activations
    (and GRPO's reference policy, KV cache and rollout activations), then what the figures assume."""
    grpo = is_grpo(args)
    header = ["stage", "dense params", "expert params", "weights", "grads", "optimizer", "activations"]
    rows = [tuple(header + (["reference", "KV cache", "rollout act."] if grpo else []) + ["total GB"])]
    for stage in stages:
        values = [stage.weights, stage.gradients, stage.optimizer, stage.activations]
        if grpo:
            values += [stage.rollout.reference, stage.rollout.kv_cache, stage.rollout.activations]
        counts = (str(stage.contents.stage), human_count(stage.dense_params), human_count(stage.expert_params))
        rows.append((*counts, *(f"{value / GB:.2f}" for value in values + [stage.total])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["memory per GPU (GB = 1e9 bytes):"]
    lines += ["  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    sizes = ParallelSizes.from_args(args)
    optimizer = ("fp32 master weights + " if args.bf16 else "") + (
        "Lion momentum" if args.optimizer == "lion" else "Adam moments"
    )
    sharding = (
        f"sharded over DP {sizes.dp} (experts: expert-DP {sizes.expert_dp})"
        if args.use_distributed_optimizer
        else "not sharded (no --use-distributed-optimizer)"
    )
    if args.recompute_granularity == "full":
        method, group = args.recompute_method or "uniform", args.recompute_num_layers or 1
        recompute = f"full recomputation ({method}, {group} layer(s))"
    else:
        recompute = f"{args.recompute_granularity or 'no'} recomputation"
    gradients = "bf16" if args.grad_reduce_in_bf16 else "fp32"
    lines += [
        f"  weights {'bf16' if args.bf16 else 'fp32'}, gradients {gradients}; optimizer: {optimizer}, {sharding}",
        f"  activations: micro-batch {args.micro_batch_size} x {args.seq_length} tokens, {recompute}, "
        f"{stages[0].in_flight} in flight on stage 0 ({args.num_microbatches} micro-batches per step)",
    ]
    if grpo:
        lines += grpo_lines(args, stages)
    lines.append("  not counted: CUDA context, communication buffers, temporaries, fragmentation (a few GB)")
    return "\n".join(lines)


def _reference_line(args, rollout: RolloutMemory) -> str:
    if args.kl_coef == 0:
        return "reference policy: none (--kl-coef 0: no KL term)"
    if args.lora:
        return "reference policy: none (--lora: the policy with its adapters off)"
    dtype = "bf16" if args.bf16 else "fp32"
    return (
        f"reference policy: {rollout.reference / GB:.2f} GB ({dtype} weights sharded as the policy's, without MTP "
        f"layers; no grads or optimizer states; --kl-coef {args.kl_coef:g})"
    )


def grpo_lines(args, stages: list[StageMemory]) -> list[str]:
    """GRPO's figures, for the report under the memory table."""
    dtype = "bf16" if args.bf16 else "fp32"
    sizes = ParallelSizes.from_args(args)
    if args.multi_latent_attention:
        width = (
            f"MLA: {_query_groups_per_rank(args, sizes)} heads x (K {args.qk_head_dim + args.qk_pos_emb_head_dim} + V {args.v_head_dim}), "
            "not the compressed latent: megatron-core's static cache keeps K and V per head"
        )
    else:
        width = "K and V of the query groups on a TP rank"
    frozen = ["MTP layers frozen (no grads or optimizer states)"] if args.mtp_num_layers else []
    if args.lora:  # only the adapters train; counting their grads and states alone is not done yet
        frozen.append("--lora counted with grads and optimizer states for the base weights too (an upper bound)")
    lines = ["  GRPO: " + ("; ".join(frozen) if frozen else "every parameter trains")]
    lines.append(
        "  GRPO: FLOPs/iteration below are one update of the batch as pre-training counts it"
        + (" (with MTP, which GRPO skips)" if args.mtp_num_layers else "")
        + ", without the rollouts, the old/reference log-prob forwards or more --grpo-iterations"
    )
    for stage in stages:
        rollout = stage.rollout
        prefix = f"  stage {stage.contents.stage} " if len(stages) > 1 else "  "
        kind = (
            f"the prefill's logits over {padded_vocab_size(args):,} vocabulary entries, gathered over TP, x2"
            if rollout.activations_are_logits
            else "one layer's prefill activations, sequence parallelism off"
        )
        batch = f"{rollout.sequences} sequences ({rollout.prompts} prompt(s) x group {args.grpo_group_size})"
        lines += [
            prefix + _reference_line(args, rollout),
            f"{prefix}rollout KV cache: {rollout.kv_cache / GB:.2f} GB ({batch} x {args.seq_length} tokens of prompt + "
            f"response x {len(stage.contents.layers)} layers x {rollout.kv_values_per_token:,} {dtype} values per "
            f"token: {width})",
            f"{prefix}rollout activations: {rollout.activations / GB:.2f} GB ({kind}; {batch} x prompts of up to "
            f"{rollout.prompt_length} tokens: --seq-length {args.seq_length} - --max-response-length "
            f"{args.max_response_length})",
            f"{prefix}rollout (KV cache + activations) {rollout.peak / GB:.2f} GB and update activations "
            f"{stage.activations / GB:.2f} GB take turns: the total counts the larger",
        ]
    return lines
