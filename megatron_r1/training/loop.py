"""The training loop every recipe reuses: it composes a step (StepResult-returning callable), the
metrics processor, the evaluation and the checkpoint / exit / rollback / garbage-collection /
profiling policies, plus a recipe's extensions (fine-tuning's early stopping and progressive
unfreezing, for instance), in the spirit of torchtitan's Trainer."""

import time

from torch.utils.tensorboard import SummaryWriter

from megatron_r1.data.pretrain import build_datasets
from megatron_r1.metrics import MetricsServer
from megatron_r1.training.evaluation import Evaluation, evaluate, validation_batches
from megatron_r1.training.metrics import MetricsProcessor, is_logging_rank, print_validation_line
from megatron_r1.training.policies import (
    CheckpointPolicy,
    ExitPolicy,
    GarbageCollection,
    IterationProfiler,
    RollbackPolicy,
)
from megatron_r1.training.step import ScheduleStep, lm_forward_step


class Extension:
    """A recipe's behaviour in the loop. Override what applies: `iteration_starts(state)` before
    each step, `validated(state, valid_loss)` after each evaluation (True stops training; the loss
    is None off the logging rank)."""

    def iteration_starts(self, state) -> None:
        pass

    def validated(self, state, valid_loss) -> bool:
        return False


class Trainer:
    """Trains to --train-iters: each iteration runs `step(state, logged)`, then the metrics, the
    rollback, checkpoint and exit policies, garbage collection and the evaluation, in that order."""

    def __init__(self, args, state, step, metrics, evaluation=None, extensions=()):
        self.args, self.state, self.step, self.metrics = args, state, step, metrics
        self.evaluation, self.extensions = evaluation, list(extensions)
        self.checkpoints, self.rollback = CheckpointPolicy(args), RollbackPolicy(args)
        self.exits, self.gc, self.profiler = ExitPolicy(args), GarbageCollection(args), IterationProfiler(args)

    def train(self) -> dict:
        """Returns the last logged figures (for callers and tests)."""
        args, state = self.args, self.state
        self.gc.training_starts()
        while state.iteration < args.train_iters:
            start = time.perf_counter()
            self.profiler.iteration_starts(state.iteration)
            for extension in self.extensions:
                extension.iteration_starts(state)
            self.metrics.iteration_starts()
            logged = (state.iteration + 1) % args.log_interval == 0
            result = self.step(state, logged)
            state.iteration += 1
            self.profiler.iteration_ended(state.iteration)
            self.metrics.log_iteration(state, result, time.perf_counter() - start, logged)
            self.rollback.iteration_ended(state, result.update_successful)
            self.checkpoints.iteration_ended(state)
            if reason := self.exits.reason(state):
                if is_logging_rank():
                    print(f" exiting at iteration {state.iteration} ({reason})", flush=True)
                break
            self.gc.iteration_ended(state.iteration)
            if self.evaluation and self.evaluation.due(state.iteration) and self._evaluate_says_stop():
                break
        self.profiler.stop()
        self.checkpoints.training_ended(state)
        self.exits.training_ended()
        self.gc.training_ended()
        return self.metrics.last

    def _evaluate_says_stop(self) -> bool:
        self.gc.evaluation()
        valid_loss = self.evaluation(self.state)
        self.gc.evaluation()
        if valid_loss is not None:
            self.metrics.log_validation(self.state.iteration, valid_loss)
        # Every extension hears of every evaluation, even after one has asked to stop.
        return any([extension.validated(self.state, valid_loss) for extension in self.extensions])


def train(args, state, train_dataset, valid_dataset, writer=None, server=None, *, forward_step=lm_forward_step,
          extensions=()) -> dict:  # fmt: skip
    """Pre-training's and fine-tuning's loop: ScheduleStep over `train_dataset` with `forward_step`,
    evaluated on `valid_dataset`; `writer` (TensorBoard) and `server` (a MetricsServer) receive the
    figures on the logging rank. Returns the last logged figures."""
    step = ScheduleStep(args, state, train_dataset, forward_step)
    evaluation = Evaluation(args, state, valid_dataset, forward_step)
    return Trainer(args, state, step, MetricsProcessor(args, state, writer, server), evaluation, extensions).train()


def evaluate_and_print(args, state, valid_dataset, forward_step=lm_forward_step) -> float | None:
    """--skip-train: one evaluation of the loaded model."""
    valid_loss = evaluate(args, state, validation_batches(args, state, valid_dataset), forward_step)
    if valid_loss is not None and is_logging_rank():
        print_validation_line(state.iteration, valid_loss)
    return valid_loss


def tensorboard_and_metrics_server(args):
    """--tensorboard-dir's writer and --metrics-port's server, on the logging rank (None elsewhere)."""
    logging_rank = is_logging_rank()
    writer = None
    if args.tensorboard_dir and logging_rank:
        writer = SummaryWriter(args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
    server = MetricsServer(args.metrics_port) if args.metrics_port is not None and logging_rank else None
    return writer, server


def train_or_evaluate(args, state, train_dataset, valid_dataset, forward_step=lm_forward_step, extensions=()) -> None:
    """The entry scripts' last step: --skip-train evaluates once; otherwise train, with TensorBoard
    (--tensorboard-dir) and Prometheus (--metrics-port) on the logging rank."""
    if args.skip_train:
        evaluate_and_print(args, state, valid_dataset, forward_step)
        return
    writer, server = tensorboard_and_metrics_server(args)
    train(args, state, train_dataset, valid_dataset, writer, server, forward_step=forward_step, extensions=extensions)


def evaluation_samples(args) -> int:
    """Validation samples the run reads: --eval-iters global batches per evaluation."""
    if args.skip_train:
        return args.eval_iters * args.global_batch_size
    if args.eval_interval:
        return (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    return 0


def build_data(args, state):
    return build_datasets(args, state.tokenizer, args.train_iters * args.global_batch_size, evaluation_samples(args))
