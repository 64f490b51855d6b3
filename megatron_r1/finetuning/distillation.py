"""Knowledge distillation from a larger checkpoint of ours (--teacher-load):
``loss = kd_ce_weight * CE + kd_kl_weight * T^2 * KL(teacher_T || student_T)`` over the response
tokens, with vocabulary-parallel softmaxes under TP; the teacher is built from its checkpoint's
megatron_r1.json and runs in the student's parallel layout (PP 1)."""

import argparse
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_r1 import platform
from megatron_r1.checkpointing import CheckpointError, find_checkpoint, load_weights, read_metadata
from megatron_r1.data.sft import packed_attention_inputs
from megatron_r1.model import build_model
from megatron_r1.training import micro_batch_loss, print_rank_last


class _SumOverTensorParallelRanks(torch.autograd.Function):
    """A sum over the TP group whose gradient is summed over the group too: every rank's loss
    depends on every rank's part of the sum (megatron-core's reduce_from_tensor_model_parallel_region
    passes the gradient through unreduced, right only where the loss is summed after it on every
    rank from the same replicated value)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=parallel_state.get_tensor_model_parallel_group())
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        return grad


def vocab_parallel_kl(student_logits, teacher_logits, temperature: float, vocab_size: int):
    """Per-token KL(teacher || student) of temperature-softened distributions, both [.., V/TP]
    vocabulary shards; reductions over the TP group (gradients flow to the student, equal to
    those of the full-vocabulary computation)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = student_logits.shape[-1]
    real = torch.arange(rank * shard, (rank + 1) * shard, device=student_logits.device) < vocab_size

    def log_softmax(logits):
        logits = (logits.float() / temperature).masked_fill(~real, -1e9)  # padding ids are no outcome
        maximum = logits.max(dim=-1, keepdim=True).values.detach()
        torch.distributed.all_reduce(
            maximum, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )
        # Each rank's KL term below takes log Z from all ranks' logits: its gradient sums too.
        sum_exp = _SumOverTensorParallelRanks.apply((logits - maximum).exp().sum(dim=-1, keepdim=True))
        return logits - maximum - sum_exp.log()

    student_log_probs, teacher_log_probs = log_softmax(student_logits), log_softmax(teacher_logits)
    local = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return reduce_from_tensor_model_parallel_region(local)


def _capture_last_output(captured, module, inputs, output):
    # A copy: the cross entropy that follows overwrites the logits in place (megatron's fused
    # vocab-parallel CE). The main head's call comes after the MTP heads'.
    captured["logits"] = output[0].clone()


def distillation_forward_step(args, teacher, data_iterator, model):
    batch = platform.to_device(next(data_iterator))
    attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
    with torch.no_grad():
        teacher_logits = teacher(batch["tokens"], position_ids, attention_mask)  # [b, s, V/TP]
    captured = {}
    output_layer = model.module.output_layer
    handle = output_layer.register_forward_hook(partial(_capture_last_output, captured))
    try:
        per_token_loss = model(
            batch["tokens"], position_ids, attention_mask, labels=batch["labels"], loss_mask=batch["loss_mask"]
        )
    finally:
        handle.remove()
    kl = vocab_parallel_kl(captured["logits"].transpose(0, 1), teacher_logits, args.kd_temperature, args.vocab_size)

    def loss_func(per_token_loss):
        loss = args.kd_ce_weight * per_token_loss.float() + args.kd_kl_weight * args.kd_temperature**2 * kl.float()
        return micro_batch_loss(loss, batch["loss_mask"], {"lm loss": per_token_loss, "kd loss": kl})

    return per_token_loss, loss_func


def teacher_args(args, metadata: dict) -> argparse.Namespace:
    """The student's flags with the teacher checkpoint's model flags (shape and function) in place."""
    teacher = argparse.Namespace(**vars(args))
    for name, value in metadata["model_args"].items():
        if name not in ("tokenizer_type", "tokenizer_model"):
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
