"""MoE token permutation without host syncs where every expert is local (EP = 1, expert TP = 1).

megatron-core 0.16.1's all-gather and all-to-all dispatchers, without TransformerEngine's fused
permutation, make the host wait for the GPU three times per MoE layer and micro-batch: they copy
the tokens per expert to the host, and select the tokens (and their routing probabilities) with
``torch.masked_select``, whose output size the host must learn. With all experts on this rank and no
token dropped (no capacity factor, no padding for quantization), each token goes to exactly top-k
experts, so the permuted rows number tokens x top-k, known ahead. :func:`permute_by_expert` then
finds megatron-core's order (by expert, then by token) with a stable sort, and the tokens per
expert stay on the device, where the grouped experts (megatron_r1.experts) take their offsets from
them; SequentialMLP still reads them on the host, once. Everywhere else (expert parallelism,
token dropping, TransformerEngine's fused permutation, shared-expert overlap) megatron-core's
dispatchers run unchanged.
"""

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher


def permute_by_expert(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor, top_k: int):
    """megatron-core's ``permute`` (rows grouped by expert, token order within each expert) for a
    [tokens, experts] routing map with exactly `top_k` experts per token, without a host sync:
    the permuted tokens, their probabilities and each row's token index (for ``unpermute``)."""
    num_tokens = routing_map.shape[0]
    chosen = routing_map.T.reshape(-1).to(torch.uint8)  # expert-major, as megatron-core orders rows
    # The stable sort puts the chosen (expert, token) pairs first, in that order; they number
    # tokens x top-k, so the output's size is known without looking at the map.
    order = torch.argsort(chosen, descending=True, stable=True)[: num_tokens * top_k]
    token_of_row = order % num_tokens
    return tokens.index_select(0, token_of_row), probs.T.reshape(-1).index_select(0, order), token_of_row


class DevicePermutationDispatcher(MoEAllGatherTokenDispatcher):
    """The all-gather dispatcher on one rank (nothing to gather or scatter) with the permutation of
    :func:`permute_by_expert`; its unpermutation is megatron-core's (a scatter-add, no sync)."""

    def dispatch_postprocess(self, hidden_states, probs):
        self.hidden_shape_before_permute = hidden_states.shape
        self.local_map = self.routing_map
        tokens_per_expert = self.routing_map.sum(dim=0)  # stays on the device
        permuted_tokens, permuted_probs, self.reversed_local_input_permutation_mapping = permute_by_expert(
            hidden_states, self.routing_map, probs, self.config.moe_router_topk
        )
        self.routing_map = None
        return permuted_tokens, tokens_per_expert, permuted_probs


def permutes_on_device(config, dispatcher) -> bool:
    """Whether `dispatcher` (megatron-core's, as MoELayer built it) can be replaced by
    DevicePermutationDispatcher: all experts on this rank, dropless, megatron-core's own permutation
    (not TransformerEngine's fused one), no shared-expert overlap (which only the all-to-all
    dispatcher drives)."""
    return (
        type(dispatcher) in (MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher)
        and dispatcher.ep_size == 1
        and dispatcher.tp_size == 1
        and config.moe_expert_capacity_factor is None
        and not config.moe_router_padding_for_quantization
        and not config.moe_permute_fusion
        and not config.moe_shared_expert_overlap
    )


class DevicePermutationMoELayer(MoELayer):
    """megatron-core's MoELayer whose dispatcher is DevicePermutationDispatcher where that applies."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        if permutes_on_device(config, self.token_dispatcher):
            self.token_dispatcher = DevicePermutationDispatcher(
                self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
            )
