"""megatron_r1.token_dispatch: the MoE layers permute tokens as megatron-core's dispatchers do, with
all experts local without a host sync, under expert and expert-tensor parallelism without
masked_select (the layouts train alike: tests/test_layouts.py)."""

from pathlib import Path

import torch
from conftest import run_command
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher

from megatron_r1 import experts
from megatron_r1.arguments import parse_args
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.host_syncs import host_syncs_counted
from megatron_r1.model import build_model
from megatron_r1.token_dispatch import DevicePermutationAlltoAllDispatcher, DevicePermutationDispatcher

# Two MoE layers of 4 experts (top-2, shared expert) after a dense one; grouped experts, whose CPU
# kernel stands in for a GPU's (the loop fallback reads the counts on the host).
FLAGS = ["--mock-data", "--vocab-size", "64", "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
         "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
         "--moe-shared-expert-intermediate-size", "16", "--moe-layer-freq", "[0,1,1]", "--moe-router-topk", "2",
         "--moe-grouped-gemm", "--moe-aux-loss-coeff", "1e-2", "--hidden-dropout", "0", "--seq-length", "8"]  # fmt: skip


def moe_layers(model):
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def loss_grads_and_syncs(model, tokens):
    model.zero_grad()
    with host_syncs_counted(torch.device("cpu")) as syncs:
        loss = model(tokens, torch.arange(8).expand(2, 8), None, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, +syncs


def with_dispatcher(model, layers, dispatcher, tokens):
    """loss_grads_and_syncs with a new `dispatcher` (a class) in each of the MoE `layers`."""
    for layer in layers:
        layer.token_dispatcher = dispatcher(
            layer.num_local_experts, layer.local_expert_indices, model.config, get_default_pg_collection()
        )
    return loss_grads_and_syncs(model, tokens)


def assert_same_loss_and_grads(ours, peers, label: str) -> None:
    """Two loss_grads_and_syncs results: the same loss and every gradient, bit for bit."""
    torch.testing.assert_close(ours[0], peers[0], rtol=0, atol=0, msg=label)
    for name, grad in peers[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=0, atol=0, msg=f"{label}: {name}")


def test_all_local_experts_permute_as_megatron_core_without_a_host_sync(monkeypatch):
    monkeypatch.setattr(experts, "KERNEL_ON_CPU", True)
    # The aux loss's backward sets megatron-core's global loss scale, which training sets first.
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    initialize_distributed()
    try:
        args = parse_args("test", FLAGS)
        args.padded_vocab_size = 64
        (model,) = build_model(args)
        layers = moe_layers(model)
        assert len(layers) == 2 and all(type(layer.token_dispatcher) is DevicePermutationDispatcher for layer in layers)
        ours = loss_grads_and_syncs(model, tokens)
        assert ours[2] == {}, ours[2]  # forward and backward: nothing waits for the device
        for peer in (MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher, DevicePermutationAlltoAllDispatcher):
            peers = with_dispatcher(model, layers, peer, tokens)
            if peer is DevicePermutationAlltoAllDispatcher:  # expert parallelism's, here on one rank
                assert peers[2]["masked_select"] == 0, peers[2]
            else:
                assert peers[2]["masked_select"] >= 2 * len(layers), (peer, peers[2])  # tokens, probabilities
            assert_same_loss_and_grads(ours, peers, peer.__name__)

        # Dropping tokens (a capacity) sizes the permutation by the data: megatron-core's dispatcher.
        args = parse_args("test", [*FLAGS, "--moe-expert-capacity-factor", "1.0"])
        args.padded_vocab_size = 64
        (model,) = build_model(args)
        assert {type(layer.token_dispatcher) for layer in moe_layers(model)} == {MoEAllGatherTokenDispatcher}
    finally:
        destroy_distributed()


def test_expert_parallel_layers_permute_as_megatron_core_without_masked_select(tmp_path):
    """EP=2 and expert TP=2 on 2 ranks: tests/workers/moe_dispatch.py."""
    worker = Path(__file__).parent / "workers" / "moe_dispatch.py"
    run_command(["torchrun", "--standalone", "--nproc_per_node=2", str(worker)], tmp_path, timeout=180)
