"""Reinforce a megatron-r1 checkpoint with GRPO (DeepSeek-R1's last stage): rollouts from the
current policy on verifiable prompts, rule-based rewards, group-relative advantages, the clipped
objective with a k3 KL to the reference policy.

    torchrun --nproc_per_node=N grpo_r1.py --pretrained-checkpoint SFT_CKPT <model flags of it> \\
        --tokenizer-model tok.model --prompt-data prompts.jsonl [--lora] [--save DIR] ...
    python grpo_r1.py ...                                                (one CPU process)
"""

from megatron_r1.distributed import destroy_distributed
from megatron_r1.rl.arguments import parse_grpo_args
from megatron_r1.rl.setup import build_grpo_step, setup_grpo
from megatron_r1.training import MetricsProcessor, Trainer, tensorboard_and_metrics_server


def main():
    args = parse_grpo_args(__doc__)
    state = setup_grpo(args)
    step = build_grpo_step(args, state)
    metrics = MetricsProcessor(args, state, *tensorboard_and_metrics_server(args))
    for name, format_spec in step.formats().items():
        metrics.register(name, format_spec)
    Trainer(args, state, step, metrics).train()
    destroy_distributed()


if __name__ == "__main__":
    main()
