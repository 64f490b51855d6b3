"""Text generation from one of our checkpoints: the model rebuilt in one process from the flags
saved with it, and sampling with megatron-core's static KV cache (``StaticInferenceContext``: each
attention layer keeps its keys/values, so a new token costs one token's forward pass)."""

import torch

from megatron_r1 import platform
from megatron_r1.checkpointing import load_weights
from megatron_r1.model import build_model


def load_model(checkpoint: str):
    """(args, GPTModel in eval mode) of checkpoint directory `checkpoint` (an ``iter_XXXXXXX``),
    resharded to one process (needs a one-process megatron-core parallel state). The MTP layers are
    left out: they predict a further token, which next-token logits do not use (and megatron-core's
    forward with MTP requires labels)."""
    from megatron_r1.hf.config import checkpoint_args

    args = checkpoint_args(checkpoint)
    (model,) = build_model(args, with_mtp=False, initialize=False)
    load_weights(checkpoint, [model])
    return args, model.eval()


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """Next-token ids [b] from logits [b, vocab]: argmax when temperature is 0, otherwise a draw from
    the softmax at `temperature` restricted to the `top_k` most likely tokens (0: all) and to the
    smallest set whose probability reaches `top_p` (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the ones before it already reach top_p (the most likely always stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, vocab_size: int, stop_ids=(),
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_kv_cache: bool = True, on_token=None) -> list[int]:  # fmt: skip
    """The new token ids after `prompt` (at most `max_new_tokens`, stopping after any of `stop_ids`).
    Padded vocabulary rows (ids >= vocab_size) are never sampled. `on_token(id)` is called per new token."""
    from megatron.core.inference.contexts import StaticInferenceContext

    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    device = platform.compute_device()
    generator = torch.Generator(device=device).manual_seed(seed)
    context = StaticInferenceContext(1, len(prompt) + max_new_tokens) if use_kv_cache else None
    tokens = torch.tensor([prompt], device=device)
    new = []
    step_input, start = tokens, 0
    for _ in range(max_new_tokens):
        positions = torch.arange(start, start + step_input.shape[1], device=device).unsqueeze(0)
        logits = model(step_input, positions, None, inference_context=context, runtime_gather_output=True)
        next_id = int(sample(logits[:, -1, :vocab_size], temperature, top_k, top_p, generator)[0])
        new.append(next_id)
        if on_token is not None:
            on_token(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.cat([tokens, torch.tensor([[next_id]], device=device)], dim=1)
        if context is not None:
            context.sequence_len_offset += step_input.shape[1]
            context.enable_decode_mode()
            step_input, start = tokens[:, -1:], tokens.shape[1] - 1
        else:
            step_input = tokens
    return new
