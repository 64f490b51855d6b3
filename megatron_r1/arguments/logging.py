"""Logging and evaluation flags: the iteration line, TensorBoard, Prometheus metrics, profiling
and evaluation. No derived values."""

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--log-interval", type=int, default=1)
    group.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for the iteration line's MFU (default: the dense bf16 peak "
        "of a known GPU, megatron_r1/flops.py; none on CPU)",
    )
    group.add_argument("--eval-interval", type=int, default=None, help="default: no evaluation")
    group.add_argument("--eval-iters", type=int, default=2)
    group.add_argument("--skip-train", action="store_true", help="only evaluate the (loaded) model")
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port from the logging (last) rank",
    )
    group.add_argument(
        "--profile",
        action="store_true",
        help="profile iterations --profile-step-start to --profile-step-end (exclusive) on "
        "--profile-ranks: with --use-pytorch-profiler into --tensorboard-dir, else for nsys "
        "(nsys profile -c cudaProfilerApi)",
    )
    group.add_argument("--use-pytorch-profiler", action="store_true", help="with --profile: torch.profiler")
    group.add_argument("--profile-step-start", type=int, default=10)
    group.add_argument("--profile-step-end", type=int, default=12)
    group.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    group.add_argument(
        "--tensorboard-queue-size", type=int, default=1000, help="TensorBoard events held before they are written out"
    )
    group.add_argument(
        "--log-memory-to-tensorboard",
        action="store_true",
        help="memory figures in TensorBoard: the CUDA allocator's, or without CUDA the peak RSS",
    )
    group.add_argument(
        "--log-num-zeros-in-grad",
        action="store_true",
        help="the number of zero gradient elements in the iteration line and TensorBoard",
    )
    group.add_argument(
        "--log-params-norm",
        action="store_true",
        help="the L2 norm of all weights in the iteration line and TensorBoard",
    )
    group.add_argument(
        "--logging-level",
        type=int,
        default=None,
        help="Python logging level of megatron-core and megatron-r1 (e.g. 40: errors only)",
    )


def validate(args, error) -> None:
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        error(f"--peak-tflops ({args.peak_tflops:g}) must be positive")
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        error(
            f"--profile-step-start ({args.profile_step_start}) must be below --profile-step-end "
            f"({args.profile_step_end})"
        )
    if args.profile and args.use_pytorch_profiler and not args.tensorboard_dir:
        error("--use-pytorch-profiler writes its trace into --tensorboard-dir: give one")
    if args.profile and not args.use_pytorch_profiler and not torch.cuda.is_available():
        error(
            "--profile without --use-pytorch-profiler marks the iterations for nsys, which needs CUDA: add "
            "--use-pytorch-profiler"
        )
