"""Fine-tuning on top of the pre-training machinery (training.setup/train): supervised fine-tuning
on packed chat data, full-parameter or LoRA, per-component dropout, progressive unfreezing, early
stopping on the validation loss, and knowledge distillation from a larger checkpoint of ours.

- ``--pretrained-checkpoint`` gives the starting weights (any megatron-r1 checkpoint, any layout);
  ``--save``/``--load`` hold this run's own checkpoints, from which a rerun resumes. With ``--lora``
  those checkpoints hold the adapters alone (tools/merge_lora.py folds them into a full one).
- Early stopping (``--early-stop-patience`` evaluations without improvement) restores the best
  weights before the final save, so the last checkpoint is the best one.
- Distillation: ``loss = kd_ce_weight * CE + kd_kl_weight * T^2 * KL(teacher_T || student_T)``
  over the response tokens, with vocabulary-parallel softmaxes under TP; the teacher is built from
  its checkpoint's megatron_r1.json and runs in the student's parallel layout (PP 1).
"""

import argparse
import json
import math
import os
from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP

from megatron_r1 import platform
from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.checkpointing import (
    CheckpointError,
    _check_model_shape,
    _write_text_atomically,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    read_metadata,
    save_checkpoint,
)
from megatron_r1.data.indexed import bin_path, idx_path
from megatron_r1.data.sft import LOSS_MASK_SUFFIX, build_sft_datasets, is_jsonl, packed_attention_inputs
from megatron_r1.lora import (
    LoRAConfig,
    add_adapters_to_duplicated_linears,
    checkpoint_adapters_only,
    freeze_base_model,
    is_adapter_key,
    lora_spec_transform,
)
from megatron_r1.megatron_lm_flags import parse_known_flags
from megatron_r1.model import build_model
from megatron_r1.training import micro_batch_loss, print_rank_last, setup

LORA_CONFIG_FILE = "lora.json"


def add_finetuning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning")
    group.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="checkpoint directory to start from (weights only); none: random initialisation",
    )
    group.add_argument(
        "--no-pack-sequences", action="store_true", help="one sample per sequence (padded) instead of packing several"
    )
    group.add_argument(
        "--embedding-dropout", type=float, default=None, help="on the embeddings; default --hidden-dropout"
    )
    group.add_argument(
        "--ffn-dropout",
        type=float,
        default=0.0,
        help="on the FFN's inner activations (dense, shared and routed experts)",
    )
    group.add_argument(
        "--unfreeze-schedule",
        nargs="+",
        default=None,
        metavar="ITER:LAYERS",
        help="progressive unfreezing, top layers first: e.g. 0:1 50:2 100:all trains the top 1 layer "
        "(with the final norm and output layer; tied word embeddings count as the output layer) from iteration 0, "
        "the top 2 from 50, everything from 100",
    )
    group.add_argument(
        "--early-stop-patience",
        type=int,
        default=3,
        help="stop after this many evaluations without a better validation loss (0: never)",
    )
    group.add_argument(
        "--early-stop-min-delta", type=float, default=0.0, help="smallest decrease that counts as better"
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen base model")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--lora-alpha", type=float, default=32.0)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=["attention", "mlp", "shared_experts", "experts"],
        help="components (attention, mlp, shared_experts, experts), linear names (linear_qkv, linear_proj, "
        "linear_fc1, linear_fc2, MLA's linear_q_proj/linear_q_down_proj/linear_q_up_proj/"
        "linear_kv_down_proj/linear_kv_up_proj) or COMPONENT.LINEAR",
    )

    kd = parser.add_argument_group("knowledge distillation")
    kd.add_argument(
        "--teacher-load", default=None, help="teacher checkpoint directory (its shape from its megatron_r1.json)"
    )
    kd.add_argument("--kd-ce-weight", type=float, default=0.5, help="weight of the cross entropy on the labels")
    kd.add_argument("--kd-kl-weight", type=float, default=0.5, help="weight of T^2 x KL to the teacher")
    kd.add_argument("--kd-temperature", type=float, default=2.0)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_data_paths(paths, flag, error) -> list:
    for path in paths:
        if is_jsonl(path):
            if not os.path.isfile(path):
                error(f"{flag}: {path} does not exist")
        else:
            for part in (path, path + LOSS_MASK_SUFFIX):
                for file in (bin_path(part), idx_path(part)):
                    if not os.path.isfile(file):
                        error(f"{flag}: {file} does not exist (give .jsonl files or tools/preprocess_sft.py prefixes)")
    return paths


