"""Checkpointing flags: saving, loading and resuming, and the ways a run stops (intervals,
signals, time limits, rollback after bad steps).

Derived value, written by :func:`validate` only: ``load`` (default: --save, so that rerunning resumes)."""

import argparse

from megatron_r1.signals import EXIT_SIGNALS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save", default=None, help="checkpoint directory to write")
    group.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    group.add_argument(
        "--load", default=None, help="checkpoint directory to resume from (default: --save, so rerunning resumes)"
    )
    group.add_argument("--ckpt-step", type=int, default=None, help="load this iteration, not the latest")
    group.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    group.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    group.add_argument(
        "--dist-ckpt-strictness",
        default="assume_ok_unexpected",
        choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all", "ignore_all"],
        help="megatron-core's handling of keys the model asks for that the checkpoint lacks "
        "('unexpected') and, with the '_all' values, of checkpoint keys nothing loads "
        "('missing', e.g. the optimizer state under --no-load-optim)",
    )
    group.add_argument(
        "--no-save-optim",
        action="store_true",
        help="checkpoints without the optimizer state (a resume then needs --no-load-optim)",
    )
    group.add_argument("--no-save-rng", action="store_true", help="checkpoints without the RNG states")
    group.add_argument(
        "--finetune",
        action="store_true",
        help="load weights only: iteration, data position, optimizer and schedule start anew",
    )
    group.add_argument("--keep-last-n", type=int, default=None, help="delete older checkpoints than the last N")
    group.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR/WD schedule from the flags, not the checkpoint",
    )
    group.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="save (with --save) and exit after an iteration divisible by this",
    )
    group.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints from a forked process while training goes on; each becomes "
        "visible (rename, tracker) once written on every rank",
    )
    group.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on --exit-signal, every rank stops after the same iteration, saves (with --save) and exits 0",
    )
    group.add_argument(
        "--exit-signal",
        choices=EXIT_SIGNALS,
        default="SIGTERM",
        help="the signal --exit-signal-handler catches; e.g. SIGUSR1 with SLURM's --signal=B:USR1@120",
    )
    group.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save (with --save) and exit once the run has lasted this long (all ranks agree)",
    )
    group.add_argument(
        "--rollback-after-bad-steps",
        type=int,
        default=None,
        metavar="N",
        help="after N consecutive skipped (NaN/Inf) iterations, restore weights, optimizer and LR "
        "schedule from the latest checkpoint under --save; the data goes on past the "
        "batches since then",
    )


def validate(args, error) -> None:
    args.load = args.load or args.save
    if args.save_interval and not args.save:
        error("--save-interval needs --save DIR")
    if args.rollback_after_bad_steps is not None and (args.rollback_after_bad_steps < 1 or not args.save):
        error(
            f"--rollback-after-bad-steps ({args.rollback_after_bad_steps}) must be at least 1 and needs --save DIR "
            f"(the checkpoints it rolls back to)"
        )
    if args.rollback_after_bad_steps is not None and args.no_save_optim:
        error("--rollback-after-bad-steps restores the optimizer state from the checkpoints: not with --no-save-optim")
    if args.keep_last_n is not None and args.keep_last_n < 1:
        error(f"--keep-last-n ({args.keep_last_n}) must be at least 1")
