"""GRPO's training step (DeepSeekMath, arXiv 2402.03300; DeepSeek-R1, arXiv 2501.12948): each
iteration samples `--grpo-group-size` responses to each of `--grpo-prompts-per-step` prompts from
the current policy, scores them with the rule-based rewards, turns rewards into group-relative
advantages, and makes `--grpo-iterations` updates of the clipped surrogate (+ beta k3 KL to the
reference policy) on them, with the rollout's log-probabilities as the old policy's.

Data-parallel ranks each take their share of the step's prompts; the loss weights every token as
`--loss-agg-mode` says over the whole step's batch (objective.aggregation_weights), so a layout
changes nothing but the speed. `state.consumed_samples` counts prompts: the prompt stream's
position, and the iteration seeds each group's sampling, so a resumed run draws what the
uninterrupted one would have.

With --dynamic-sampling (DAPO) a step trains on groups whose rewards differ only: it rolls out
further rounds of --grpo-prompts-per-step prompts until every data-parallel rank has its share of
them (at most --max-num-gen-batches rounds) and trains on the first ones, filled with left-out groups
(masked: no gradient) where the rounds ran out."""

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_r1 import platform, vocab_parallel
from megatron_r1.checkpointing import CheckpointError, find_checkpoint, load_weights
from megatron_r1.distributed import parameters_gathered
from megatron_r1.lora import adapters_disabled
from megatron_r1.model import build_model
from megatron_r1.rl.objective import (
    aggregation_weights,
    clipped_surrogate,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
)
from megatron_r1.rl.rewards import RewardBatch
from megatron_r1.rl.rollout import Rollouts, Sampling, generate_rollouts, largest_anywhere
from megatron_r1.training import StepResult, optimizer_step, run_schedule, zero_grads


@contextmanager
def mtp_layers_skipped(model):
    """Inside, `model` (a GPTModel) runs without its MTP layers: GRPO trains the next-token policy,
    and megatron-core runs MTP layers only with labels. They stay in the model (frozen) for its
    checkpoints."""
    mtp_process, mtp_num_layers = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        model.mtp_process, model.config.mtp_num_layers = mtp_process, mtp_num_layers


def token_log_probs(model, batch, args, with_entropy: bool = False):
    """Log-probabilities of the batch's labels under the model at the rollout temperature (and the
    entropy of each position's distribution)."""
    logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/TP]
    log_probs = vocab_parallel.log_softmax(logits, args.temperature, args.vocab_size)
    entropy = vocab_parallel.entropy(log_probs) if with_entropy else None
    return vocab_parallel.log_probs_of(log_probs, batch["labels"]), entropy


class ReferencePolicy:
    """The frozen policy of the KL term: with --lora the base model (the policy with its adapters
    off, no copy), otherwise the --pretrained-checkpoint weights in a model of their own."""

    def __init__(self, args, state):
        self.args, self.lora = args, args.lora
        self.model = state.model[0] if args.lora else self._load(args)

    @staticmethod
    def _load(args):
        path = find_checkpoint(argparse.Namespace(load=args.pretrained_checkpoint, ckpt_step=None))
        if path is None:
            raise CheckpointError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there")
        (model,) = build_model(args, with_mtp=False, initialize=False)
        load_weights(path, [model])
        for param in model.parameters():
            param.requires_grad = False
        return model.eval()

    @torch.no_grad()
    def log_probs(self, batch) -> torch.Tensor:
        if not self.lora:
            return token_log_probs(self.model, batch, self.args)[0]
        with adapters_disabled(self.model):
            return token_log_probs(self.model, batch, self.args)[0]


def _pad_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def training_batches(args, rollouts, advantages, kept) -> list:
    """The rollouts as micro-batches: tokens, positions, next-token labels, the mask of the label
    positions that are response tokens of kept groups, and each sequence's advantage. Rows are
    padded to one length on every rank (expert-parallel ranks exchange equal token counts), a
    multiple of TP (sequence parallelism splits the sequence)."""
    count, length = rollouts.tokens.shape
    length = _pad_length(largest_anywhere(length + 1), args.tensor_model_parallel_size)
    tokens = torch.nn.functional.pad(rollouts.tokens, (0, length - rollouts.tokens.shape[1]))  # causal: never read
    positions = torch.arange(length)
    starts = torch.tensor(rollouts.prompt_lengths)[:, None] - 1  # the label of position P-1 is the first response token
    ends = starts + torch.tensor(rollouts.response_lengths)[:, None]
    mask = ((positions >= starts) & (positions < ends) & kept[:, None]).float()
    rollout_log_probs = torch.zeros(count, length)
    for row, (start, values) in enumerate(zip(starts[:, 0].tolist(), rollouts.log_probs)):
        rollout_log_probs[row, start : start + len(values)] = values
    full = {"tokens": tokens, "position_ids": positions.expand(count, -1), "labels": torch.roll(tokens, -1, dims=1),
            "mask": mask, "advantages": advantages[:, None].float(), "rollout_log_probs": rollout_log_probs}  # fmt: skip
    size = args.micro_batch_size
    return [{name: value[i : i + size] for name, value in full.items()} for i in range(0, count, size)]


