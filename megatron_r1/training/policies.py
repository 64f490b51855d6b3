"""The loop's policies, one concern each: when to save, when to stop, when to roll back, when to
collect garbage, which iterations to profile. Each reads its own flags; the loop asks them in turn."""

import gc

import torch

from megatron_r1.checkpointing import finalize_async_saves, rollback_to_last_checkpoint, save_checkpoint
from megatron_r1.signals import ExitConditions
from megatron_r1.training.metrics import print_rank_last


class CheckpointPolicy:
    """--save-interval saves, --async-save publication, and the final save."""

    def __init__(self, args):
        self.args = args

    def saves_at(self, iteration: int) -> bool:
        return bool(self.args.save_interval) and iteration % self.args.save_interval == 0

    def iteration_ended(self, state) -> None:
        if self.saves_at(state.iteration):
            save_checkpoint(self.args, state)
        finalize_async_saves()  # --async-save: publish the checkpoints written by now

    def training_ended(self, state) -> None:
        if self.args.save and not self.saves_at(state.iteration):
            save_checkpoint(self.args, state)  # the final state, unless the loop just saved it
        finalize_async_saves(blocking=True)


class ExitPolicy:
    """--exit-interval, and the exit signal / --exit-duration-in-mins decided by all ranks at once."""

    def __init__(self, args):
        self.exit_interval = args.exit_interval
        self.conditions = ExitConditions(
            args.exit_signal if args.exit_signal_handler else None, args.exit_duration_in_mins
        )

    def reason(self, state) -> str | None:
        """Why training stops after this iteration, or None (collective: every rank, every iteration)."""
        if self.exit_interval and state.iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        return self.conditions.reason()

    def training_ended(self) -> None:
        self.conditions.restore_signal_handler()  # only after the final save: a repeated signal must not cut it short


class RollbackPolicy:
    """--rollback-after-bad-steps: after that many skipped updates in a row, the last checkpoint's
    weights and optimizer come back while the data goes on."""

    def __init__(self, args):
        self.args, self.bad_steps_in_a_row = args, 0

    def iteration_ended(self, state, update_successful: bool) -> None:
        self.bad_steps_in_a_row = 0 if update_successful else self.bad_steps_in_a_row + 1
        limit = self.args.rollback_after_bad_steps
        if limit and self.bad_steps_in_a_row >= limit:
            restored = rollback_to_last_checkpoint(self.args, state)
            print_rank_last(
                f" rolled back to the checkpoint of iteration {restored} after {self.bad_steps_in_a_row} "
                f"consecutive skipped iterations; data goes on at sample {state.consumed_samples}"
            )
            self.bad_steps_in_a_row = 0


class GarbageCollection:
    """--manual-gc: Python's automatic collection is off during training and collections happen at
    the same iterations on every rank (a collection on one rank stalls the others' collectives)."""

    def __init__(self, args):
        self.on, self.interval, self.around_evaluation = args.manual_gc, args.manual_gc_interval, args.manual_gc_eval

    def training_starts(self) -> None:
        if self.on:
            gc.disable()
            gc.collect()

    def iteration_ended(self, iteration: int) -> None:
        if self.on and self.interval and iteration % self.interval == 0:
            gc.collect()

    def evaluation(self) -> None:
        """Before and after each evaluation."""
        if self.on and self.around_evaluation:
            gc.collect()

    def training_ended(self) -> None:
        if self.on:
            gc.enable()


class IterationProfiler:
    """--profile: iterations [--profile-step-start, --profile-step-end) of the --profile-ranks,
    recorded by torch.profiler into --tensorboard-dir (--use-pytorch-profiler; TensorBoard's profiler
    tab and chrome://tracing read the trace), or marked with the CUDA profiler API for
    `nsys profile -c cudaProfilerApi` (Megatron-LM's default)."""

    def __init__(self, args):
        self.on = args.profile and torch.distributed.get_rank() in args.profile_ranks
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.torch_profiler, self.recording = None, False
        if self.on and args.use_pytorch_profiler:
            self.torch_profiler = torch.profiler.profile(
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True,
                with_stack=True,
            )

    def iteration_starts(self, iteration: int) -> None:
        if self.on and iteration == self.start:
            if self.torch_profiler:
                self.torch_profiler.start()
            else:
                torch.cuda.cudart().cudaProfilerStart()
            self.recording = True

    def iteration_ended(self, iteration: int) -> None:
        if self.recording and iteration == self.end:
            self.stop()

    def stop(self) -> None:
        """Ends the recording (writing the trace); also when training ends inside the window."""
        if self.recording:
            if self.torch_profiler:
                self.torch_profiler.stop()
            else:
                torch.cuda.cudart().cudaProfilerStop()
            self.recording = False
