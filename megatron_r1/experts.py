"""Routed experts as grouped GEMMs with PyTorch alone (``--moe-grouped-gemm`` with the local spec).

megatron-core's grouped experts need TransformerEngine (TEGroupedMLP) or the ``grouped_gemm``
package (GroupedMLP); without them it runs SequentialMLP: two GEMMs per expert and a host sync per
layer (``tokens_per_expert.tolist()``). :class:`GroupedGemmExperts` is SequentialMLP with only the
compute replaced: the same per-expert modules, parameters, initialisation, checkpoint keys
(``local_experts.K.linear_fc1.weight``, sharded as SequentialMLP shards them), expert-parallel and
expert-tensor-parallel sharding and LoRA adapters; each linear of all local experts runs as one
``torch._grouped_mm`` over the tokens sorted by expert, cut by device-side int32 offsets (no host
sync). Where the kernel does not apply (see :func:`grouped_kernel_applies`) a loop over the experts
computes the same; on CPU, where the loop is the faster (benchmarks/bench_train.py), it is the
default and the host sync harmless. The experts' own linears never communicate (megatron-core's
``explicit_expert_comm``: the token dispatcher gathers and scatters), so neither does this.
"""

import dataclasses
import functools
import types

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

# torch >= 2.8 has the private op; later releases also name it torch.nn.functional.grouped_mm.
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# torch's CPU grouped GEMM computes what the loop computes, but slower (the weights must be stacked
# for it): off on CPU; tests turn it on to check it against the loop.
KERNEL_ON_CPU = False


