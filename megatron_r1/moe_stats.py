"""Per-layer expert load: tokens routed to each expert, summed over all ranks, as max/mean."""

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_r1 import platform


class ExpertLoadTracker:
    """Counts the tokens each router sends to each expert between two :meth:`collect` calls.

    Summing over the whole world is exact: sequence/data/expert-parallel ranks route disjoint
    tokens, and pipeline stages hold disjoint layers (whose rows stay zero elsewhere).
    """

    def __init__(self, model_chunks, num_layers: int, num_experts: int):
        self.counts = torch.zeros(num_layers, num_experts, device=platform.compute_device())
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router, inputs, outputs):
        _, routing_map = outputs
        # layer_number is 1-based across the whole model; MTP layers follow the decoder's.
        self.counts[router.layer_number - 1] += routing_map.detach().sum(dim=0).to(self.counts.dtype)

    def reset(self):
        self.counts.zero_()

    def collect(self) -> dict[int, float]:
        """{1-based layer number: max/mean tokens per expert} for the MoE layers (collective)."""
        counts = self.counts.clone()
        torch.distributed.all_reduce(counts)
        self.reset()
        routed = counts.sum(dim=1) > 0
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
        return {layer + 1: imbalance[layer].item() for layer in torch.nonzero(routed).flatten().tolist()}
