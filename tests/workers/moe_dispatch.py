"""Under torchrun with 2 ranks: the MoE layers of a model built by build_model under expert
parallelism (EP=2) and expert-tensor parallelism (TP=2 with sequence parallelism, expert TP=2)
dispatch with DevicePermutationAlltoAllDispatcher, whose forward and backward make no
data-dependent-size selection (megatron-core's all-to-all dispatcher: two masked_select per layer),
and give megatron-core's loss and gradients bit for bit on every rank; exits non-zero otherwise."""

import megatron_r1  # noqa: F401  before megatron.core (platform.py)

# isort: split
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_r1 import experts
from megatron_r1.arguments import parse_args
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.model import build_model
from megatron_r1.token_dispatch import DevicePermutationAlltoAllDispatcher

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_token_dispatch import FLAGS, assert_same_loss_and_grads, loss_grads_and_syncs, moe_layers, with_dispatcher  # noqa: E402

LAYOUTS = {
    "ep2": ({"expert_model_parallel_size": 2}, ["--expert-model-parallel-size", "2"]),
    "tp2_sp_etp2": ({"tensor_model_parallel_size": 2}, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


def check(layout: str) -> None:
    sizes, flags = LAYOUTS[layout]
    initialize_distributed(**sizes)
    try:
        args = parse_args("test", [*FLAGS, "--moe-token-dispatcher-type", "alltoall", *flags])
        args.padded_vocab_size = 64
        (model,) = build_model(args)
        layers = moe_layers(model)
        kinds = {type(layer.token_dispatcher) for layer in layers}
        assert kinds == {DevicePermutationAlltoAllDispatcher}, (layout, kinds)
        rank = torch.distributed.get_rank()
        # Tokens differ by data-parallel rank under EP (uneven splits); TP ranks share theirs.
        seed = rank if layout == "ep2" else 0
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
        ours = loss_grads_and_syncs(model, tokens)
        assert ours[2]["masked_select"] == 0, (layout, ours[2])
        peers = with_dispatcher(model, layers, MoEAlltoAllTokenDispatcher, tokens)
        assert peers[2]["masked_select"] >= 2 * len(layers), (layout, peers[2])
        assert_same_loss_and_grads(ours, peers, f"{layout} rank {rank}")
        print(f"{layout} rank {rank}: same loss and gradients; syncs {dict(ours[2])} vs {dict(peers[2])}")
    finally:
        parallel_state.destroy_model_parallel()  # the process group stays for the next layout


def main():
    experts.KERNEL_ON_CPU = True  # the grouped kernel stands in for a GPU's (the loop reads counts)
    # The aux loss's backward sets megatron-core's global loss scale, which training sets first.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    try:
        for layout in LAYOUTS:
            check(layout)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
