"""Rollouts: `group_size` sampled responses per prompt from the current policy, decoded with
megatron-core's static KV cache in the training processes and their TP/EP layout. Prompts of any
lengths decode together (up to `max_batch` sequences at a time, similar lengths side by side): the
prefill covers the shortest prompt, and each decoding step feeds a longer prompt's own next token
where it has one (as Megatron-LM's static generation does), so a batch is not cut by prompt length.

- Every sequence of a group is drawn from the group's own generator, seeded by (seed, iteration,
  the prompt's number in the step): a prompt gets the same responses whatever else decodes beside
  it, in any parallel layout and on resume.
- Tensor-parallel ranks decode the same prompts with the same generators and identical (gathered)
  logits, so they draw the same tokens. Sequence parallelism is switched off while decoding (one
  new token cannot be split over ranks), as megatron-core's own generation does.
- A group draws only at its response's positions, so its tokens do not depend on how many steps
  fed the prompts of longer ones beside it.
- Every rank runs the same number of forward passes, as expert-parallel ranks exchange tokens in
  each (megatron-core's all-gather dispatcher needs as many tokens on each): as many batches of as
  many sequences (a rank with fewer decodes copies of a prompt and drops them), the same prefill
  length (the shortest prompt on any rank) and the same number of decoding steps (an all-reduce per
  step asks whether any sequence anywhere is unfinished).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from megatron_r1 import platform
from megatron_r1.generation import sample


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Rollouts:
    """The sequences of one step on this rank: prompt then response ids, each row padded with
    `pad_id` to the longest; a response ends with its stop id unless truncated."""

    tokens: torch.Tensor  # [sequences, length], int64, CPU
    prompt_lengths: list
    response_lengths: list
    truncated: list
    log_probs: list  # per sequence: each response token's log-probability at the rollout temperature

    def response_ids(self, row: int) -> list:
        start = self.prompt_lengths[row]
        return self.tokens[row, start : start + self.response_lengths[row]].tolist()

    @staticmethod
    def gathered(parts: list[tuple["Rollouts", list[int]]]) -> "Rollouts":
        """The chosen rows of several Rollouts as one, in the order given, padded to the longest
        (nothing past a sequence's end is read)."""
        length = max(rollouts.tokens.shape[1] for rollouts, _ in parts)
        tokens = [torch.nn.functional.pad(rollouts.tokens[rows], (0, length - rollouts.tokens.shape[1]))
                  for rollouts, rows in parts]  # fmt: skip

        def rows_of(name: str) -> list:
            return [getattr(rollouts, name)[row] for rollouts, rows in parts for row in rows]

        return Rollouts(
            torch.cat(tokens), *map(rows_of, ("prompt_lengths", "response_lengths", "truncated", "log_probs"))
        )


def group_seed(seed: int, iteration: int, prompt_number: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, prompt_number]).generate_state(1)[0])


@contextmanager
def decoding(model):
    """`model` (a GPTModel) in eval mode with sequence parallelism off; both restored after."""
    sequence_parallel, was_training = model.config.sequence_parallel, model.training
    if sequence_parallel:
        set_model_to_sequence_parallel(model, False)
    model.eval()
    try:
        yield
    finally:
        if sequence_parallel:
            set_model_to_sequence_parallel(model, True)
        model.train(was_training)


def largest_anywhere(value: int) -> int:
    """The largest of `value` over every rank."""
    largest = torch.tensor([value], device=platform.compute_device())
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return int(largest.item())


def smallest_anywhere(value: int) -> int:
    """The smallest of `value` over every rank."""
    return -largest_anywhere(-value)


def _sample(logits, sampling, generators, group_size, drawing: list[bool]):
    """A token per row of `logits` [rows, vocab]: each group's rows drawn with its own generator
    where `drawing` says so, zeros (replaced by the caller) where not."""
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    for g, generator in enumerate(generators):
        if drawing[g]:
            rows = slice(g * group_size, (g + 1) * group_size)
            tokens[rows] = sample(logits[rows], sampling.temperature, sampling.top_k, sampling.top_p, generator)
    return tokens


