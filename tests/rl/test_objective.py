"""megatron_r1.rl.objective: advantages, dynamic sampling, aggregation modes, the clipped policy loss
and k3 against hand computations."""

import math

import pytest
import torch

from megatron_r1.rl.objective import (
    AGGREGATIONS,
    aggregate_loss,
    aggregation_weights,
    dynamic_sampling_keep,
    group_advantages,
    kl_k3,
    policy_loss,
)

# Two responses of 3 and 1 tokens in a width of 4; the padding holds values that must not count.
VALUES = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_advantages_are_group_normalized_with_the_unbiased_std_and_zero_for_equal_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2: all equal
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(
        group_advantages(rewards, 4), torch.tensor([expected, -expected, -expected, expected, 0, 0, 0, 0])
    )
    assert torch.equal(
        group_advantages(rewards, 4, normalize_std=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    )
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32


def test_advantages_refuse_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="n_groups \\* group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4), 1)


def test_dynamic_sampling_keeps_the_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5])
    assert dynamic_sampling_keep(rewards, 3).tolist() == [False, True, False]


def test_each_aggregation_mode_against_a_hand_computation():
    assert aggregate_loss(VALUES, MASK, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", max_response_length=8).item() == pytest.approx(
        (6 / 8 + 4 / 8) / 2
    )
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq-mean'"):
        aggregate_loss(VALUES, MASK, "seq-mean")


def test_policy_loss_clips_outside_the_asymmetric_range_by_the_sign_of_the_advantage():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    logprobs = torch.log(ratios).requires_grad_()
    loss, stats = policy_loss(logprobs, torch.zeros(1, 5), advantages, torch.ones(1, 5), 0.2, 0.28, "token-mean")
    # A > 0, r = 1.5: clipped to 1.28; A > 0, r = 0.5: unclipped (the pessimistic term); A < 0, r = 0.5:
    # clipped to 0.8; A < 0, r = 1.5: unclipped; r = 1.1: inside the range.
    per_token = [-1.28, -0.5, 0.8, 1.5, -1.1]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx(ratios.mean().item())
    assert stats["approx_kl"].item() == pytest.approx(-torch.log(ratios).mean().item())
    loss.backward()
    # A clipped token passes no gradient; d(-A r)/d logp = -A r on the others.
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5, 0.0, 1.5, -1.1]]) / 5)


def test_policy_loss_without_clipping_is_minus_the_advantage_and_follows_the_aggregation():
    advantages = torch.tensor([[1.0, 1.0, 1.0, 9.0], [-2.0, 9.0, 9.0, 9.0]])
    logprobs = torch.full((2, 4), -1.0)
    expected = {
        "token-mean": -(1 + 1 + 1 - 2) / 4,
        "seq-mean-token-mean": (-1 + 2) / 2,
        "seq-mean-token-sum-norm": (-3 / 4 + 2 / 4) / 2,
    }
    for aggregation, value in expected.items():
        loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, MASK, 0.2, 0.2, aggregation, 4)
        assert loss.item() == pytest.approx(value), aggregation
        assert stats["clip_fraction"].item() == 0 and stats["ratio_mean"].item() == 1


def test_k3_is_zero_for_identical_logprobs_positive_otherwise_and_clamped():
    logprobs = torch.tensor([-1.0, -2.0, -0.5, -30.0])
    assert torch.equal(kl_k3(logprobs, logprobs), torch.zeros(4))
    reference = torch.tensor([-1.5, -1.0, -0.5, -0.1])
    kl = kl_k3(logprobs, reference)
    assert kl[0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert kl[1].item() == pytest.approx(math.exp(1.0) - 1.0 - 1)
    assert kl[0] > 0 and kl[1] > 0 and kl[2] == 0
    assert kl[3].item() == 10.0  # exp(20) - 20 - 1, clamped


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_aggregation_weights_of_the_parts_sum_to_the_whole_batch_aggregate(aggregation):
    """A batch cut into parts (micro-batches, data-parallel shares), each weighted with the whole
    batch's counts, sums to aggregate_loss of the whole batch."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 5, generator=generator)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).float()
    mask[2] = 0  # a response without tokens (e.g. a group dynamic sampling left out)
    whole = aggregate_loss(values, mask, aggregation, max_response_length=5)
    tokens, responses = int(mask.sum()), 6
    parts = sum(
        (aggregation_weights(mask[i : i + 2], aggregation, tokens, responses, 5) * values[i : i + 2]).sum()
        for i in range(0, 6, 2)
    )
    assert torch.allclose(parts, whole, atol=1e-6), (parts, whole)
