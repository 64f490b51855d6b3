"""Leaving a run cleanly before the cluster ends it.

``--exit-signal-handler`` catches ``--exit-signal`` (SIGTERM by default; SIGUSR1 with SLURM's
``--signal=B:USR1@120`` warns two minutes before the time limit) and ``--exit-duration-in-mins``
bounds the wall-clock time. A signal may reach the ranks at different moments, or only some of
them, and clocks differ slightly, so the decision is taken at the end of an iteration by one
all-reduce over every rank: all of them stop after the same iteration, save it and exit 0.
"""

import signal
import time

import torch

from megatron_r1 import platform

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# The run's clock starts when the training code is imported: before model setup and checkpoint
# loading, which count against a job's time limit too.
_RUN_START = time.monotonic()


class ExitConditions:
    """Built at the start of the training loop (it installs the signal handler), asked `reason()`
    at the end of every iteration, and `restore_signal_handler()` when the loop ends."""

    def __init__(self, exit_signal: str | None, exit_duration_in_mins: float | None):
        self.signum = signal.Signals[exit_signal] if exit_signal else None
        self.exit_duration_in_mins = exit_duration_in_mins
        self.signal_received = False
        self._previous_handler = signal.signal(self.signum, self._record_signal) if self.signum else None

    @property
    def active(self) -> bool:
        return self.signum is not None or self.exit_duration_in_mins is not None

    def restore_signal_handler(self) -> None:
        if self.signum is not None:
            signal.signal(self.signum, self._previous_handler)

    def _record_signal(self, signum, frame):
        self.signal_received = True  # acted upon at the end of the iteration, on every rank

    def reason(self) -> str | None:
        """Why every rank must stop now, or None (collective: every rank, every iteration)."""
        if not self.active:
            return None
        flags = torch.tensor(
            [float(self.signal_received), (time.monotonic() - _RUN_START) / 60], device=platform.compute_device()
        )
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        received, minutes = bool(flags[0].item()), flags[1].item()
        if received:
            return f"{self.signum.name} received"
        if self.exit_duration_in_mins is not None and minutes >= self.exit_duration_in_mins:
            return f"--exit-duration-in-mins {self.exit_duration_in_mins:g} reached after {minutes:.2f} min"
        return None
