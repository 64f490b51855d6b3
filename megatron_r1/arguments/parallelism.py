"""Parallelism flags: tensor, pipeline (uneven, interleaved or by layout) and expert parallelism,
sequence parallelism, the distributed optimizer and its overlaps, and activation recomputation.

Derived values, written by :func:`validate` only: ``world_size`` (from $WORLD_SIZE),
``data_parallel_size``, ``virtual_pipeline_model_parallel_size`` (None without interleaving),
``num_layers_per_virtual_pipeline_stage`` (also from --num-virtual-stages-per-pipeline-rank) and
``sequence_parallel`` (off with one tensor-parallel rank, as Megatron-LM does)."""

import argparse
import os

from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from megatron_r1 import compat
from megatron_r1.layout import decoder_layers_per_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    _add_layout_arguments(group)
    _add_communication_arguments(group)
    _add_recompute_arguments(group)


def _add_layout_arguments(group) -> None:
    """How the model is split over the ranks."""
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)
    group.add_argument(
        "--expert-tensor-parallel-size", type=int, default=None, help="default: the tensor-parallel size"
    )
    group.add_argument(
        "--decoder-first-pipeline-num-layers",
        type=int,
        default=None,
        help="decoder layers on the first pipeline stage; the stages without a given number "
        "share the rest evenly (e.g. DeepSeek-V3's 61 layers)",
    )
    group.add_argument(
        "--decoder-last-pipeline-num-layers",
        type=int,
        default=None,
        help="decoder layers on the last pipeline stage (which also holds the output layer and the MTP layers)",
    )
    group.add_argument(
        "--pipeline-model-parallel-layout",
        default=None,
        metavar="LAYOUT",
        help="the layers of every pipeline stage, as Megatron-LM writes them: E embedding, t decoder "
        "layer, m MTP layer, L loss, | between stages (PP x virtual stages, in layer order), "
        "(...)*n repeats; e.g. DeepSeek-V3 on PP 16 x 2 virtual stages: Et|(tt|)*30mL",
    )
    group.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="interleaved 1F1B: each rank holds num_layers / (PP x this) model chunks",
    )
    group.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="interleaved 1F1B, the other way to say it: model chunks per pipeline rank",
    )
    group.add_argument("--sequence-parallel", action="store_true")


def _add_communication_arguments(group) -> None:
    """Collectives' timeout, the distributed optimizer and the overlaps of its communication."""
    group.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10,
        help="how long a collective may wait for the other ranks before the run fails (raise "
        "it when loading or saving checkpoints on a slow file system takes longer)",
    )
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument(
        "--overlap-grad-reduce", action="store_true", help="reduce each gradient bucket while the backward pass goes on"
    )
    group.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="with the distributed optimizer: all-gather the updated parameters during the "
        "next forward pass, bucket by bucket, instead of after the optimizer step",
    )


