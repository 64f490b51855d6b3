"""Fine-tuning on the training machinery: supervised fine-tuning on packed chat data,
full-parameter or LoRA, per-component dropout, progressive unfreezing, early stopping on the
validation loss, and knowledge distillation from a larger checkpoint of ours. A recipe composes:

    args = parse_finetuning_args(doc); state = setup_finetuning(args)
    train_or_evaluate(args, state, *build_finetuning_data(args, state),
                      finetuning_forward_step(args), finetuning_extensions(args))

- ``--pretrained-checkpoint`` gives the starting weights (any megatron-r1 checkpoint, any layout);
  ``--save``/``--load`` hold this run's own checkpoints, from which a rerun resumes. With ``--lora``
  those checkpoints hold the adapters alone (tools/merge_lora.py folds them into a full one).
- Early stopping (``--early-stop-patience`` evaluations without improvement) restores the best
  weights before the final save, so the last checkpoint is the best one.
"""

from functools import partial

from megatron_r1.finetuning.arguments import parse_finetuning_args
from megatron_r1.finetuning.data import build_finetuning_data, sft_forward_step
from megatron_r1.finetuning.distillation import build_teacher, distillation_forward_step, vocab_parallel_kl
from megatron_r1.finetuning.early_stopping import EarlyStopping
from megatron_r1.finetuning.model import LORA_CONFIG_FILE, lora_config, setup_finetuning
from megatron_r1.finetuning.unfreezing import ProgressiveUnfreezing


def finetuning_forward_step(args):
    """The SFT forward step, or with --teacher-load the distillation one (building the teacher)."""
    if args.teacher_load:
        return partial(distillation_forward_step, args, build_teacher(args))
    return sft_forward_step


def finetuning_extensions(args) -> list:
    """Early stopping when there are evaluations; progressive unfreezing with --unfreeze-schedule."""
    extensions = []
    if args.eval_interval:
        extensions.append(EarlyStopping(args))
    if args.unfreeze_schedule:
        extensions.append(ProgressiveUnfreezing(args))
    return extensions


__all__ = [
    "LORA_CONFIG_FILE", "EarlyStopping", "ProgressiveUnfreezing", "build_finetuning_data", "build_teacher",
    "finetuning_extensions", "finetuning_forward_step", "lora_config", "parse_finetuning_args", "setup_finetuning",
    "sft_forward_step", "vocab_parallel_kl",
]  # fmt: skip