def grouped_kernel_applies(*operands: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands fast and without a host sync: on CUDA only
    bf16 on Hopper or newer (elsewhere torch's CUDA op loops over the groups after copying the
    offsets to the host), on CPU (with KERNEL_ON_CPU) any float type. Every row stride must be a
    multiple of 16 bytes."""
    if _GROUPED_MM is None:
        return False
    first = operands[0]
    if first.is_cuda:
        if first.dtype != torch.bfloat16 or torch.cuda.get_device_capability(first.device)[0] < 9:
            return False
    elif first.device.type != "cpu" or not KERNEL_ON_CPU:
        return False
    return all(t.dtype == first.dtype and (t.shape[-1] * t.element_size()) % 16 == 0 for t in operands)


@dataclasses.dataclass
class ExpertGroups:
    """How the rows of the permuted tokens split over the local experts (sorted by expert)."""

    tokens_per_expert: torch.Tensor
    device: torch.device

    @functools.cached_property
    def ends(self) -> torch.Tensor:
        """Each expert's end row, int32 on the tokens' device: the grouped GEMM's offsets."""
        counts = self.tokens_per_expert.to(self.device, non_blocking=True)
        return torch.cumsum(counts, dim=0, dtype=torch.int32)

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Each expert's row count on the host (a sync on a GPU): only the loop fallback needs it."""
        return self.tokens_per_expert.tolist()


def _matmul_by_expert(rows: torch.Tensor, matrices: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """[T, K] rows sorted by expert, [E, K, N] matrices -> [T, N]: each expert's rows @ its matrix."""
    if grouped_kernel_applies(rows, matrices.transpose(1, 2), matrices):
        return _GROUPED_MM(rows, matrices, offs=groups.ends)
    return torch.cat([part @ matrix for part, matrix in zip(rows.split(groups.sizes), matrices)])


def _add_weight_grads(rows: torch.Tensor, grad_output: torch.Tensor, groups: ExpertGroups, targets: list):
    """targets[e] += expert e's grad_output rows^T @ its input rows (nothing for an expert without rows)."""
    if grouped_kernel_applies(rows, grad_output):
        torch._foreach_add_(targets, list(_GROUPED_MM(grad_output.t(), rows, offs=groups.ends).unbind()))
        return
    for target, part_grad, part_rows in zip(targets, grad_output.split(groups.sizes), rows.split(groups.sizes)):
        if target.dtype == rows.dtype:
            target.addmm_(part_grad.t(), part_rows)
        else:  # fp32 main_grad of bf16 weights
            target.add_(part_grad.t() @ part_rows)


class _GroupedLinear(torch.autograd.Function):
    """y = x @ W_e^T on the rows of every local expert e in one call. The weights are stacked for the
    GEMM in forward and again in backward (a copy that is not kept between them, so activation
    memory stays that of SequentialMLP). With megatron-core's gradient-accumulation fusion the
    weight gradients go straight into main_grad, as its linear layers do."""

    @staticmethod
    def forward(ctx, rows, groups: ExpertGroups, accumulate_in_main_grad: bool, *weights):
        ctx.save_for_backward(rows, *weights)
        ctx.groups, ctx.accumulate_in_main_grad = groups, accumulate_in_main_grad
        return _matmul_by_expert(rows, torch.stack(weights).transpose(1, 2), ctx.groups)

    @staticmethod
    def backward(ctx, grad_output):
        rows, *weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()  # the kernel refuses broadcast (zero-stride) gradients
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = _matmul_by_expert(grad_output, torch.stack(weights), ctx.groups)
        if not any(ctx.needs_input_grad[3:]):
            return grad_rows, None, None, *(None for _ in weights)
        if not ctx.accumulate_in_main_grad:
            grads = [torch.zeros_like(weight) for weight in weights]
            _add_weight_grads(rows, grad_output, ctx.groups, grads)
            return grad_rows, None, None, *grads
        _add_weight_grads(rows, grad_output, ctx.groups, [weight.main_grad for weight in weights])
        for weight in weights:
            weight.grad_added_to_main_grad = True
        # As megatron-core's linears: placeholder gradients, so that DDP's hook runs (on this
        # thread) and adds nothing more.
        return grad_rows, None, None, *(torch.empty_like(weight) for weight in weights)


def grouped_linear(rows: torch.Tensor, groups: ExpertGroups, weights: list[torch.Tensor], fuse_accumulation=False):
    accumulate = fuse_accumulation and all(hasattr(w, "main_grad") and w.requires_grad for w in weights)
    return _GroupedLinear.apply(rows, groups, accumulate, *weights)


class _ExpertLinears:
    """linear_fc1 or linear_fc2 of all local experts, called as megatron-core's MLP calls one:
    ``(output, bias)``. LoRA adapters (megatron_r1.lora) on the experts' linears are added as
    grouped GEMMs too."""

    def __init__(self, linears: list, groups: ExpertGroups):
        self.linears, self.groups = linears, groups

    def __call__(self, rows):
        first = self.linears[0]
        fuse = getattr(first, "gradient_accumulation_fusion", False)
        output = grouped_linear(rows, self.groups, [linear.weight for linear in self.linears], fuse)
        if hasattr(first, "lora_a"):
            # An expert's input is whole on every rank (LoRA refuses expert tensor parallelism).
            adapter_rows = first._dropout(rows, input_sharded=False)
            low_rank = grouped_linear(adapter_rows, self.groups, [linear.lora_a for linear in self.linears])
            update = grouped_linear(low_rank, self.groups, [linear.lora_b for linear in self.linears])
            output = output + update * first.lora.scale
        return output, None


class GroupedGemmExperts(SequentialMLP):
    """SequentialMLP computing all local experts with grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        if config.add_bias_linear:
            raise ValueError("--moe-grouped-gemm experts have no biases: add --disable-bias-linear")
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.config.moe_apply_probs_on_input:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        groups = ExpertGroups(tokens_per_expert, permuted_local_hidden_states.device)
        experts = list(self.local_experts)
        # megatron-core's own MLP.forward, on the experts' linears taken together: the activation,
        # the routing-probability scaling and their fusions stay exactly SequentialMLP's.
        all_experts = types.SimpleNamespace(
            config=experts[0].config,
            activation_func=experts[0].activation_func,
            linear_fc1=_ExpertLinears([expert.linear_fc1 for expert in experts], groups),
            linear_fc2=_ExpertLinears([expert.linear_fc2 for expert in experts], groups),
        )
        output, _ = MLP.forward(all_experts, permuted_local_hidden_states, per_token_scale=permuted_probs)
        return output, None
