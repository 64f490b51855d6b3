"""Rollouts: `group_size` sampled responses per prompt from the current policy, batched per prompt
with megatron-core's static KV cache, in the training processes and their TP/EP layout.

- Every sequence of a group is drawn from a generator seeded by (seed, iteration, the prompt's
  number in the step), so a prompt gets the same responses in any parallel layout and on resume.
- Tensor-parallel ranks decode the same prompts with the same generator and identical (gathered)
  logits, so they draw the same tokens. Sequence parallelism is switched off while decoding (one
  new token cannot be split over ranks), as megatron-core's own generation does.
- Every rank decodes the same number of steps (an all-reduce per step asks whether any sequence
  anywhere is unfinished) and prefills the same number of positions (prompts are padded at the
  end to the longest prompt of the step's group on any rank; the padding's cache entries are
  overwritten by the response): expert-parallel ranks exchange tokens in every forward pass, and
  megatron-core's all-gather dispatcher needs as many tokens on each.
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


@torch.no_grad()
def _sample_group(model, prompt, prefill_length, group_size, max_new_tokens, vocab_size, stop_ids, sampling, generator):
    """[group_size, len(prompt) + new tokens] token ids (prompt, responses, then stop-id padding),
    the number of new tokens each response has (with its stop id), and each new token's
    log-probability under softmax(logits / temperature) [group_size, new tokens]. The prefill runs
    over `prefill_length` >= len(prompt) positions."""
    device = platform.compute_device()
    context = StaticInferenceContext(group_size, prefill_length + max_new_tokens)
    context.materialize_only_last_token_logits = False  # the prompt's last logits may precede padding
    tokens = torch.tensor([prompt] * group_size, device=device)
    lengths = torch.full((group_size,), max_new_tokens, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    finished = torch.zeros(group_size, dtype=torch.bool, device=device)
    step_input = torch.nn.functional.pad(tokens, (0, prefill_length - len(prompt)))
    start, last, log_probs = 0, len(prompt) - 1, []
    for step in range(max_new_tokens):
        positions = torch.arange(start, start + step_input.shape[1], device=device).expand(group_size, -1)
        logits = model(step_input, positions, None, inference_context=context, runtime_gather_output=True)
        new = sample(logits[:, last, :vocab_size], sampling.temperature, sampling.top_k, sampling.top_p, generator)
        new = torch.where(finished, stops[0], new)  # finished rows repeat a stop id (masked out later)
        distribution = torch.log_softmax(logits[:, last, :vocab_size].float() / sampling.temperature, dim=-1)
        log_probs.append(distribution.gather(-1, new[:, None]).squeeze(-1))
        ending = ~finished & torch.isin(new, stops)
        lengths = torch.where(ending, step + 1, lengths)
        finished |= ending
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        if not largest_anywhere(int(not finished.all())):
            break
        context.sequence_len_offset = tokens.shape[1] - 1  # the next token's cache slot (past the padding: overwritten)
        context.enable_decode_mode()
        step_input, start, last = tokens[:, -1:], tokens.shape[1] - 1, -1
    return tokens, lengths, torch.stack(log_probs, dim=1)


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
) -> Rollouts:
    """`group_size` responses to each of `prompts` (token id lists), the i-th prompt being the
    step's prompt number `first_prompt_number + i` (which seeds its group's draws)."""
    device = platform.compute_device()
    rows, prompt_lengths, response_lengths, truncated, log_probs = [], [], [], [], []
    with decoding(model):
        for offset, prompt in enumerate(prompts):
            generator = torch.Generator(device=device)
            generator.manual_seed(group_seed(seed, iteration, first_prompt_number + offset))
            prefill_length = largest_anywhere(len(prompt))
            tokens, lengths, token_log_probs = _sample_group(
                model, prompt, prefill_length, group_size, max_new_tokens, vocab_size, stop_ids, sampling, generator
            )
            for row, length, row_log_probs in zip(tokens.cpu(), lengths.tolist(), token_log_probs.cpu()):
                rows.append(row[: len(prompt) + length])
                log_probs.append(row_log_probs[:length])
                prompt_lengths.append(len(prompt))
                response_lengths.append(length)
                truncated.append(int(row[len(prompt) + length - 1]) not in stop_ids)
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=stop_ids[0])
    return Rollouts(padded, prompt_lengths, response_lengths, truncated, log_probs)