def _parse_unfreeze_schedule(entries, num_layers, error):
    stages = []
    for entry in entries:
        try:
            start, layers = entry.split(":")
            stages.append((int(start), num_layers if layers == "all" else int(layers)))
        except ValueError:
            error(f"--unfreeze-schedule: {entry!r} is not ITER:LAYERS (LAYERS a number or 'all')")
    stages.sort()
    if stages[0][0] != 0 or any(not 0 < n <= num_layers for _, n in stages):
        error(f"--unfreeze-schedule: the first stage must start at iteration 0 and every count be in 1..{num_layers}")
    return stages


def validate_finetuning_args(args, error) -> None:
    if args.train_data_path is not None:
        if args.data_path:
            error("--data-path and --train-data-path are alternatives: give one")
        args.data_path = args.train_data_path
    if not args.data_path:
        error("give --data-path with .jsonl files or tools/preprocess_sft.py prefixes")
    if not args.tokenizer_model:
        error("fine-tuning data is rendered with the chat template: give --tokenizer-model")
    if any(_is_number(p) for p in args.data_path):
        error("--data-path: fine-tuning data takes no blend weights, only files and prefixes")
    if args.eod_mask_loss:
        error("--eod-mask-loss is for pre-training documents: fine-tuning samples carry their own loss masks")
    if args.reset_attention_mask or args.reset_position_ids:
        error(
            "--reset-attention-mask/--reset-position-ids are for pre-training documents: packed fine-tuning "
            "samples never attend to each other and count their own positions"
        )
    data_path, args.data_path = args.data_path, None
    args.mock_data = True  # the shared checks, minus pre-training's indexed-data ones (SFT data is checked below)
    validate_args(args, error)
    args.mock_data = False
    if args.transformer_impl == "transformer_engine" and not args.no_pack_sequences:
        error(
            "packed fine-tuning samples need --transformer-impl local (TransformerEngine's causal attention takes "
            "no per-sample mask and would attend across samples), or --no-pack-sequences"
        )
    args.data_path = _check_data_paths(data_path, "--data-path", error)
    if args.valid_data_path:
        args.valid_data_path = _check_data_paths(args.valid_data_path, "--valid-data-path", error)
    if args.seq_length_curriculum:
        error("--seq-length-curriculum is for pre-training (packed samples must not be cut)")
    if args.lora:
        if args.transformer_impl != "local":
            error("--lora needs --transformer-impl local (adapters wrap megatron-core's local linears)")
        if args.lora_rank < 1:
            error(f"--lora-rank ({args.lora_rank}) must be >= 1")
        # The base model is frozen, its routers' load-balancing biases too.
        args.moe_router_bias_update_rate = 0.0
    if args.unfreeze_schedule:
        if args.lora:
            error("--unfreeze-schedule is for full-parameter fine-tuning, not --lora")
        if args.bf16 or args.use_distributed_optimizer:
            error(
                "--unfreeze-schedule supports the fp32, non-distributed optimizer only (no --bf16, "
                "no --use-distributed-optimizer)"
            )
        args.unfreeze_schedule = _parse_unfreeze_schedule(args.unfreeze_schedule, args.num_layers, error)
    if args.teacher_load:
        if args.pipeline_model_parallel_size > 1:
            error("--teacher-load needs --pipeline-model-parallel-size 1")
        if not os.path.isdir(args.teacher_load):
            error(f"--teacher-load {args.teacher_load}: no such directory")
        if args.kd_temperature <= 0:
            error(f"--kd-temperature ({args.kd_temperature}) must be > 0")
    if args.early_stop_patience < 0:
        error(f"--early-stop-patience ({args.early_stop_patience}) must be >= 0")
    for flag, probability in (("--embedding-dropout", args.embedding_dropout), ("--ffn-dropout", args.ffn_dropout)):
        if probability is not None and not 0 <= probability < 1:
            error(f"{flag} ({probability}) must be in [0, 1)")


def parse_finetuning_args(description: str, argv=None) -> argparse.Namespace:
    parser = build_parser(description)
    add_finetuning_arguments(parser)
    parser.set_defaults(split="98,2,0", lr=1e-5, lr_decay_style="cosine")
    args = parse_known_flags(parser, argv)
    validate_finetuning_args(args, parser.error)
    return args