def _add_recompute_arguments(group) -> None:
    """Activation recomputation."""
    group.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    group.add_argument(
        "--recompute-activations",
        dest="recompute_granularity",
        action="store_const",
        const="selective",
        help="Megatron-LM's older spelling of --recompute-granularity selective",
    )
    group.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    group.add_argument("--recompute-num-layers", type=int, default=None)
    group.add_argument(
        "--recompute-modules",
        nargs="+",
        default=None,
        choices=["core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "moe_act", "shared_experts"],
        help="with --recompute-granularity selective: the submodules whose activations are "
        "recomputed in the backward pass (default: core_attn)",
    )


def validate(args, error) -> None:
    """The parallel layout against the world size and the model's layers and experts, and the only
    place the parallelism's derived values are written."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.data_parallel_size = _data_parallel_size(args, error)
    args.num_layers_per_virtual_pipeline_stage, args.virtual_pipeline_model_parallel_size = _pipeline_chunks(
        args, error
    )
    _check_recompute(args, error)
    if args.distributed_timeout_minutes <= 0:
        error(f"--distributed-timeout-minutes ({args.distributed_timeout_minutes:g}) must be positive")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        error("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    _check_expert_parallelism(args, error)
    # Nothing to split with one tensor-parallel rank; as Megatron-LM does.
    args.sequence_parallel = args.sequence_parallel and args.tensor_model_parallel_size > 1


def _data_parallel_size(args, error) -> int:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size % (tp * pp):
        error(
            f"world size {args.world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp})"
        )
    return args.world_size // (tp * pp)


def _pipeline_chunks(args, error) -> tuple[int | None, int | None]:
    """Which decoder layers each pipeline stage (and virtual-pipeline chunk) holds: an even split,
    --decoder-first/last-pipeline-num-layers, or Megatron-LM's --pipeline-model-parallel-layout.
    Returns (num_layers_per_virtual_pipeline_stage, virtual_pipeline_model_parallel_size), the
    latter None without interleaving."""
    pp = args.pipeline_model_parallel_size
    uneven = args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None
    virtual = args.num_layers_per_virtual_pipeline_stage or args.num_virtual_stages_per_pipeline_rank
    if args.pipeline_model_parallel_layout:
        if uneven or virtual:
            error(
                "--pipeline-model-parallel-layout places every layer: not with "
                "--decoder-first/last-pipeline-num-layers, --num-layers-per-virtual-pipeline-stage or "
                "--num-virtual-stages-per-pipeline-rank"
            )
        return args.num_layers_per_virtual_pipeline_stage, _layout_virtual_stages(args, error)
    if uneven:
        if pp == 1 or virtual:
            error(
                "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1 and no virtual "
                "pipeline (for both: --pipeline-model-parallel-layout)"
            )
        try:
            decoder_layers_per_stage(
                args.num_layers, pp, args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
            )
        except ValueError as exc:
            error(str(exc))
    elif args.num_layers % pp:
        error(
            f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp}); "
            "or split it unevenly with --decoder-first/last-pipeline-num-layers"
        )
    return _interleaved_chunks(args, error)


def _layout_virtual_stages(args, error) -> int | None:
    """The virtual pipeline size that --pipeline-model-parallel-layout gives (None for one)."""
    layout = _parse_pipeline_layout(args, error)
    vpp = layout.virtual_pipeline_model_parallel_size
    if args.pipeline_model_parallel_size == 1 and vpp > 1:
        error(
            f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout}: {vpp} stages need "
            "--pipeline-model-parallel-size > 1"
        )
    return vpp if vpp > 1 else None


def _parse_pipeline_layout(args, error) -> PipelineParallelLayerLayout:
    """--pipeline-model-parallel-layout, parsed and checked by megatron-core; MTP layers must sit with
    the loss (on the last stage)."""
    flag = f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout}"
    try:
        layout = PipelineParallelLayerLayout(args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size)
        mtp_apart = layout.validate_layer_layout(args.num_layers, args.mtp_num_layers)
    except (AssertionError, ValueError) as exc:
        error(
            f"{flag}: {exc} (--num-layers {args.num_layers}, --mtp-num-layers {args.mtp_num_layers or 0}, "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size})"
        )
    if mtp_apart:
        error(f"{flag}: the MTP layers (m) must be on the last pipeline stage, with the loss (L)")
    return layout


def _interleaved_chunks(args, error) -> tuple[int | None, int | None]:
    """Interleaved 1F1B from --num-virtual-stages-per-pipeline-rank or
    --num-layers-per-virtual-pipeline-stage: (layers per virtual stage, virtual pipeline size)."""
    pp, layers_per_chunk = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    if args.num_virtual_stages_per_pipeline_rank:
        if layers_per_chunk:
            error(
                "--num-virtual-stages-per-pipeline-rank and --num-layers-per-virtual-pipeline-stage are "
                "alternatives: give one"
            )
        chunks = pp * args.num_virtual_stages_per_pipeline_rank
        if pp == 1 or args.num_layers % chunks:
            error(
                f"--num-virtual-stages-per-pipeline-rank ({args.num_virtual_stages_per_pipeline_rank}) needs "
                f"--pipeline-model-parallel-size > 1 and --num-layers ({args.num_layers}) divisible by "
                f"PP x it ({chunks})"
            )
        layers_per_chunk = args.num_layers // chunks
    if not layers_per_chunk:
        return layers_per_chunk, None
    layers_per_stage = args.num_layers // pp
    if pp == 1 or layers_per_stage % layers_per_chunk:
        error(
            f"--num-layers-per-virtual-pipeline-stage ({layers_per_chunk}) needs "
            f"--pipeline-model-parallel-size > 1 and must divide the {layers_per_stage} layers per stage"
        )
    vpp = layers_per_stage // layers_per_chunk
    return layers_per_chunk, vpp if vpp > 1 else None


def _check_recompute(args, error) -> None:
    """--recompute-modules (moe_act, which depends on the layer implementation, is the model's check)."""
    modules = args.recompute_modules or []
    if modules and args.recompute_granularity != "selective":
        error("--recompute-modules needs --recompute-granularity selective")
    if "mla_up_proj" in modules and not args.multi_latent_attention:
        error("--recompute-modules mla_up_proj needs --multi-latent-attention")
    if "layernorm" in modules and not compat.transformer_engine_installed():
        error("--recompute-modules layernorm needs TransformerEngine (megatron-core recomputes TE's norms)")


def _check_expert_parallelism(args, error) -> None:
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    if not args.num_experts:
        if ep > 1:
            error("--expert-model-parallel-size > 1 needs --num-experts")
        return
    if args.num_experts % ep:
        error(f"--num-experts ({args.num_experts}) is not divisible by --expert-model-parallel-size ({ep})")
    etp = args.expert_tensor_parallel_size or tp
    if args.world_size % (etp * ep * pp):
        error(
            f"world size {args.world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
            f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp})"
        )
