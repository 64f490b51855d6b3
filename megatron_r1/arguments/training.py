"""Training flags: batch sizes, the run's length, precision, the optimizer, and the learning-rate
schedule.

Derived values, written by :func:`validate` only: ``global_batch_size`` (when not given),
``num_microbatches``, ``seq_length_curriculum`` (parsed), ``train_iters`` (also from
--train-samples), and the schedule's ``lr_warmup_steps``, ``lr_decay_steps`` and
``lr_wsd_decay_steps`` (in iterations or, with --train-samples, samples)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "training" and "learning rate" groups."""
    training = parser.add_argument_group("training")
    _add_run_arguments(training)
    _add_optimizer_arguments(training)
    _add_learning_rate_arguments(parser.add_argument_group("learning rate"))


def _add_run_arguments(group) -> None:
    """Batch sizes, the run's length, seed, memory and garbage collection, the sequence-length curriculum."""
    group.add_argument("--micro-batch-size", type=int, default=2)
    group.add_argument(
        "--global-batch-size", type=int, default=None, help="default: micro-batch size x data-parallel size"
    )
    group.add_argument("--train-iters", type=int, default=None, help="optimizer steps (default 20)")
    group.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="instead of --train-iters: samples to train on; the LR schedule then counts "
        "samples (--lr-warmup-samples, --lr-decay-samples, --lr-wsd-decay-samples)",
    )
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument(
        "--empty-unused-memory-level",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="return cached, unused GPU memory to the driver (less fragmentation, slower): "
        "1 after each forward-backward pass, 2 also after each optimizer step",
    )
    group.add_argument(
        "--disable-bf16-reduced-precision-matmul",
        action="store_true",
        help="bf16 GEMMs on the GPU accumulate in full precision (cuBLAS may otherwise reduce partial sums in bf16)",
    )
    group.add_argument(
        "--manual-gc",
        action="store_true",
        help="turn Python's threshold-triggered garbage collector off during training and "
        "collect at fixed points instead, the same on every rank (no straggler pauses)",
    )
    group.add_argument(
        "--manual-gc-interval",
        type=int,
        default=0,
        help="with --manual-gc: collect every this many iterations (0: only around evaluations)",
    )
    group.add_argument(
        "--no-manual-gc-eval",
        dest="manual_gc_eval",
        action="store_false",
        help="with --manual-gc: do not collect before and after each evaluation",
    )
    group.add_argument(
        "--seq-length-curriculum",
        nargs="+",
        default=None,
        metavar="LENGTH:FROM_ITER",
        help="e.g. 256:0 2048:1000 8192:5000; each LENGTH divides --seq-length, whose samples "
        "are cut into LENGTH-token sequences (same tokens per step)",
    )


def _add_optimizer_arguments(group) -> None:
    """Precision, gradients, the optimizer and the loss."""
    group.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    group.add_argument(
        "--grad-reduce-in-bf16",
        action="store_true",
        help="with --bf16: accumulate and all-reduce gradients in bf16 (half the grad buffers' "
        "memory and traffic; fp32 by default)",
    )
    group.add_argument(
        "--no-gradient-accumulation-fusion",
        dest="gradient_accumulation_fusion",
        action="store_false",
        help="compute each weight gradient apart and add it to the grad buffer, instead of "
        "accumulating it there in one GEMM (with Apex's CUDA extension, or on CPU)",
    )
    group.add_argument(
        "--optimizer", choices=["adam", "lion"], default="adam", help="adam: AdamW (decoupled weight decay); lion: Lion"
    )
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.95)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--lion-beta1", type=float, default=0.9)
    group.add_argument("--lion-beta2", type=float, default=0.99)
    group.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="the loss is the mean over all loss tokens of the global batch, not the mean of each "
        "micro-batch's mean (the same when every micro-batch has as many loss tokens)",
    )
    group.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="of the training LM loss (validation loss stays plain cross entropy)",
    )


def _add_learning_rate_arguments(group) -> None:
    """The learning rate and its schedule."""
    group.add_argument("--lr", type=float, default=3e-4)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument(
        "--decoupled-lr",
        type=float,
        default=None,
        help="the input embedding's and output layer's own peak learning rate (same schedule)",
    )
    group.add_argument(
        "--decoupled-min-lr",
        type=float,
        default=None,
        help="with --decoupled-lr: their minimum learning rate (default: --min-lr)",
    )
    group.add_argument(
        "--lr-decay-style",
        default="cosine",
        choices=["constant", "linear", "cosine", "cosine-warm-restarts", "inverse-square-root", "WSD"],
    )
    group.add_argument("--lr-warmup-init", type=float, default=0.0, help="the learning rate warm-up starts from")
    group.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 0")
    group.add_argument("--lr-warmup-samples", type=int, default=None, help="with --train-samples; default: 0")
    group.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="instead of --lr-warmup-iters/samples: this fraction of the decay",
    )
    group.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    group.add_argument(
        "--lr-decay-samples", type=int, default=None, help="with --train-samples; default: --train-samples"
    )
    group.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    group.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples")
    group.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine"], default="exponential")
    group.add_argument(
        "--lr-restart-iters",
        type=int,
        default=None,
        help="cosine-warm-restarts: length of the first cycle after warmup",
    )
    group.add_argument(
        "--lr-restart-mult",
        type=float,
        default=1.0,
        help="cosine-warm-restarts: each cycle is this many times longer than the last",
    )


