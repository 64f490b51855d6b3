"""The training machinery every recipe composes: `setup` builds the state (process groups,
tokenizer, model, optimizer, LR schedule); a step (`ScheduleStep`, or a recipe's own from
`run_schedule` and `optimizer_step`) runs one iteration; `Trainer` loops it with the metrics
processor, the evaluation and the checkpoint / exit / rollback / GC / profiling policies, plus the
recipe's `Extension`s. `train` and `train_or_evaluate` are that composition for pre-training and
fine-tuning."""

from megatron_r1.training.evaluation import Evaluation, evaluate, validation_batches
from megatron_r1.training.loop import (
    Extension,
    Trainer,
    build_data,
    evaluate_and_print,
    evaluation_samples,
    tensorboard_and_metrics_server,
    train,
    train_or_evaluate,
)
from megatron_r1.training.metrics import MetricsProcessor, is_logging_rank, print_rank_last
from megatron_r1.training.setup import TrainState, setup
from megatron_r1.training.step import (
    ScheduleStep,
    StepResult,
    lm_forward_step,
    micro_batch_loss,
    optimizer_step,
    run_schedule,
    zero_grads,
)

__all__ = [
    "Evaluation", "Extension", "MetricsProcessor", "ScheduleStep", "StepResult", "Trainer", "TrainState",
    "build_data", "evaluate", "evaluate_and_print", "evaluation_samples", "is_logging_rank", "lm_forward_step",
    "micro_batch_loss", "optimizer_step", "print_rank_last", "run_schedule", "setup",
    "tensorboard_and_metrics_server", "train", "train_or_evaluate", "validation_batches", "zero_grads",
]  # fmt: skip
