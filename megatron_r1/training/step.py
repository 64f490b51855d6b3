"""A training step: one global batch through megatron-core's pipeline schedule, the NaN check,
the optimizer and the learning-rate schedule. Recipes give their own forward step (a
megatron-core forward_step_func); GRPO composes run_schedule and optimizer_step into its own."""

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_r1 import platform
from megatron_r1.arguments import current_seq_length
from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.optim import schedule_increment, step_if_finite


def micro_batch_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, logged: dict | None = None):
    """A loss_func's result in megatron-core's three parts: the micro-batch's per-token loss summed
    over its loss tokens (`mask`), their number, and the logged per-token losses (`logged`, default
    {"lm loss": the loss}) as [sum, number]. The schedule divides by the number (a mean per
    micro-batch, averaged over micro-batches), or with --calculate-per-token-loss keeps sums and
    divides the gradients by the global batch's loss tokens."""
    mask = mask.float()
    num_tokens = mask.sum().int()
    loss_sum = (per_token_loss.float() * mask).sum()
    sums = (
        {"lm loss": loss_sum}
        if logged is None
        else {name: (values.float() * mask).sum() for name, values in logged.items()}
    )
    reported = {name: torch.stack([value.detach(), num_tokens.float()]) for name, value in sums.items()}
    return loss_sum, num_tokens, reported


def lm_forward_step(data_iterator, model):
    """Pre-training's forward step: next-token loss over the batch's loss mask."""
    batch = platform.to_device(next(data_iterator))
    per_token_loss = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

    def loss_func(per_token_loss):
        return micro_batch_loss(per_token_loss, batch["loss_mask"])

    return per_token_loss, loss_func


def run_schedule(args, model, forward_step, data_iterators, forward_only, reduce_loss=True) -> dict | None:
    """One global batch through megatron-core's schedule (one data iterator per model chunk); the
    figures the loss functions report (micro_batch_loss' third part: "lm loss", ...) over all
    micro-batches and data-parallel ranks (last pipeline stage; None elsewhere, and without
    `reduce_loss`: a step that is not logged skips the reduction and its host sync)."""
    seq_length = getattr(data_iterators[0], "seq_length", None) or args.seq_length
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=model,
        num_microbatches=args.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=args.micro_batch_size * args.seq_length // seq_length,
        forward_only=forward_only,
    )
    if args.empty_unused_memory_level >= 1:
        torch.cuda.empty_cache()
    if not (reduce_loss and parallel_state.is_pipeline_last_stage()):
        return None
    names = list(reduced[0])
    # [figure, [sum, count]] over the micro-batches, then the data-parallel ranks: one all-reduce.
    totals = torch.stack([torch.stack([item[name] for name in names]) for item in reduced]).sum(dim=0)
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    means = (totals[:, 0] / totals[:, 1].clamp(min=1e-12)).tolist()
    return dict(zip(names, means))


def zero_grads(state) -> None:
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()


@dataclass
class StepResult:
    """What a step reports to the loop. `figures`: the step's losses and other figures, in the
    order the iteration line prints them (filled on logged iterations, on the logging rank)."""

    update_successful: bool
    grad_norm: float | None = None
    num_zeros: float | None = None
    figures: dict = field(default_factory=dict)
    tokens: int | None = None  # tokens processed, where not --global-batch-size x --seq-length


def optimizer_step(args, state, advance_schedule: bool = True) -> StepResult:
    """The update after the gradients are in: skipped when any gradient is NaN/Inf (it would poison
    the weights and optimizer moments), counted in the state; the LR schedule advances on updates
    (with `advance_schedule`: a recipe making several updates per iteration advances it once)."""
    update_successful, grad_norm, num_zeros = step_if_finite(state.optimizer)
    if grad_norm is None:
        state.nan_iterations += 1
    if args.empty_unused_memory_level >= 2:
        torch.cuda.empty_cache()
    if update_successful and advance_schedule:
        state.scheduler.step(increment=schedule_increment(args))
    else:
        state.skipped_iterations += 1
    return StepResult(update_successful, grad_norm, num_zeros)


class ScheduleStep:
    """Pre-training's and fine-tuning's step: a global batch of `train_dataset` through the
    schedule with `forward_step`, then optimizer_step. Every model chunk reads the same
    micro-batch sequence through its own iterator, from the state's consumed samples on."""

    def __init__(self, args, state, train_dataset, forward_step=lm_forward_step):
        self.args, self.forward_step = args, forward_step
        self.train_data = [
            MicroBatches(train_dataset, args.micro_batch_size, state.consumed_samples) for _ in state.model
        ]

    def __call__(self, state, logged: bool) -> StepResult:
        for chunk_data in self.train_data:
            chunk_data.seq_length = current_seq_length(self.args, state.iteration)
        zero_grads(state)
        # Figures that need a host sync are gathered on the iterations that are logged only.
        figures = run_schedule(self.args, state.model, self.forward_step, self.train_data, False, reduce_loss=logged)
        result = optimizer_step(self.args, state)
        state.consumed_samples += self.args.global_batch_size
        if figures is not None:
            result.figures["lm loss"] = figures["lm loss"]
        return result