def validate(args, error) -> None:
    """Batch sizes against the data-parallel size and the interleaved pipeline, the curriculum and
    the schedule; the only place the training's derived values are written."""
    if args.manual_gc_interval < 0:
        error(f"--manual-gc-interval ({args.manual_gc_interval}) must be 0 or positive")
    args.global_batch_size, args.num_microbatches = _batch_sizes(args, error)
    if args.seq_length_curriculum:
        args.seq_length_curriculum = _parse_curriculum(args, error)
        if args.reset_attention_mask or args.reset_position_ids:
            error(
                "--seq-length-curriculum cuts samples into independent sequences: not with "
                "--reset-attention-mask/--reset-position-ids"
            )
    args.train_iters, args.lr_decay_steps, args.lr_wsd_decay_steps, args.lr_warmup_steps = _schedule(args, error)
    if not 0.0 <= args.label_smoothing < 1.0:
        error(f"--label-smoothing ({args.label_smoothing}) must be in [0, 1)")
    if args.grad_reduce_in_bf16 and not args.bf16:
        error("--grad-reduce-in-bf16 needs --bf16 (fp32 training keeps fp32 gradients)")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        error("--decoupled-min-lr needs --decoupled-lr")


def _batch_sizes(args, error) -> tuple[int, int]:
    """(global batch size, micro-batches per iteration): the global batch defaults to one
    micro-batch per data-parallel rank."""
    per_step = args.micro_batch_size * args.data_parallel_size
    global_batch_size = args.global_batch_size or per_step
    if global_batch_size % per_step:
        error(
            f"--global-batch-size ({global_batch_size}) is not divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({args.data_parallel_size})"
        )
    num_microbatches = global_batch_size // per_step
    pp = args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size and num_microbatches % pp:
        error(
            f"interleaved pipelining needs the number of micro-batches ({num_microbatches} = "
            f"--global-batch-size / (--micro-batch-size x data-parallel size)) divisible by "
            f"--pipeline-model-parallel-size ({pp})"
        )
    return global_batch_size, num_microbatches


def _parse_curriculum(args, error):
    """`256:0 2048:1000` -> [(0, 256), (1000, 2048)], checked against --seq-length and TP."""
    stages = []
    for entry in args.seq_length_curriculum:
        try:
            length, start = (int(part) for part in entry.split(":"))
        except ValueError:
            error(f"--seq-length-curriculum: {entry!r} is not LENGTH:FROM_ITER")
        if length <= 0 or args.seq_length % length:
            error(f"--seq-length-curriculum: {length} does not divide --seq-length ({args.seq_length})")
        if args.sequence_parallel and length % args.tensor_model_parallel_size:
            error(
                f"--seq-length-curriculum: {length} is not divisible by --tensor-model-parallel-size "
                f"({args.tensor_model_parallel_size}) as sequence parallelism needs"
            )
        stages.append((start, length))
    stages.sort()
    if stages[0][0] != 0:
        error("--seq-length-curriculum: the first stage must start at iteration 0")
    return stages


def current_seq_length(args, iteration: int) -> int:
    """The sequence length for (0-based) `iteration` under --seq-length-curriculum."""
    if not args.seq_length_curriculum:
        return args.seq_length
    return [length for start, length in args.seq_length_curriculum if start <= iteration][-1]


def _schedule(args, error) -> tuple[int, int, int | None, int]:
    """--train-iters counts the run and its LR schedule in iterations, --train-samples in samples (as
    Megatron-LM: the schedule then advances by the global batch size each iteration). Returns
    (train_iters, lr_decay_steps, lr_wsd_decay_steps, lr_warmup_steps), the last three in the
    chosen unit."""
    unit = "samples" if args.train_samples is not None else "iters"
    other = "iters" if unit == "samples" else "samples"
    for name in ("lr_warmup", "lr_decay", "lr_wsd_decay"):
        if getattr(args, f"{name}_{other}") is not None:
            error(
                f"--{name.replace('_', '-')}-{other} does not go with --train-{unit}: "
                f"use --{name.replace('_', '-')}-{unit}"
            )
    if unit == "samples":
        if args.train_iters is not None:
            error("--train-iters and --train-samples are alternatives: give one")
        if args.lr_decay_style == "cosine-warm-restarts":
            error("--lr-decay-style cosine-warm-restarts counts iterations (--lr-restart-iters): use --train-iters")
        train_iters, total = args.train_samples // args.global_batch_size, args.train_samples
    else:
        train_iters = 20 if args.train_iters is None else args.train_iters
        total = train_iters
    # --train-iters 0 (load, then save in another layout) still builds a schedule.
    decay_steps = getattr(args, f"lr_decay_{unit}") or max(total, 1)
    wsd_decay_steps = getattr(args, f"lr_wsd_decay_{unit}")
    warmup_steps = _warmup_steps(args, unit, decay_steps, error)
    if args.lr_decay_style == "cosine-warm-restarts" and not args.lr_restart_iters:
        error("--lr-decay-style cosine-warm-restarts needs --lr-restart-iters")
    if args.lr_decay_style == "WSD" and not wsd_decay_steps:
        error(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit}")
    return train_iters, decay_steps, wsd_decay_steps, warmup_steps


def _warmup_steps(args, unit: str, decay_steps: int, error) -> int:
    """The warm-up's length in `unit`: --lr-warmup-iters/samples or --lr-warmup-fraction of the decay."""
    warmup = getattr(args, f"lr_warmup_{unit}")
    if args.lr_warmup_fraction is not None:
        if warmup is not None:
            error(f"--lr-warmup-fraction and --lr-warmup-{unit} are alternatives: give one")
        warmup = int(args.lr_warmup_fraction * decay_steps)
    warmup = warmup or 0
    if warmup and warmup >= decay_steps:
        error(
            f"the warm-up ({warmup} {unit}) must be shorter than the decay "
            f"(--lr-decay-{unit} {decay_steps}, default --train-{unit})"
        )
    return warmup
