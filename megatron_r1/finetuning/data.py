"""Fine-tuning data: packed chat samples (JSONL or tools/preprocess_sft.py prefixes), and the
forward step whose loss is over the response tokens."""

from megatron_r1 import platform
from megatron_r1.data.sft import build_sft_datasets, packed_attention_inputs
from megatron_r1.training import evaluation_samples, micro_batch_loss


def sft_forward_step(data_iterator, model):
    """Packed SFT batch -> per-token loss; the loss is over the response tokens."""
    batch = platform.to_device(next(data_iterator))
    attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
    per_token_loss = model(
        batch["tokens"], position_ids, attention_mask, labels=batch["labels"], loss_mask=batch["loss_mask"]
    )

    def loss_func(per_token_loss):
        return micro_batch_loss(per_token_loss, batch["loss_mask"])

    return per_token_loss, loss_func


def build_finetuning_data(args, state):
    """(train, valid) packed SFT datasets sized for --train-iters and the evaluations."""
    eval_samples = evaluation_samples(args)
    train_samples = args.train_iters * args.global_batch_size
    if args.valid_data_path:
        train, _ = build_sft_datasets(args, state.tokenizer, train_samples, 0, split="1,0,0")
        _, valid = build_sft_datasets(args, state.tokenizer, 0, eval_samples, split="0,1,0", paths=args.valid_data_path)
        return train, valid
    return build_sft_datasets(args, state.tokenizer, train_samples, eval_samples)
