"""Parameter and training-FLOP counts of the model that pretrain_r1.py would build with the same
flags: per component (embedding, attention, dense MLP, routed / shared experts, router, norms,
output layer, MTP) total and active-per-token parameters and FLOPs per token, then a summary line.
Nothing is built, so any size counts on a laptop; see megatron_r1/flops.py for the formulas.

The flags are validated as for a launch of WORLD_SIZE processes (environment variable, default 1).

Example:
  python tools/model_size.py --mock-data --vocab-size 129280 --num-layers 61 --hidden-size 7168 ...
  DRY_RUN=1 bash examples/pretrain_deepseek_v3.sh      # runs this tool with the preset's flags
"""

from megatron_r1.arguments import parse_args
from megatron_r1.flops import breakdown_table, count_model, summary
from megatron_r1.tokenizer import build_tokenizer, vocab_size_with_padding


def main(argv=None) -> None:
    args = parse_args(__doc__, argv)
    if args.tokenizer_model:  # the vocabulary comes from the tokenizer, as in training
        vocab_size = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size
        args.padded_vocab_size = vocab_size_with_padding(
            vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
    count = count_model(args)
    print(breakdown_table(count))
    print(f"global batch {args.global_batch_size} x sequence {args.seq_length}: "
          f"{count.tokens_per_iteration:,} tokens/iteration")  # fmt: skip
    print(summary(count))


if __name__ == "__main__":
    main()
