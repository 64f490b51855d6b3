"""MoE token permutation without the host syncs megatron-core's plain permutation makes.

megatron-core 0.16.1's all-gather and all-to-all dispatchers, without TransformerEngine's fused
permutation, make the host wait for the GPU three times per MoE layer and micro-batch: they copy
the tokens per expert (or the all-to-all's split sizes) to the host, and select the tokens and
their routing probabilities with ``torch.masked_select``, whose output size the host must learn.
Without token dropping (no capacity factor, no padding for quantization) each token goes to exactly
top-k experts, so a permutation of a rank's tokens over all experts has tokens x top-k rows, known
ahead: :func:`permute_by_expert` finds megatron-core's order (by expert, then by token) with a
stable sort instead.

- All experts on the rank (EP = 1, expert TP = 1): :class:`DevicePermutationDispatcher`, no host
  sync at all; the tokens per expert stay on the device, where the grouped experts
  (megatron_r1.experts) take their offsets from them (SequentialMLP still reads them, once).
- Expert or expert-tensor parallelism with the all-to-all dispatcher:
  :class:`DevicePermutationAlltoAllDispatcher`, one wait per layer, for the split sizes NCCL's
  all-to-all takes on the host (megatron-core copies them on a side stream).

Elsewhere (token dropping, TransformerEngine's fused permutation, shared-expert overlap, the
all-gather dispatcher under EP, whose rank-local share of the tokens depends on the routing)
megatron-core's dispatchers run unchanged.
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


class DevicePermutationAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron-core's all-to-all dispatcher whose first permutation (this rank's tokens over all
    experts, before the all-to-all) is :func:`permute_by_expert`; the rest is megatron-core's."""

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape, self.probs, self.routing_map = hidden_states.shape, probs, routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        # The split sizes start for the host on megatron-core's side stream; it waits at the all-to-all.
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.preprocess(routing_map))
        self.hidden_shape_before_permute = hidden_states.shape
        permuted_tokens, permuted_probs, self.reversed_local_input_permutation_mapping = permute_by_expert(
            hidden_states, routing_map, probs, self.config.moe_router_topk
        )
        return permuted_tokens, permuted_probs


def device_permutation(config, dispatcher):
    """The dispatcher class that replaces `dispatcher` (megatron-core's, as MoELayer built it), or
    None where megatron-core's must run: with token dropping, TransformerEngine's fused
    permutation or shared-expert overlap (which the all-to-all dispatcher drives), or the all-gather
    dispatcher with experts on other ranks."""
    if (
        type(dispatcher) not in (MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher)
        or config.moe_expert_capacity_factor is not None
        or config.moe_router_padding_for_quantization
        or config.moe_permute_fusion
        or config.moe_shared_expert_overlap
    ):
        return None
    if dispatcher.ep_size == 1 and dispatcher.tp_size == 1:
        return DevicePermutationDispatcher
    return DevicePermutationAlltoAllDispatcher if type(dispatcher) is MoEAlltoAllTokenDispatcher else None


class DevicePermutationMoELayer(MoELayer):
    """megatron-core's MoELayer with the dispatcher :func:`device_permutation` picks, where it picks one."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        dispatcher = device_permutation(config, self.token_dispatcher)
        if dispatcher is not None:
            self.token_dispatcher = dispatcher(
                self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
            )
