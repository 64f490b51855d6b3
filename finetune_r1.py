"""Fine-tune a megatron-r1 checkpoint on instruction / chat data: full-parameter or LoRA, with
sequence packing, early stopping, progressive unfreezing and knowledge distillation.

    torchrun --nproc_per_node=N finetune_r1.py --pretrained-checkpoint CKPT --data-path train.jsonl \\
        --tokenizer-model tok.model <model flags of CKPT> [--lora] [--teacher-load BIG_CKPT] ...
    python finetune_r1.py ...                                            (one CPU process)
"""

from megatron_r1.distributed import destroy_distributed
from megatron_r1.finetuning import (
    build_finetuning_data,
    finetuning_extensions,
    finetuning_forward_step,
    parse_finetuning_args,
    setup_finetuning,
)
from megatron_r1.training import print_rank_last, train_or_evaluate


def main():
    args = parse_finetuning_args(__doc__)
    state = setup_finetuning(args)
    forward_step, extensions = finetuning_forward_step(args), finetuning_extensions(args)  # the teacher, if any
    train_dataset, valid_dataset = build_finetuning_data(args, state)
    print_rank_last(
        f" fine-tuning data: {len(train_dataset.bins)} packed training sequences"
        + (f", {len(valid_dataset.bins)} validation" if valid_dataset else "")
    )
    train_or_evaluate(args, state, train_dataset, valid_dataset, forward_step, extensions)
    destroy_distributed()


if __name__ == "__main__":
    main()