def lora_config(args) -> LoRAConfig:
    return LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(args.lora_target_modules))


# ---- model preparation -------------------------------------------------------------------------


def _ffn_activation_dropout(probability, module, inputs):
    """Dropout on linear_fc2's input (the FFN's inner activations), which TP shards: those ranks
    draw from the model-parallel RNG stream."""
    if not module.training:
        return None
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return (torch.nn.functional.dropout(inputs[0], probability),) + inputs[1:]
    return (torch.nn.functional.dropout(inputs[0], probability),) + inputs[1:]


def prepare_model_chunk(args, chunk) -> None:
    """Before DDP and the optimizer see the chunk: LoRA freezing, per-component dropout."""
    if args.embedding_dropout is not None and chunk.pre_process:
        chunk.embedding.embedding_dropout.p = args.embedding_dropout
    if args.ffn_dropout > 0:
        for module in chunk.modules():
            if isinstance(module, MLP):
                module.linear_fc2.register_forward_pre_hook(partial(_ffn_activation_dropout, args.ffn_dropout))
    if args.lora:
        add_adapters_to_duplicated_linears(chunk, lora_config(args))
        trainable = freeze_base_model(chunk)
        total = sum(p.numel() for p in chunk.parameters())
        print_rank_last(
            f" LoRA: {trainable} trainable parameters of {total} on this rank ({100 * trainable / total:.2f}%)"
        )
        checkpoint_adapters_only(chunk)


def load_pretrained(args, state) -> str | None:
    """Load --pretrained-checkpoint's weights into every chunk (LoRA adapters keep their
    initialisation); returns the directory loaded, None without the flag."""
    if not args.pretrained_checkpoint:
        return None
    path = find_checkpoint(argparse.Namespace(load=args.pretrained_checkpoint, ckpt_step=None))
    if path is None:
        raise CheckpointError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there")
    _check_model_shape(args, read_metadata(path)["model_args"], path)
    load_weights(path, [chunk.module for chunk in state.model], keep=lambda key: not is_adapter_key(key))
    return path


def write_lora_config(args) -> None:
    """<save>/lora.json: what tools/merge_lora.py needs besides the adapters."""
    if not (args.lora and args.save) or torch.distributed.get_rank() != 0:
        return
    os.makedirs(args.save, exist_ok=True)
    config = {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
              "target_modules": list(args.lora_target_modules), "pretrained_checkpoint": args.pretrained_checkpoint}  # fmt: skip
    _write_text_atomically(os.path.join(args.save, LORA_CONFIG_FILE), json.dumps(config, indent=1))


# ---- the training step -------------------------------------------------------------------------


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


# ---- early stopping and progressive unfreezing -------------------------------------------------


