"""Validation: the mean lm loss over --eval-iters global batches, every --eval-interval iterations
and at the last one, on batches placed as the run started at iteration 0 would have them."""

import torch

from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.distributed import parameters_gathered
from megatron_r1.training.step import lm_forward_step, run_schedule


def validation_batches(args, state, valid_dataset, evaluations_done: int = 0) -> list | None:
    """One cycling validation reader per model chunk, placed after `evaluations_done`
    evaluations: a resumed run evaluates on the batches the run it continues would have (Megatron-LM
    derives the position from the iteration in the same way)."""
    if valid_dataset is None:
        return None
    draws = evaluations_done * args.eval_iters * args.num_microbatches
    return [MicroBatches(valid_dataset, args.micro_batch_size, cycle=True).skip(draws) for _ in state.model]


def evaluate(args, state, valid_data, forward_step=lm_forward_step) -> float | None:
    """Mean validation lm loss over --eval-iters global batches (None off the last stage)."""
    for chunk in state.model:
        chunk.eval()
    losses = []
    with torch.no_grad(), parameters_gathered(state.model):
        for _ in range(args.eval_iters):
            losses.append(run_schedule(args, state.model, forward_step, valid_data, forward_only=True))
    for chunk in state.model:
        chunk.train()
    return None if losses[0] is None else sum(figures["lm loss"] for figures in losses) / len(losses)


class Evaluation:
    """The loop's evaluation policy: due every --eval-interval iterations and at --train-iters."""

    def __init__(self, args, state, valid_dataset, forward_step=lm_forward_step):
        self.args, self.forward_step = args, forward_step
        done = state.iteration // args.eval_interval if args.eval_interval else 0
        self.valid_data = validation_batches(args, state, valid_dataset, evaluations_done=done)

    def due(self, iteration: int) -> bool:
        interval = self.args.eval_interval
        return bool(interval and self.valid_data) and (iteration % interval == 0 or iteration == self.args.train_iters)

    def __call__(self, state) -> float | None:
        return evaluate(self.args, state, self.valid_data, self.forward_step)
