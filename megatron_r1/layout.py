"""Which ranks hold what under a parallel layout, from the flags alone (no process group): the
tensor / data / pipeline / expert groups as megatron-core's ``RankGenerator`` numbers them (order
``tp-cp-ep-dp-pp``: tensor-parallel ranks are adjacent, so a TP group that fits a node stays in
it), and the decoder layers, embedding, output layer and MTP layers of each pipeline stage."""

from __future__ import annotations

import dataclasses

from megatron.core.parallel_state import RankGenerator
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from megatron_r1.flops import moe_layer_pattern

# megatron-core's default; initialize_model_parallel is called with it (megatron_r1.distributed).
RANK_ORDER = "tp-cp-ep-dp-pp"


@dataclasses.dataclass(frozen=True)
class ParallelSizes:
    world: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int
    vpp: int  # model chunks per pipeline rank (1: no interleaving)

    @classmethod
    def from_args(cls, args) -> ParallelSizes:
        """From a namespace that ``megatron_r1.arguments.validate_args`` has filled."""
        tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
        etp = args.expert_tensor_parallel_size or tp
        return cls(
            world=args.world_size,
            tp=tp,
            pp=pp,
            dp=args.data_parallel_size,
            ep=ep,
            etp=etp,
            expert_dp=args.world_size // (etp * ep * pp),
            vpp=args.virtual_pipeline_model_parallel_size or 1,
        )

    def dense_groups(self, kind: str) -> list[list[int]]:
        """All groups of ``kind`` ("tp", "dp" or "pp") of the attention / dense part."""
        return RankGenerator(tp=self.tp, ep=1, dp=self.dp, pp=self.pp, cp=1, order=RANK_ORDER).get_ranks(kind)

    def expert_groups(self, kind: str) -> list[list[int]]:
        """All groups of ``kind`` ("tp" = expert-tensor, "ep", "dp" = expert-data) of the experts."""
        generator = RankGenerator(tp=self.etp, ep=self.ep, dp=self.expert_dp, pp=self.pp, cp=1, order=RANK_ORDER)
        return generator.get_ranks(kind)


@dataclasses.dataclass(frozen=True)
class StageContents:
    """What each rank of one pipeline stage holds (all its virtual-pipeline chunks)."""

    stage: int
    ranks: list[int]
    layers: list[int]  # decoder layer indices, 0-based
    moe_layers: int
    embedding: bool
    output_layer: bool  # the final norm and output layer (and, tied and PP > 1, a copy of the embedding)
    mtp_layers: int


