"""megatron_r1.experts (--moe-grouped-gemm without TransformerEngine): torch's grouped GEMM and the
loop that stands in for it compute what one GEMM per expert computes, without a host sync on the
kernel's path (the grouped experts train like megatron-core's SequentialMLP under expert and
expert-tensor parallelism, with LoRA: tests/test_layouts.py)."""

import pytest
import torch

from megatron_r1 import experts

TOKENS_PER_EXPERT = [3, 0, 6, 2]  # an expert without tokens too


def _operands(in_features, out_features):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(sum(TOKENS_PER_EXPERT), in_features, generator=generator, requires_grad=True)
    weights = [
        torch.randn(out_features, in_features, generator=generator, requires_grad=True) for _ in TOKENS_PER_EXPERT
    ]
    return rows, weights, torch.randn(len(rows), out_features, generator=generator)


def _per_expert_reference(rows, weights, grad_output):
    """One GEMM per expert, as SequentialMLP computes: output, input gradient, weight gradients."""
    output = torch.cat([part @ w.t() for part, w in zip(rows.split(TOKENS_PER_EXPERT), weights)])
    return output.detach(), *torch.autograd.grad(output, [rows, *weights], grad_output)


# 16 features: 64-byte rows, torch's grouped GEMM; 10: 40-byte rows, which it refuses, so the loop.
@pytest.mark.parametrize("in_features, kernel_calls", [(16, 3), (10, 0)])
@pytest.mark.parametrize("into_main_grad", [False, True], ids=["autograd", "main_grad"])
def test_grouped_linear_equals_a_gemm_per_expert(in_features, kernel_calls, into_main_grad, monkeypatch):
    monkeypatch.setattr(experts, "KERNEL_ON_CPU", True)  # torch's CPU kernel, which stands in for CUDA's
    rows, weights, grad_output = _operands(in_features, 12)
    expected_output, expected_grad_rows, *expected_weight_grads = _per_expert_reference(rows, weights, grad_output)
    for weight in weights:  # as megatron-core's DDP wrapper leaves them
        weight.main_grad = torch.ones_like(weight)
        weight.grad_added_to_main_grad = False
    kernel = experts._GROUPED_MM
    calls = []
    monkeypatch.setattr(experts, "_GROUPED_MM", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    if kernel_calls:  # the counts never go to the host (on a GPU: no sync)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host sync on the kernel path"))
    groups = experts.ExpertGroups(torch.tensor(TOKENS_PER_EXPERT), rows.device)
    output = experts.grouped_linear(rows, groups, weights, fuse_accumulation=into_main_grad)
    output.backward(grad_output)
    assert len(calls) == kernel_calls  # forward, input gradient, weight gradients
    torch.testing.assert_close(output, expected_output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows.grad, expected_grad_rows, rtol=1e-6, atol=1e-6)
    for weight, expected in zip(weights, expected_weight_grads):
        if into_main_grad:  # accumulated in place, as megatron-core's gradient-accumulation fusion does
            assert weight.grad_added_to_main_grad
            torch.testing.assert_close(weight.main_grad, expected + 1, rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(weight.main_grad, torch.ones_like(weight))
    assert not expected_weight_grads[1].any()  # the expert without tokens


def test_the_kernel_is_chosen_only_where_it_is_fast_and_sync_free(monkeypatch):
    cpu = torch.empty(4, 16)
    assert not experts.grouped_kernel_applies(cpu, torch.empty(2, 16, 8))  # the loop is faster on CPU
    monkeypatch.setattr(experts, "KERNEL_ON_CPU", True)
    assert experts.grouped_kernel_applies(cpu, torch.empty(2, 16, 8))
    assert not experts.grouped_kernel_applies(cpu, torch.empty(2, 16, 6))  # 24-byte rows
    assert not experts.grouped_kernel_applies(cpu, torch.empty(2, 16, 8, dtype=torch.float64))  # mixed types
    assert not experts.grouped_kernel_applies(torch.empty(4, 16, device="meta"))
