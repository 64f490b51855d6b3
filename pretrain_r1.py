"""Pre-train a DeepSeek-R1/V3-style MoE GPT on megatron-core.

torchrun --nproc_per_node=N pretrain_r1.py <Megatron-LM style flags>   (see examples/)
python pretrain_r1.py --mock-data --vocab-size 1024 ...                 (one CPU process)
"""

from megatron_r1.arguments import parse_args
from megatron_r1.checkpointing import load_checkpoint
from megatron_r1.distributed import destroy_distributed
from megatron_r1.training import build_data, print_rank_last, setup, train_or_evaluate


def main():
    args = parse_args(__doc__)
    state = setup(args)
    if load_checkpoint(args, state):
        print_rank_last(f" resumed from iteration {state.iteration} ({state.consumed_samples} samples consumed)")
    train_dataset, valid_dataset = build_data(args, state)
    train_or_evaluate(args, state, train_dataset, valid_dataset)
    destroy_distributed()


if __name__ == "__main__":
    main()