@dataclass
class RolloutRound:
    """One round's rollouts on this rank, their scores, each sequence's advantage and, per group,
    whether it is kept (its rewards differ, under --dynamic-sampling)."""

    rollouts: Rollouts
    scores: RewardBatch
    advantages: torch.Tensor
    kept: torch.Tensor


def chosen_groups(rounds: list[RolloutRound], share: int) -> list[tuple[int, int]]:
    """(round, group) of the `share` groups a step trains on: the first kept ones, filled with left-out
    ones where too few were kept; in rollout order (one round: all its groups, as they came)."""
    every = [(r, g) for r, rollout_round in enumerate(rounds) for g in range(len(rollout_round.kept))]
    kept = [(r, g) for r, g in every if rounds[r].kept[g]][:share]
    left_out = [(r, g) for r, g in every if not rounds[r].kept[g]][: share - len(kept)]
    return sorted(kept + left_out)


def gathered_round(rounds: list[RolloutRound], chosen: list[tuple[int, int]], group_size: int) -> RolloutRound:
    """The chosen groups of the rounds as one round (the scores' failures: all rounds')."""
    rows = {r: [g * group_size + i for g in groups for i in range(group_size)]
            for r, groups in _by_round(chosen).items()}  # fmt: skip
    scores = RewardBatch(
        [rounds[r].scores.totals[row] for r, picked in rows.items() for row in picked],
        {name: [rounds[r].scores.values[name][row] for r, picked in rows.items() for row in picked]
         for name in rounds[0].scores.values},
        {name: sum(rr.scores.failures.get(name, 0) for rr in rounds) for name in rounds[0].scores.values},
    )  # fmt: skip
    return RolloutRound(
        Rollouts.gathered([(rounds[r].rollouts, picked) for r, picked in rows.items()]),
        scores,
        torch.cat([rounds[r].advantages[picked] for r, picked in rows.items()]),
        torch.stack([rounds[r].kept[g] for r, g in chosen]),
    )


def _by_round(chosen: list[tuple[int, int]]) -> dict[int, list[int]]:
    groups = {}
    for r, g in chosen:
        groups.setdefault(r, []).append(g)
    return groups


def _sum_over_data_parallel(values: list, op=torch.distributed.ReduceOp.SUM) -> list:
    totals = torch.tensor(values, dtype=torch.float64, device=platform.compute_device())
    torch.distributed.all_reduce(totals, op=op, group=parallel_state.get_data_parallel_group())
    return totals.tolist()


def grpo_forward_step(step, data_iterator, model):
    """The policy loss of one micro-batch: clipped surrogate + beta k3 KL per response token,
    weighted as --loss-agg-mode weighs it in the whole step's batch."""
    args = step.args
    batch = platform.to_device(next(data_iterator))
    log_probs, entropy = token_log_probs(model, batch, args, with_entropy=step.logging)
    surrogate, ratio, _, clipped = clipped_surrogate(
        log_probs, batch["old_log_probs"], batch["advantages"], args.clip_ratio_low, args.clip_ratio_high
    )
    kl = kl_k3(log_probs, batch["ref_log_probs"]) if args.kl_coef > 0 else torch.zeros_like(surrogate)
    per_token = surrogate + args.kl_coef * kl

    def loss_func(per_token):
        # The schedule divides by the micro-batches and DDP averages over data-parallel ranks: undone
        # here, so that the gradient is that of the step's aggregated loss.
        scale = args.num_microbatches * parallel_state.get_data_parallel_world_size()
        mask, weights = batch["mask"], batch["weights"]
        tokens = mask.sum()
        reported = {"policy loss": torch.stack([(surrogate * weights).sum(), torch.tensor(1.0 / scale, device=tokens.device)]),
                    "clip fraction": torch.stack([(clipped * mask).sum(), tokens]),
                    "importance ratio": torch.stack([(ratio * mask).sum(), tokens])}  # fmt: skip
        if args.kl_coef > 0:
            reported["kl"] = torch.stack([(kl * mask).sum(), tokens])
        if entropy is not None:
            reported["entropy"] = torch.stack([(entropy * mask).sum(), tokens])
        reported = {name: value.detach().float() for name, value in reported.items()}
        one = torch.ones((), dtype=torch.int, device=tokens.device)
        return (per_token * weights).sum() * scale, one, reported

    return per_token, loss_func