class EarlyStopping:
    """``on_validation`` hook: keeps a copy of the trainable weights at the best validation loss,
    stops after ``patience`` evaluations without improvement, and puts the best weights back when
    training ends (stopped or at --train-iters), before the final save."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_iteration, self.evaluations_without_improvement = math.inf, None, 0
        self.losses = []
        self._best_weights = None

    @staticmethod
    def _trainable(state):
        return [p for chunk in state.model for p in chunk.module.parameters() if p.requires_grad]

    def __call__(self, args, state, valid_loss) -> bool:
        # The loss lives on the last pipeline stage; every rank must take the same decision.
        loss = torch.tensor(
            [valid_loss if valid_loss is not None else 0.0], dtype=torch.float64, device=platform.compute_device()
        )  # NCCL takes device tensors only
        torch.distributed.broadcast(loss, src=torch.distributed.get_world_size() - 1)
        loss = loss.item()
        self.losses.append((state.iteration, loss))
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_iteration, self.evaluations_without_improvement = loss, state.iteration, 0
            self._best_weights = [p.detach().clone() for p in self._trainable(state)]
        else:
            self.evaluations_without_improvement += 1
        stop = bool(self.patience) and self.evaluations_without_improvement >= self.patience
        if stop:
            print_rank_last(
                f" early stopping at iteration {state.iteration}: no better validation loss in "
                f"{self.patience} evaluations"
            )
        if stop or state.iteration >= args.train_iters:
            self.restore_best(args, state)
        return stop

    def restore_best(self, args, state) -> None:
        if self.best_iteration is None or self.best_iteration == state.iteration:
            return
        with torch.no_grad():
            for param, best in zip(self._trainable(state), self._best_weights):
                param.copy_(best)
        state.optimizer.reload_model_params()  # mixed precision: the fp32 main copies too
        print_rank_last(
            f" restored the best weights (iteration {self.best_iteration}, validation loss {self.best_loss:.6E})"
        )
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save_checkpoint(args, state)  # train() just saved this iteration with the later weights


class ProgressiveUnfreezing:
    """``on_iteration_start`` hook: per --unfreeze-schedule, only the top N transformer layers (and
    everything after them: final norm, output layer -- tied word embeddings with it --, MTP) train;
    the rest (lower layers, embeddings) have no gradient, and the
    optimizer skips parameters without one, so they stay bit-unchanged (no weight decay either)."""

    def __init__(self, schedule, num_layers: int):
        self.schedule, self.num_layers = schedule, num_layers
        self.trainable_layers = None

    def __call__(self, args, state) -> None:
        layers = [n for start, n in self.schedule if start <= state.iteration][-1]
        if layers == self.trainable_layers:
            return
        self.trainable_layers = layers
        first_trainable = self.num_layers - layers
        for chunk in state.model:
            module = chunk.module
            frozen = set()
            if module.pre_process:
                frozen.update(id(p) for p in module.embedding.parameters())
                if module.share_embeddings_and_output_weights:
                    # Tied: the word embeddings are the output layer too, which trains throughout
                    # (and the PP stages holding its two copies agree on that).
                    frozen.discard(id(module.shared_embedding_or_output_weight()))
            for layer in module.decoder.layers:
                if layer.layer_number - 1 < first_trainable:  # layer_number: global, 1-based
                    frozen.update(id(p) for p in layer.parameters())
            if layers == self.num_layers:
                frozen.clear()
            for param in module.parameters():
                trainable = id(param) not in frozen
                param.requires_grad = trainable
                if hasattr(param, "main_grad"):
                    # The optimizer takes .grad from main_grad; a parameter without one is skipped.
                    if trainable and getattr(param, "_frozen_main_grad", None) is not None:
                        param.main_grad = param._frozen_main_grad
                        param._frozen_main_grad = None
                    elif not trainable and param.main_grad is not None:
                        param._frozen_main_grad, param.main_grad = param.main_grad, None
        print_rank_last(
            f" unfreezing: from iteration {state.iteration}, the top {layers} of {self.num_layers} layers train"
        )


# ---- the whole setup ---------------------------------------------------------------------------


def setup_finetuning(args):
    """training.setup with the fine-tuning model changes, the starting weights (pretrained, then
    this run's own checkpoint when resuming), and the fine-tuning hooks on the TrainState."""
    spec_transform = lora_spec_transform(lora_config(args), args.swiglu) if args.lora else None
    state = setup(args, layer_spec_transform=spec_transform, prepare_model_chunk=partial(prepare_model_chunk, args))
    loaded = load_pretrained(args, state)
    print_rank_last(f" starting weights: {loaded}" if loaded else " no --pretrained-checkpoint: random initialisation")
    if load_checkpoint(args, state):
        print_rank_last(f" resumed from iteration {state.iteration} ({state.consumed_samples} samples consumed)")
    write_lora_config(args)
    state.forward_step = sft_forward_step
    if args.teacher_load:
        state.forward_step = partial(distillation_forward_step, args, build_teacher(args))
    if args.eval_interval:
        state.on_validation = EarlyStopping(args.early_stop_patience, args.early_stop_min_delta)
    if args.unfreeze_schedule:
        state.on_iteration_start = ProgressiveUnfreezing(args.unfreeze_schedule, args.num_layers)
    return state


def build_finetuning_data(args, state):
    """(train, valid) packed SFT datasets sized for --train-iters and the evaluations."""
    eval_samples = 0
    if args.eval_interval:
        eval_samples = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    train_samples = args.train_iters * args.global_batch_size
    if args.valid_data_path:
        train, _ = build_sft_datasets(args, state.tokenizer, train_samples, 0, split="1,0,0")
        _, valid = build_sft_datasets(args, state.tokenizer, 0, eval_samples, split="0,1,0", paths=args.valid_data_path)
        return train, valid
    return build_sft_datasets(args, state.tokenizer, train_samples, eval_samples)