@torch.no_grad()
def _decode(model, prompts, prefill_length, generators, group_size, max_new_tokens, vocab_size, stop_ids, sampling):
    """Decodes `group_size` responses to each of `prompts` (any lengths >= `prefill_length`, the
    prefill's): [rows, longest + new tokens] token ids (prompt, response, then stop ids), each row's
    number of new tokens (with its stop id), and each new token's log-probability under
    softmax(logits / temperature) [rows, max_new_tokens], from each row's first response token on."""
    device = platform.compute_device()
    rows = len(prompts) * group_size
    total = largest_anywhere(max(map(len, prompts))) + max_new_tokens  # every rank runs as many steps
    context = StaticInferenceContext(rows, total)
    tokens = torch.full((rows, total), stop_ids[0], device=device)
    for g, prompt in enumerate(prompts):
        tokens[g * group_size : (g + 1) * group_size, : len(prompt)] = torch.tensor(prompt, device=device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(group_size)
    lengths = torch.full((rows,), max_new_tokens, device=device)
    log_probs = torch.zeros(rows, max_new_tokens, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    step_input = tokens[:, :prefill_length]
    for position in range(prefill_length, total):
        first = position - step_input.shape[1]  # of the positions this forward pass feeds
        positions = torch.arange(first, position, device=device).expand(rows, -1)
        logits = model(step_input, positions, None, inference_context=context, runtime_gather_output=True)
        logits = logits[:, -1, :vocab_size]
        answering = position >= prompt_lengths  # a prompt with tokens left is fed them
        drawn = _sample(logits, sampling, generators, group_size, [position >= len(p) for p in prompts])
        new = torch.where(answering, torch.where(finished, stops[0], drawn), tokens[:, position])
        # The new token's log-probability in its row's column; other rows rewrite a column unchanged.
        writing, column = answering & ~finished, (position - prompt_lengths).clamp(0, max_new_tokens - 1)[:, None]
        distribution = torch.log_softmax(logits.float() / sampling.temperature, dim=-1)
        kept = log_probs.gather(1, column)
        written = distribution.gather(
            -1, torch.where(writing, new, 0)[:, None]
        )  # a stop id may lie past the vocabulary
        log_probs.scatter_(1, column, torch.where(writing[:, None], written, kept))
        responded = position - prompt_lengths + 1
        ending = answering & ~finished & torch.isin(new, stops)
        lengths = torch.where(ending, responded, lengths)
        finished |= ending | (responded >= max_new_tokens)
        tokens[:, position] = new
        if not largest_anywhere(int(not finished.all())):
            break
        context.sequence_len_offset = position  # the next token's cache slot
        context.enable_decode_mode()
        # A finished row's stop id (which may lie past the vocabulary) is fed but never read.
        step_input = tokens[:, position : position + 1].clamp(max=vocab_size - 1)
    return tokens, lengths, log_probs


def _batches(prompts, group_size: int, max_batch: int) -> list:
    """The prompts' indices in batches of at most `max_batch` sequences (at least one prompt each; 0:
    no limit), by length: a batch's prompts are fed token by token from its shortest one's end on."""
    per_batch = max(max_batch // group_size, 1) if max_batch else len(prompts)
    by_length = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    return [by_length[i : i + per_batch] for i in range(0, len(prompts), per_batch)]


def generate_rollouts(
    model,
    prompts,
    first_prompt_number,
    group_size,
    max_new_tokens,
    vocab_size,
    stop_ids,
    sampling: Sampling,
    seed: int,
    iteration: int,
    max_batch: int = 0,
) -> Rollouts:
    """`group_size` responses to each of `prompts` (token id lists), the i-th prompt being the
    step's prompt number `first_prompt_number + i` (which seeds its group's draws); sequences in
    prompt order, a group's next to each other."""
    device = platform.compute_device()
    batches = _batches(prompts, group_size, max_batch)
    decoded = {}
    with decoding(model):
        for number in range(largest_anywhere(len(batches))):
            real = batches[number] if number < len(batches) else []
            # Copies of a prompt fill the batch to the width the other ranks decode (and are dropped).
            batch = real + [(real or batches[0])[0]] * (largest_anywhere(len(real)) - len(real))
            generators = [torch.Generator(device=device) for _ in batch]
            for index, generator in zip(batch, generators):
                generator.manual_seed(group_seed(seed, iteration, first_prompt_number + index))
            prefill_length = smallest_anywhere(min(len(prompts[i]) for i in batch))
            batch_prompts = [prompts[i] for i in batch]
            tokens, lengths, log_probs = _decode(
                model,
                batch_prompts,
                prefill_length,
                generators,
                group_size,
                max_new_tokens,
                vocab_size,
                stop_ids,
                sampling,
            )
            for position, index in enumerate(real):
                rows = slice(position * group_size, (position + 1) * group_size)
                decoded[index] = (tokens[rows].cpu(), lengths[rows].tolist(), log_probs[rows].cpu())
    return _assemble(prompts, decoded, stop_ids)


def _assemble(prompts, decoded: dict, stop_ids) -> Rollouts:
    rows, prompt_lengths, response_lengths, truncated, log_probs = [], [], [], [], []
    for index, prompt in enumerate(prompts):
        tokens, lengths, token_log_probs = decoded[index]
        for row, length, row_log_probs in zip(tokens, lengths, token_log_probs):
            rows.append(row[: len(prompt) + length])
            log_probs.append(row_log_probs[:length])
            prompt_lengths.append(len(prompt))
            response_lengths.append(length)
            truncated.append(int(row[len(prompt) + length - 1]) not in stop_ids)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=stop_ids[0])
    return Rollouts(padded, prompt_lengths, response_lengths, truncated, log_probs)
