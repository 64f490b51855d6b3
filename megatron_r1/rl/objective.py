"""GRPO's objective on torch tensors: group-relative advantages, the clipped surrogate policy loss,
the k3 KL estimator and the loss aggregation modes. Pure functions (no distributed calls, any device).

Shapes: a batch holds ``n_groups * group_size`` responses, the ``group_size`` samples of each prompt
next to each other; per-token tensors are ``[responses, max_response_tokens]`` with a 0/1 (or bool)
``mask`` of the response tokens that count.

- Advantages (DeepSeekMath, arXiv 2402.03300, section 4.1.2): each response's reward minus its
  group's mean, divided by the group's standard deviation (``normalize_std``; Dr. GRPO, arXiv
  2503.20783, leaves the division out). The standard deviation is torch.std's unbiased one, and eps
  is added to it, as in verl's ``compute_grpo_outcome_advantage``; a group whose rewards are all
  equal gets advantages of 0.
- Dynamic sampling (DAPO, arXiv 2503.14476, section 3.2): groups whose rewards are all equal carry
  no gradient; :func:`dynamic_sampling_keep` names the others.
- Policy loss: PPO's clipped surrogate per token, ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``
  with the importance ratio ``r = exp(logp - old_logp)`` (the log-ratio clamped to [-20, 20] before
  exp, as verl does) and separate lower/upper epsilons (DAPO's clip-higher).
- KL to the reference policy: Schulman's k3 estimator (DeepSeek-R1's and DeepSeekMath's, verl's
  ``low_var_kl``), added to the loss by the caller as ``beta * aggregate_loss(kl, mask, ...)``.
- Aggregation, named as verl's ``agg_loss`` modes (:data:`AGGREGATIONS`):
  ``token-mean`` (DAPO: every response token of the batch weighs the same),
  ``seq-mean-token-mean`` (GRPO: each response's token mean, then the mean over responses),
  ``seq-mean-token-sum-norm`` (Dr. GRPO: each response's token sum divided by a constant, the
  maximum response length, then the mean over responses; verl sums over responses instead of
  averaging, a factor of the batch size apart).

The aggregation is over the tensors given: a caller that splits a batch into micro-batches or over
data-parallel ranks weighs the parts itself (by their mask tokens for ``token-mean``, by their
responses for the other two).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Clamps of verl: the log importance ratio before exp (no overflow), the k3 value (no outlier token).
_LOG_RATIO_LIMIT = 20.0
_K3_LIMIT = 10.0


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (a group's mean is its baseline), got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be one value per response, n_groups * group_size of them; got shape "
            f"{tuple(rewards.shape)} with group_size {group_size}"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """One advantage per response: its reward minus its group's mean, over the group's unbiased
    standard deviation plus ``eps`` when ``normalize_std``. Float rewards keep their dtype."""
    grouped = _grouped(rewards if rewards.is_floating_point() else rewards.float(), group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A bool per group: True where the group's rewards are not all equal (DAPO's dynamic sampling
    drops the others, whose advantages are all 0)."""
    grouped = _grouped(rewards, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def aggregate_loss(
    values: torch.Tensor, mask: torch.Tensor, aggregation: str, max_response_length: int | None = None
) -> torch.Tensor:
    """The scalar of per-token ``values`` [responses, tokens] over the ``mask`` tokens, by one of
    :data:`AGGREGATIONS`. ``max_response_length``, the constant divisor of ``seq-mean-token-sum-norm``
    (the rollout's maximum response length, the same every step), is needed by that mode only.
    A response without mask tokens adds 0 and still counts as a response in the seq-mean modes."""
    mask = mask.to(values.dtype)
    if aggregation == "token-mean":
        return _masked_mean(values, mask)
    token_sums = (values * mask).sum(dim=-1)
    if aggregation == "seq-mean-token-mean":
        return (token_sums / mask.sum(dim=-1).clamp(min=1)).mean()
    if aggregation == "seq-mean-token-sum-norm":
        if not max_response_length or max_response_length < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs max_response_length >= 1, got {max_response_length}")
        return (token_sums / max_response_length).mean()
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


def aggregation_weights(
    mask: torch.Tensor,
    aggregation: str,
    total_tokens: int,
    total_responses: int,
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Per-token weights of a part of a batch (a micro-batch, a data-parallel rank's share) such
    that ``(weights * values).sum()`` summed over the parts equals :func:`aggregate_loss` of the
    whole batch; ``total_tokens`` and ``total_responses`` are the whole batch's mask tokens and
    responses (a batch without any weighs nothing)."""
    mask, total_responses = mask.float(), max(total_responses, 1)
    if aggregation == "token-mean":
        return mask / max(total_tokens, 1)
    if aggregation == "seq-mean-token-mean":
        return mask / (mask.sum(dim=-1, keepdim=True).clamp(min=1) * total_responses)
    if aggregation == "seq-mean-token-sum-norm":
        if not max_response_length or max_response_length < 1:
            raise ValueError(f"seq-mean-token-sum-norm needs max_response_length >= 1, got {max_response_length}")
        return mask / (max_response_length * total_responses)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: the clipped surrogate loss ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``,
    the ratio r, the clamped log-ratio, and whether the clipped term is the one taken (no gradient)."""
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, log_ratio, clipped > unclipped


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    max_response_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate loss of the current ``logprobs`` against the rollout's ``old_logprobs``
    (both [responses, tokens]) with ``advantages`` broadcastable to them (per token, or [responses, 1]),
    aggregated by ``aggregation`` (see :func:`aggregate_loss`). Also returns detached statistics over
    the mask tokens: ``clip_fraction`` (tokens whose clipped term is the one in the loss, i.e. carries
    no gradient), ``ratio_mean`` and ``approx_kl`` (mean of old_logp - logp), 0-dim tensors that cost
    no host read until the caller logs them."""
    mask = mask.to(logprobs.dtype)
    per_token, ratio, log_ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    loss = aggregate_loss(per_token, mask, aggregation, max_response_length)
    with torch.no_grad():
        stats = {
            "clip_fraction": _masked_mean(clipped.to(mask.dtype), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "approx_kl": _masked_mean(-log_ratio, mask),
        }
    return loss, stats


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref_logp - logp``
    (0 where they agree, positive elsewhere). As verl's ``low_var_kl``, ``d`` is clamped to [-20, 20]
    and the result to [-10, 10], so that one token far off the reference cannot dominate the loss."""
    difference = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return (torch.exp(difference) - difference - 1.0).clamp(-_K3_LIMIT, _K3_LIMIT)
