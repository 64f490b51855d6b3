"""Knowledge distillation from a larger checkpoint of ours (--teacher-load):
``loss = kd_ce_weight * CE + kd_kl_weight * T^2 * KL(teacher_T || student_T)`` over the response
tokens, with vocabulary-parallel softmaxes under TP; the teacher is built from its checkpoint's
megatron_r1.json and runs in the student's parallel layout (PP 1)."""

import argparse

import torch

from megatron_r1 import platform, vocab_parallel
from megatron_r1.checkpointing import CheckpointError, find_checkpoint, load_weights, read_metadata
from megatron_r1.data.sft import packed_attention_inputs
from megatron_r1.model import build_model
from megatron_r1.training import micro_batch_loss, print_rank_last


def vocab_parallel_kl(student_logits, teacher_logits, temperature: float, vocab_size: int):
    """Per-token KL(teacher || student) of temperature-softened distributions, both [.., V/TP]
    vocabulary shards (gradients flow to the student, equal to those of the full-vocabulary computation)."""
    return vocab_parallel.kl_divergence(
        vocab_parallel.log_softmax(student_logits, temperature, vocab_size),
        vocab_parallel.log_softmax(teacher_logits, temperature, vocab_size),
    )


def distillation_forward_step(args, teacher, data_iterator, model):
    batch = platform.to_device(next(data_iterator))
    attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
    with torch.no_grad():
        teacher_logits = teacher(batch["tokens"], position_ids, attention_mask)  # [b, s, V/TP]
    with vocab_parallel.main_head_logits(model) as captured:
        per_token_loss = model(
            batch["tokens"], position_ids, attention_mask, labels=batch["labels"], loss_mask=batch["loss_mask"]
        )
    kl = vocab_parallel_kl(captured["logits"].transpose(0, 1), teacher_logits, args.kd_temperature, args.vocab_size)

    def loss_func(per_token_loss):
        loss = args.kd_ce_weight * per_token_loss.float() + args.kd_kl_weight * args.kd_temperature**2 * kl.float()
        return micro_batch_loss(loss, batch["loss_mask"], {"lm loss": per_token_loss, "kd loss": kl})

    return per_token_loss, loss_func


def teacher_args(args, metadata: dict) -> argparse.Namespace:
    """The student's flags with the teacher checkpoint's model flags (shape and function) in place;
    the teacher runs the student's layer implementation, whichever wrote its checkpoint."""
    teacher = argparse.Namespace(**vars(args))
    for name, value in metadata["model_args"].items():
        if name not in ("tokenizer_type", "tokenizer_model", "transformer_impl"):
            setattr(teacher, name, value)
    return teacher


def build_teacher(args):
    """The --teacher-load model, in eval mode and frozen, in this process' parallel layout."""
    path = find_checkpoint(argparse.Namespace(load=args.teacher_load, ckpt_step=None))
    if path is None:
        raise CheckpointError(f"--teacher-load {args.teacher_load}: no checkpoint there")
    targs = teacher_args(args, read_metadata(path))
    if targs.padded_vocab_size != args.padded_vocab_size:
        raise CheckpointError(
            f"--teacher-load {path}: vocabulary of {targs.padded_vocab_size} (padded) ids, the "
            f"student has {args.padded_vocab_size}; teacher and student need one tokenizer"
        )
    # Without its MTP layers: the teacher gives next-token logits, and megatron-core runs MTP
    # layers only with labels.
    (teacher,) = build_model(targs, with_mtp=False, initialize=False)
    load_weights(path, [teacher])
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad = False
    print_rank_last(f" teacher: {path} ({targs.num_layers} layers, hidden {targs.hidden_size})")
    return teacher