class GRPOStep:
    """One GRPO iteration: rollouts, rewards, advantages, old and reference log-probabilities, then
    --grpo-iterations updates (the LR schedule advances once). Reports its figures to the loop."""

    FORMATS = {"reward mean": ".4f", "reward std": ".4f", "response length mean": ".1f", "response length max": ".0f",
               "truncation rate": ".3f", "groups kept": ".3f", "reward failures": ".0f", "rollout time (s)": ".2f",
               "update time (s)": ".2f", "log-prob time (s)": ".2f", "rollout log-prob gap": ".2e", "rollout tokens/s": ".1f", "overlong": ".4f",
               "rollout rounds": ".0f", "batch filled": ".3f"}  # fmt: skip

    def __init__(self, args, state, prompts, renderer, rewards, reference):
        self.args, self.prompts, self.renderer, self.rewards, self.reference = (
            args,
            prompts,
            renderer,
            rewards,
            reference,
        )
        self.tokenizer = state.tokenizer
        self.stop_ids = renderer.stop_ids
        self.sampling = Sampling(args.temperature, args.top_k, args.top_p)
        self.logging = False

    def formats(self) -> dict:
        """How the iteration line prints the step's figures (each reward's mean as a rate)."""
        return {**self.FORMATS, **{name: ".3f" for name, _, _ in self.args.rewards}}

    def _my_prompts(self):
        """This data-parallel rank's share of the step's prompts, and the number of its first one."""
        share = self.args.grpo_prompts_per_step // parallel_state.get_data_parallel_world_size()
        first = parallel_state.get_data_parallel_rank() * share
        return self.prompts.take(self.args.grpo_prompts_per_step)[first : first + share], first

    def _rollouts(self, state, records, first) -> Rollouts:
        args, token_ids = self.args, [self.renderer.render(record) for record in records]
        return generate_rollouts(
            state.model[0].module,
            token_ids,
            first,
            args.grpo_group_size,
            args.max_response_length,
            args.vocab_size,
            self.stop_ids,
            self.sampling,
            args.seed,
            state.iteration,
            max_batch=args.rollout_batch_size,
        )

    def _score(self, records, rollouts):
        group = self.args.grpo_group_size
        expanded = [record for record in records for _ in range(group)]
        responses = []  # the text without its stop id
        for row, truncated in enumerate(rollouts.truncated):
            ids = rollouts.response_ids(row)
            responses.append(self.tokenizer.detokenize(ids if truncated else ids[:-1]))
        return self.rewards.score([r.prompt for r in expanded], responses, [r.fields for r in expanded],
                                  rollouts.response_lengths)  # fmt: skip

    @torch.no_grad()
    def _old_and_reference_log_probs(self, state, batches) -> list:
        """Each batch's log-probs under the policy as it rolled out (the old policy of the ratio)
        and under the reference; returns [sum of |training - rollout log-prob|, tokens] over the
        response tokens: the training forward's mismatch with the decoding's, logged."""
        model = state.model[0]
        model.eval()
        gap = torch.zeros(2, device=platform.compute_device())
        with parameters_gathered(state.model):
            for batch in batches:
                batch.update(platform.to_device(batch))
                batch["old_log_probs"] = token_log_probs(model, batch, self.args)[0]
                difference = (batch["old_log_probs"] - batch["rollout_log_probs"]).abs()
                gap += torch.stack([(difference * batch["mask"]).sum(), batch["mask"].sum()])
                if self.reference is not None:
                    batch["ref_log_probs"] = self.reference.log_probs(batch)
        model.train()
        return gap

    def _weigh(self, batches, kept_responses: int) -> None:
        tokens = sum(float(batch["mask"].sum()) for batch in batches)
        total_tokens, total_responses = _sum_over_data_parallel([tokens, kept_responses])
        for batch in batches:
            batch["weights"] = aggregation_weights(batch["mask"], self.args.loss_agg_mode, int(total_tokens),
                                                   int(total_responses), self.args.max_response_length)  # fmt: skip

    def __call__(self, state, logged: bool) -> StepResult:
        with mtp_layers_skipped(state.model[0].module):
            return self._step(state, logged)

    def _round(self, state, number: int) -> RolloutRound:
        """Round `number` of the step: rollouts of this rank's share of the next prompts, scored."""
        args = self.args
        records, first = self._my_prompts()
        rollouts = self._rollouts(state, records, first + number * args.grpo_prompts_per_step)
        scores = self._score(records, rollouts)
        rewards = torch.tensor(scores.totals, dtype=torch.float32)
        advantages = group_advantages(rewards, args.grpo_group_size, normalize_std=not args.no_std_normalization)
        kept = torch.ones(len(records), dtype=torch.bool)
        if args.dynamic_sampling:
            kept = dynamic_sampling_keep(rewards, args.grpo_group_size)
        return RolloutRound(rollouts, scores, advantages, kept)

    def _rounds(self, state) -> list[RolloutRound]:
        """One round, or with --dynamic-sampling rounds until every data-parallel rank kept its share of
        groups (the decision is the same on every rank: they roll out in lockstep)."""
        rounds = [self._round(state, 0)]
        share = len(rounds[0].kept)
        while self.args.dynamic_sampling and len(rounds) < self.args.max_num_gen_batches:
            kept = sum(int(rollout_round.kept.sum()) for rollout_round in rounds)
            if _sum_over_data_parallel([kept], op=torch.distributed.ReduceOp.MIN)[0] >= share:
                break
            rounds.append(self._round(state, len(rounds)))
        return rounds

    def _step(self, state, logged: bool) -> StepResult:
        args, start = self.args, time.perf_counter()
        rounds = self._rounds(state)
        rollout_time = time.perf_counter() - start
        trained = gathered_round(rounds, chosen_groups(rounds, len(rounds[0].kept)), args.grpo_group_size)
        kept = trained.kept.repeat_interleave(args.grpo_group_size)
        batches = training_batches(args, trained.rollouts, trained.advantages, kept)
        log_probs_start = time.perf_counter()
        log_prob_gap = self._old_and_reference_log_probs(state, batches)
        self._weigh(batches, int(kept.sum()))
        self.logging, figures = logged, None
        update_start = time.perf_counter()
        for update in range(args.grpo_iterations):
            zero_grads(state)
            last = update == args.grpo_iterations - 1
            figures = run_schedule(args, state.model, partial(grpo_forward_step, self), [iter(batches)], False,
                                   reduce_loss=logged and last)  # fmt: skip
            result = optimizer_step(args, state, advance_schedule=last)
        state.consumed_samples += len(rounds) * args.grpo_prompts_per_step
        result.tokens = sum(batch["tokens"].numel() for batch in batches) * args.grpo_iterations
        result.tokens *= parallel_state.get_data_parallel_world_size()
        if logged:
            timing = (rollout_time, update_start - log_probs_start, time.perf_counter() - update_start)
            rollout_figures = self._rollout_figures(rounds, trained, log_prob_gap.tolist(), timing)
            result.figures = {**(figures or {}), **rollout_figures}
        return result

    def _rollout_figures(self, rounds, trained, log_prob_gap, timing) -> dict:
        """Reward and response figures over every data-parallel rank's trained rollouts (logged
        iterations); with --dynamic-sampling the share of all rolled-out groups kept, the rounds and
        the share of the trained groups that were kept."""
        scores, rollouts = trained.scores, trained.rollouts
        totals = torch.tensor(scores.totals, dtype=torch.float64)
        lengths = rollouts.response_lengths
        names = list(scores.values)
        local = [float(totals.sum()), float((totals**2).sum()), len(lengths), float(sum(lengths)),
                 float(sum(rollouts.truncated)), float(sum(r.kept.sum() for r in rounds)),
                 sum(len(r.kept) for r in rounds), float(trained.kept.sum()), len(trained.kept),
                 float(sum(scores.failures.values())), *log_prob_gap,
                 float(sum(sum(r.rollouts.response_lengths) for r in rounds)),
                 *(float(sum(scores.values[name])) for name in names)]  # fmt: skip
        summed = _sum_over_data_parallel(local)
        longest = _sum_over_data_parallel([max(lengths)], op=torch.distributed.ReduceOp.MAX)[0]
        total, squares, count, length_sum, truncated, kept, groups, filled, trained_groups = summed[:9]
        failures, gap, gap_tokens, generated = summed[9:13]
        mean = total / count
        figures = {"reward mean": mean, "reward std": max(squares / count - mean**2, 0.0) ** 0.5,
                   **{f"{name}": value / count for name, value in zip(names, summed[13:])},
                   "response length mean": length_sum / count, "response length max": longest,
                   "truncation rate": truncated / count}  # fmt: skip
        if self.args.dynamic_sampling:
            figures.update({"groups kept": kept / groups, "rollout rounds": len(rounds),
                            "batch filled": filled / trained_groups})  # fmt: skip
        if self.args.reward_errors == "zero":
            figures["reward failures"] = failures
        rollout_time, log_prob_time, update_time = timing
        figures.update({"rollout log-prob gap": gap / max(gap_tokens, 1), "rollout time (s)": rollout_time,
                        "log-prob time (s)": log_prob_time, "update time (s)": update_time,
                        "rollout tokens/s": generated / rollout_time})  # fmt: skip
        return figures