def decoder_layers_per_stage(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers of each pipeline stage, as megatron-core splits them: ``first`` / ``last``
    (--decoder-first/last-pipeline-num-layers) on the end stages when given, the rest evenly over
    the other stages. ValueError, naming the flags, when that is not possible."""
    counts = [None] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    given = [count for count in counts if count is not None]
    if any(count <= 0 for count in given):
        raise ValueError("--decoder-first/last-pipeline-num-layers must be positive")
    rest, even_stages = num_layers - sum(given), counts.count(None)
    splits = (rest > 0 and rest % even_stages == 0) if even_stages else rest == 0
    if not splits:
        named = (f" minus --decoder-first-pipeline-num-layers ({first})" if first is not None else "") + (
            f" minus --decoder-last-pipeline-num-layers ({last})" if last is not None else ""
        )
        raise ValueError(
            f"--num-layers ({num_layers}){named} leaves {rest} layers, which do not split evenly over "
            f"the other {even_stages} of --pipeline-model-parallel-size ({pp}) stages"
        )
    return [rest // even_stages if count is None else count for count in counts]


def pipeline_stages(args, sizes: ParallelSizes) -> list[StageContents]:
    """The model is cut into PP x VPP chunks of consecutive layers and rank ``p`` holds chunks
    ``p, p + PP, ...``: evenly, or as --decoder-first/last-pipeline-num-layers (``decoder_layers_per_stage``)
    or --pipeline-model-parallel-layout say. The first chunk has the embedding, the last the output
    layer and the MTP layers."""
    chunks = _chunk_contents(args, sizes)
    pattern = moe_layer_pattern(args)
    stage_ranks = sizes.dense_groups("pp")
    stages, first_layer = [[] for _ in range(sizes.pp)], 0
    for chunk, (decoder_layers, _) in enumerate(chunks):  # in layer order: stage chunk % PP
        stages[chunk % sizes.pp] += range(first_layer, first_layer + decoder_layers)
        first_layer += decoder_layers
    return [
        StageContents(
            stage=stage,
            ranks=[group[stage] for group in stage_ranks],
            layers=layers,
            moe_layers=sum(pattern[layer] for layer in layers),
            embedding=stage == 0,
            output_layer=stage == sizes.pp - 1,
            mtp_layers=sum(mtp for _, mtp in chunks[stage :: sizes.pp]),
        )  # fmt: skip
        for stage, layers in enumerate(stages)
    ]


def _chunk_contents(args, sizes: ParallelSizes) -> list[tuple[int, int]]:
    """(decoder layers, MTP layers) of each of the PP x VPP model chunks, in layer order."""
    if args.pipeline_model_parallel_layout:
        layout = PipelineParallelLayerLayout(args.pipeline_model_parallel_layout, sizes.pp)
        return [
            (
                layout.layout[chunk % sizes.pp][chunk // sizes.pp].count(LayerType.decoder),
                layout.layout[chunk % sizes.pp][chunk // sizes.pp].count(LayerType.mtp),
            )
            for chunk in range(sizes.pp * sizes.vpp)
        ]
    if sizes.vpp > 1:
        per_chunk = [args.num_layers // (sizes.pp * sizes.vpp)] * (sizes.pp * sizes.vpp)
    else:
        per_chunk = decoder_layers_per_stage(
            args.num_layers, sizes.pp, args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
        )
    mtp = [0] * (len(per_chunk) - 1) + [args.mtp_num_layers or 0]
    return list(zip(per_chunk, mtp))


def format_ranks(ranks: list[int]) -> str:
    """[0..7] -> '0-7'; [0, 8, ..., 1016] -> '0, 8, ..., 1016 (128 ranks)'; short lists in full."""
    if len(ranks) == 1:
        return str(ranks[0])
    step = ranks[1] - ranks[0]
    arithmetic = all(b - a == step for a, b in zip(ranks, ranks[1:]))
    if arithmetic and step == 1:
        return f"{ranks[0]}-{ranks[-1]}"
    if arithmetic and len(ranks) > 4:
        return f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]} ({len(ranks)} ranks)"
    return ", ".join(map(str, ranks))


def _layer_ranges(layers: list[int]) -> str:
    ranges, start = [], layers[0]
    for previous, layer in zip(layers, layers[1:] + [None]):
        if layer != previous + 1:
            ranges.append(str(start) if start == previous else f"{start}-{previous}")
            start = layer
    return ", ".join(ranges)


def _group_of(groups: list[list[int]], rank: int) -> list[int]:
    return next(group for group in groups if rank in group)


def describe_layout(args, gpus_per_node: int) -> str:
    """The layout as text: sizes, rank 0's groups, each pipeline stage's ranks and contents, where the
    experts live, and warnings for groups that cross nodes."""
    sizes = ParallelSizes.from_args(args)
    nodes = -(-sizes.world // gpus_per_node)
    lines = [
        f"parallel layout: {sizes.world} processes ({nodes} node{'s' if nodes > 1 else ''} x {gpus_per_node})",
        f"  attention/dense: TP {sizes.tp} x PP {sizes.pp} x DP {sizes.dp}"
        + (f", {sizes.vpp} virtual pipeline chunks per rank" if sizes.vpp > 1 else ""),
        f"  sequence parallel {'on' if args.sequence_parallel else 'off'}, distributed optimizer "
        f"{'on' if args.use_distributed_optimizer else 'off'}",
    ]
    groups = {"TP": sizes.dense_groups("tp"), "DP": sizes.dense_groups("dp"), "PP": sizes.dense_groups("pp")}
    if args.num_experts:
        local = args.num_experts // sizes.ep
        held = f"experts {local}k to {local}k+{local - 1}" if local > 1 else "expert k"
        lines.append(
            f"  experts: ETP {sizes.etp} x EP {sizes.ep} x expert-DP {sizes.expert_dp} x PP {sizes.pp}; "
            f"{local} of {args.num_experts} per EP rank (EP rank k holds {held})"
        )
        groups.update(EP=sizes.expert_groups("ep"), ETP=sizes.expert_groups("tp"), EDP=sizes.expert_groups("dp"))
    lines.append(
        "  rank 0's groups: " + "; ".join(f"{name} [{format_ranks(_group_of(g, 0))}]" for name, g in groups.items())
    )
    for stage in pipeline_stages(args, sizes):
        held = [f"layers {_layer_ranges(stage.layers)} ({len(stage.layers) - stage.moe_layers} dense, "
                f"{stage.moe_layers} MoE)"]  # fmt: skip
        if stage.embedding:
            held.append("embedding")
        if stage.output_layer:
            held.append("output layer")
        if stage.mtp_layers:
            held.append(f"{stage.mtp_layers} MTP layer{'s' if stage.mtp_layers > 1 else ''}")
        lines.append(f"  pipeline stage {stage.stage} (ranks {format_ranks(stage.ranks)}): " + ", ".join(held))
    for name, size in (("tensor-parallel", sizes.tp), ("expert-tensor-parallel", sizes.etp)):
        if size > gpus_per_node or gpus_per_node % size:
            lines.append(
                f"  warning: {name} groups of {size} cross node boundaries ({gpus_per_node} GPUs per "
                "node): their all-reduces would run over the inter-node network"
            )
    return "\n".join(lines)
