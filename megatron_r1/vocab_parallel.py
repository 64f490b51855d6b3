"""Softmax figures over logits split by vocabulary across the tensor-parallel ranks ([.., V/TP]
shards, as megatron-core's output layer leaves them): log-softmax at a temperature, the KL of two
distributions, the log-probability of given ids and the entropy. Each equals the full-vocabulary
computation, gradients included; padded vocabulary rows (ids >= vocab_size) are no outcome."""

from contextlib import contextmanager
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


class _SumOverTensorParallelRanks(torch.autograd.Function):
    """A sum over the TP group whose gradient is summed over the group too: every rank's loss
    depends on every rank's part of the sum (megatron-core's reduce_from_tensor_model_parallel_region
    passes the gradient through unreduced, right only where the loss is summed after it on every
    rank from the same replicated value)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=parallel_state.get_tensor_model_parallel_group())
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def _shard_start(shard: int) -> int:
    return parallel_state.get_tensor_model_parallel_rank() * shard


def log_softmax(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """fp32 log-probabilities of this rank's vocabulary shard of softmax(logits / temperature)."""
    shard = logits.shape[-1]
    start = _shard_start(shard)
    real = torch.arange(start, start + shard, device=logits.device) < vocab_size
    logits = (logits.float() / temperature).masked_fill(~real, -1e9)
    maximum = logits.max(dim=-1, keepdim=True).values.detach()
    torch.distributed.all_reduce(
        maximum, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
    )
    # Every rank's figures below take log Z from all ranks' logits: its gradient sums too.
    sum_exp = _SumOverTensorParallelRanks.apply((logits - maximum).exp().sum(dim=-1, keepdim=True))
    return logits - maximum - sum_exp.log()


def kl_divergence(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(reference || log_probs' distribution) from two log_softmax results."""
    local = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1)
    return reduce_from_tensor_model_parallel_region(local)


def log_probs_of(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position log-probability of `ids` (shape log_probs.shape[:-1]) from a log_softmax result."""
    shard = log_probs.shape[-1]
    local_ids = ids - _shard_start(shard)
    here = (local_ids >= 0) & (local_ids < shard)
    local = log_probs.gather(-1, local_ids.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1) * here
    return reduce_from_tensor_model_parallel_region(local)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of a log_softmax result."""
    return reduce_from_tensor_model_parallel_region(-(log_probs.exp() * log_probs).sum(dim=-1))


def _keep_output(captured, module, inputs, output):
    # A copy: a cross entropy after the output layer overwrites the logits in place (megatron's
    # fused vocab-parallel CE). With MTP the main head's call comes after the MTP heads'.
    captured["logits"] = output[0].clone()


@contextmanager
def main_head_logits(model):
    """Inside: the dict it yields receives the main output layer's logits [s, b, V/TP] of each
    forward of `model` (a GPTModel, or DDP around one)."""
    captured = {}
    module = getattr(model, "module", model)
    handle = module.output_layer.register_forward_hook(partial(_keep_output, captured))
    try:
        yield captured
    finally:
        handle.remove()
