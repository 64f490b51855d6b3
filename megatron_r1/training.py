"""The pre-training loop: megatron-core's pipeline schedules over DDP-wrapped model chunks, with
Megatron-LM's iteration log line, evaluation and TensorBoard scalars."""

import gc
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.config import set_experimental_flag
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from megatron.core.utils import get_model_config
from torch.utils.tensorboard import SummaryWriter

from megatron_r1 import platform
from megatron_r1.arguments import current_seq_length, transformer_config_from_args
from megatron_r1.checkpointing import (
    finalize_async_saves,
    rollback_to_last_checkpoint,
    save_checkpoint,
    saved_model_args,
)
from megatron_r1.compat import missing_gpu_packages
from megatron_r1.data.pretrain import MicroBatches, build_datasets
from megatron_r1.distributed import initialize_distributed, parameters_gathered
from megatron_r1.flops import count_model, device_peak_tflops
from megatron_r1.metrics import MetricsServer
from megatron_r1.model import build_model
from megatron_r1.moe_stats import ExpertLoadTracker
from megatron_r1.optim import build_optimizer, build_scheduler, params_norm, schedule_increment
from megatron_r1.signals import ExitConditions
from megatron_r1.tokenizer import build_tokenizer, vocab_size_with_padding


@dataclass
class TrainState:
    model: list
    optimizer: object
    scheduler: object
    tokenizer: object
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0
    # Fine-tuning's hooks (megatron_r1/finetuning.py); None keeps pre-training's behaviour.
    forward_step: Callable | None = None  # a megatron-core forward_step_func replacing _forward_step
    on_iteration_start: Callable | None = None  # (args, state), before each training iteration
    on_validation: Callable | None = None  # (args, state, valid_loss) -> True to stop training


def setup(args, layer_spec_transform=None, prepare_model_chunk=None) -> TrainState:
    """Process groups, tokenizer, model chunks (DDP-wrapped), optimizer and LR schedule.
    `layer_spec_transform(spec)` rewrites the decoder block spec (LoRA); `prepare_model_chunk(chunk)`
    adjusts each built chunk before DDP and the optimizer see it (freezing, dropout)."""
    if args.logging_level is not None:
        logging.basicConfig(level=args.logging_level)
    if args.enable_experimental:
        set_experimental_flag(True)
    if args.disable_bf16_reduced_precision_matmul:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    initialize_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    missing = missing_gpu_packages()
    if torch.cuda.is_available() and missing and torch.distributed.get_rank() == 0:
        print(
            f" {' and '.join(missing)} not installed: megatron-core's PyTorch implementations run instead", flush=True
        )
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    args.vocab_size = tokenizer.vocab_size  # the real vocabulary, saved with checkpoints (export drops padding)
    if args.padded_vocab_size is not None:  # --padded-vocab-size
        if args.padded_vocab_size < args.vocab_size:
            raise ValueError(
                f"--padded-vocab-size ({args.padded_vocab_size}) is below the vocabulary of {args.vocab_size} ids"
            )
    else:
        args.padded_vocab_size = vocab_size_with_padding(
            args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        # The padding depends on TP; keep a checkpoint's where this layout can shard it, so that a
        # checkpoint saved under TP=2 loads under TP=1 (and back) without reshaping the embeddings.
        saved_padding = saved_model_args(args).get("padded_vocab_size")
        if saved_padding and saved_padding >= args.vocab_size and saved_padding % args.tensor_model_parallel_size == 0:
            args.padded_vocab_size = saved_padding
    config = transformer_config_from_args(args)
    config.gradient_accumulation_fusion = (
        args.gradient_accumulation_fusion and platform.gradient_accumulation_fusion_available()
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
    )
    model = build_model(
        args,
        config,
        layer_spec_transform=layer_spec_transform,
        prepare_chunk=prepare_model_chunk,
        ddp_config=ddp_config,
    )
    config = get_model_config(model[0])  # the one the chunks and the schedule hold
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        # The schedule holds the reduction back until each chunk's last micro-batch, then starts
        # it (the wiring of Megatron-LM's training.py).
        no_sync, start_grad_sync = [chunk.no_sync for chunk in model], [chunk.start_grad_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = start_grad_sync[0] if len(model) == 1 else start_grad_sync
    optimizer = build_optimizer(args, model)
    return TrainState(model, optimizer, build_scheduler(args, optimizer), tokenizer)


def micro_batch_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, logged: dict | None = None):
    """A loss_func's result in megatron-core's three parts: the micro-batch's per-token loss summed
    over its loss tokens (`mask`), their number, and the logged per-token losses (`logged`, default
    {"lm loss": the loss}) as [sum, number]. The schedule divides by the number (a mean per
    micro-batch, averaged over micro-batches), or with --calculate-per-token-loss keeps sums and
    divides the gradients by the global batch's loss tokens."""
    mask = mask.float()
    num_tokens = mask.sum().int()
    loss_sum = (per_token_loss.float() * mask).sum()
    sums = (
        {"lm loss": loss_sum}
        if logged is None
        else {name: (values.float() * mask).sum() for name, values in logged.items()}
    )
    reported = {name: torch.stack([value.detach(), num_tokens.float()]) for name, value in sums.items()}
    return loss_sum, num_tokens, reported


def _forward_step(data_iterator, model):
    batch = platform.to_device(next(data_iterator))
    per_token_loss = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

    def loss_func(per_token_loss):
        return micro_batch_loss(per_token_loss, batch["loss_mask"])

    return per_token_loss, loss_func


def _run_schedule(args, state, data_iterators, forward_only, reduce_loss=True):
    """One global batch through megatron-core's schedule (one data iterator per model chunk); the
    lm loss over the loss tokens of all micro-batches and data-parallel ranks (last pipeline stage;
    None elsewhere, and without `reduce_loss`: a step that is not logged skips the reduction and
    its host sync)."""
    seq_length = data_iterators[0].seq_length or args.seq_length
    reduced = get_forward_backward_func()(
        forward_step_func=state.forward_step or _forward_step,
        data_iterator=data_iterators if len(data_iterators) > 1 else data_iterators[0],
        model=state.model,
        num_microbatches=args.num_microbatches,
        seq_length=seq_length,
        micro_batch_size=args.micro_batch_size * args.seq_length // seq_length,
        forward_only=forward_only,
    )
    if args.empty_unused_memory_level >= 1:
        torch.cuda.empty_cache()
    if not (reduce_loss and parallel_state.is_pipeline_last_stage()):
        return None
    totals = torch.stack([item["lm loss"] for item in reduced]).sum(dim=0)  # [loss sum, loss tokens]
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def _grads_are_finite(model_chunks) -> bool:
    """Whether every synced gradient on every rank is finite: one read-only pass over the grad
    buffers and a one-element all-reduce, so all ranks agree on skipping the step. A buffer's sum
    is NaN/Inf exactly when one of its elements is (or when finite gradients overflow it, a step
    as bad); an element-wise isfinite would write a temporary as large as the model."""
    finite = torch.ones(1, device=platform.compute_device())
    for chunk in model_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            finite *= torch.isfinite(buffer.grad_data.sum())
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def _moe_track_names(args):
    if not args.num_experts:
        return []
    names = {
        "aux_loss": "load_balancing_loss",
        "seq_aux_loss": "seq_load_balancing_loss",
        "global_aux_loss": "global_load_balancing_loss",
    }
    balancing = args.moe_router_load_balancing_type in names and args.moe_aux_loss_coeff > 0
    tracked = [names[args.moe_router_load_balancing_type]] if balancing else []
    return tracked + (["z_loss"] if args.moe_z_loss_coeff is not None else [])


def _auxiliary_losses(args, iteration, writer, logged: bool = True):
    """MoE load-balancing / z losses and MTP losses of the last step (collective: every rank). A
    step that is not logged only empties the trackers: no reduction, no host sync."""
    if not logged:
        clear_aux_losses_tracker()
        if args.mtp_num_layers and "values" in MTPLossLoggingHelper.tracker:
            MTPLossLoggingHelper.clean_loss_in_tracker()
        return {}
    losses = {}
    track_names = _moe_track_names(args)
    if track_names:
        track_moe_metrics(
            loss_scale=1.0 / args.num_microbatches,
            iteration=iteration,
            writer=writer,
            total_loss_dict=losses,
            per_layer_logging=args.moe_per_layer_logging,
            force_initialize=True,
            track_names=track_names,
            # Sized as the routers size it, so stages without MoE layers join the same reduction.
            num_layers=args.num_layers + (args.mtp_num_layers or 0),
            moe_layer_freq=args.moe_layer_freq,
            mtp_num_layers=args.mtp_num_layers,
        )
    if args.mtp_num_layers:
        MTPLossLoggingHelper.track_mtp_metrics(1.0 / args.num_microbatches, iteration, writer, total_loss_dict=losses)
    return {name: float(value) for name, value in losses.items()}


class IterationProfiler:
    """--profile: iterations [--profile-step-start, --profile-step-end) of the --profile-ranks,
    recorded by torch.profiler into --tensorboard-dir (--use-pytorch-profiler; TensorBoard's profiler
    tab and chrome://tracing read the trace), or marked with the CUDA profiler API for
    `nsys profile -c cudaProfilerApi` (Megatron-LM's default)."""

    def __init__(self, args):
        self.on = args.profile and torch.distributed.get_rank() in args.profile_ranks
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.torch_profiler, self.recording = None, False
        if self.on and args.use_pytorch_profiler:
            self.torch_profiler = torch.profiler.profile(
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True,
                with_stack=True,
            )

    def iteration_starts(self, iteration: int) -> None:
        if self.on and iteration == self.start:
            if self.torch_profiler:
                self.torch_profiler.start()
            else:
                torch.cuda.cudart().cudaProfilerStart()
            self.recording = True

    def iteration_ended(self, iteration: int) -> None:
        if self.recording and iteration == self.end:
            self.stop()

    def stop(self) -> None:
        """Ends the recording (writing the trace); also when training ends inside the window."""
        if self.recording:
            if self.torch_profiler:
                self.torch_profiler.stop()
            else:
                torch.cuda.cudart().cudaProfilerStop()
            self.recording = False


def memory_figures() -> dict:
    """--log-memory-to-tensorboard: Megatron-LM's CUDA allocator figures, or without CUDA the
    process's peak resident memory."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
        }
    return {"mem-max-rss-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


def is_logging_rank() -> bool:
    """The last rank holds the last pipeline stage's losses, as in Megatron-LM."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_logging_rank():
        print(message, flush=True)


def evaluate(args, state, valid_data) -> float | None:
    """Mean validation lm loss over --eval-iters global batches (None off the last stage)."""
    if args.manual_gc and args.manual_gc_eval:
        gc.collect()
    for chunk in state.model:
        chunk.eval()
    losses = []
    with torch.no_grad(), parameters_gathered(state.model):
        for _ in range(args.eval_iters):
            losses.append(_run_schedule(args, state, valid_data, forward_only=True))
    for chunk in state.model:
        chunk.train()
    if args.manual_gc and args.manual_gc_eval:
        gc.collect()
    return None if losses[0] is None else sum(losses) / len(losses)


def train(args, state: TrainState, train_dataset, valid_dataset, writer=None, metrics=None) -> dict:
    """Train to --train-iters; returns the last logged figures (for callers and tests). `writer`
    (TensorBoard) and `metrics` (a MetricsServer) receive them on the logging rank."""
    # Every model chunk reads the same micro-batch sequence through its own iterator.
    train_data = [MicroBatches(train_dataset, args.micro_batch_size, state.consumed_samples) for _ in state.model]
    valid_data = validation_batches(
        args, state, valid_dataset, evaluations_done=_evaluations_before(args, state.iteration)
    )
    expert_load = None
    if args.num_experts:
        expert_load = ExpertLoadTracker(state.model, args.num_layers + (args.mtp_num_layers or 0), args.num_experts)
    tokens_per_step = args.global_batch_size * args.seq_length
    # Training FLOPs of a step at --seq-length (megatron_r1.flops), per GPU as Megatron-LM reports them.
    flops_per_gpu_step = count_model(args).flops_per_iteration / torch.distributed.get_world_size()
    peak_tflops = device_peak_tflops(args)
    last = {}
    exit_conditions = ExitConditions(args.exit_signal if args.exit_signal_handler else None, args.exit_duration_in_mins)
    bad_steps_in_a_row = 0
    if args.manual_gc:
        gc.disable()  # collections happen below, at the same iteration on every rank
        gc.collect()
    profiler = IterationProfiler(args)
    while state.iteration < args.train_iters:
        start = time.perf_counter()
        profiler.iteration_starts(state.iteration)
        if state.on_iteration_start is not None:
            state.on_iteration_start(args, state)
        for chunk_data in train_data:
            chunk_data.seq_length = current_seq_length(args, state.iteration)
        if expert_load:
            expert_load.reset()
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        # Figures that need a host sync are gathered on the iterations that are logged only.
        logged = (state.iteration + 1) % args.log_interval == 0
        loss = _run_schedule(args, state, train_data, forward_only=False, reduce_loss=logged)
        # A NaN/Inf gradient would poison the weights and optimizer moments: skip the update.
        if _grads_are_finite(state.model):
            update_successful, grad_norm, num_zeros = state.optimizer.step()
        else:
            update_successful, grad_norm, num_zeros = False, None, None
            state.nan_iterations += 1
        if args.empty_unused_memory_level >= 2:
            torch.cuda.empty_cache()
        if update_successful:
            state.scheduler.step(increment=schedule_increment(args))
        else:
            state.skipped_iterations += 1
        bad_steps_in_a_row = 0 if update_successful else bad_steps_in_a_row + 1
        state.iteration += 1
        profiler.iteration_ended(state.iteration)
        state.consumed_samples += args.global_batch_size
        elapsed = time.perf_counter() - start
        aux_losses = _auxiliary_losses(args, state.iteration, writer, logged)
        load_imbalance = expert_load.collect() if expert_load and logged else {}
        weights_norm = params_norm(state.optimizer) if args.log_params_norm and logged else None

        if logged and is_logging_rank():
            learning_rate = state.optimizer.param_groups[0]["lr"]
            last = {"iteration": state.iteration, "lm loss": loss, "grad norm": grad_norm, "learning rate": learning_rate,
                    "params norm": weights_norm, "expert load max/mean": load_imbalance, **aux_losses}  # fmt: skip
            fields = [
                f"iteration {state.iteration:8d}/{args.train_iters:8d}",
                f"consumed samples: {state.consumed_samples:12d}",
                f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
                f"throughput (tokens/s): {tokens_per_step / elapsed:.1f}",
                f"throughput per GPU (TFLOP/s/GPU): {flops_per_gpu_step / elapsed / 1e12:.1f}",
                *([f"MFU: {100 * flops_per_gpu_step / elapsed / 1e12 / peak_tflops:.1f}%"] if peak_tflops else []),
                f"learning rate: {learning_rate:.6E}",
                f"global batch size: {args.global_batch_size:5d}",
                f"lm loss: {loss:.6E}",
                *(f"{name}: {value:.6E}" for name, value in aux_losses.items()),
                *([f"expert load max/mean: {max(load_imbalance.values()):.2f}"] if load_imbalance else []),
                f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: n/a",
                *([f"params norm: {weights_norm:.3f}"] if weights_norm is not None else []),
                *(
                    [f"num zeros: {num_zeros:.1f}" if num_zeros is not None else "num zeros: n/a"]
                    if args.log_num_zeros_in_grad
                    else []
                ),
                f"number of skipped iterations: {state.skipped_iterations:3d}",
                f"number of nan iterations: {state.nan_iterations:3d}",
            ]
            if metrics is not None:  # published before the log line, which scrapers and tests wait for
                metrics.update(
                    {
                        **last,
                        "consumed samples": state.consumed_samples,
                        "skipped iterations": state.skipped_iterations,
                        "nan iterations": state.nan_iterations,
                        "throughput tokens per second": tokens_per_step / elapsed,
                        "throughput tflops per gpu": flops_per_gpu_step / elapsed / 1e12,
                    }
                )
            print(" " + " | ".join(fields) + " |", flush=True)
            if writer is not None:
                for name, value in (("lm loss", loss), ("learning-rate", learning_rate), ("grad-norm", grad_norm),
                                    ("throughput", tokens_per_step / elapsed), ("num-zeros", num_zeros),
                                    ("throughput-tflops-per-gpu", flops_per_gpu_step / elapsed / 1e12),
                                    ("params-norm", weights_norm)):  # fmt: skip
                    if value is not None:
                        writer.add_scalar(name, value, state.iteration)
                for layer, imbalance in load_imbalance.items():
                    writer.add_scalar(f"moe/expert_load_max_over_mean_layer_{layer}", imbalance, state.iteration)
                if args.log_memory_to_tensorboard:
                    for name, value in memory_figures().items():
                        writer.add_scalar(name, value, state.iteration)

        if args.rollback_after_bad_steps and bad_steps_in_a_row >= args.rollback_after_bad_steps:
            restored = rollback_to_last_checkpoint(args, state)
            print_rank_last(
                f" rolled back to the checkpoint of iteration {restored} after {bad_steps_in_a_row} "
                f"consecutive skipped iterations; data goes on at sample {state.consumed_samples}"
            )
            bad_steps_in_a_row = 0
        if args.save_interval and state.iteration % args.save_interval == 0:
            save_checkpoint(args, state)
        finalize_async_saves()  # --async-save: publish the checkpoints written by now
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            print_rank_last(f" exiting at iteration {state.iteration} (--exit-interval {args.exit_interval})")
            break
        exit_reason = exit_conditions.reason()  # collective: every rank takes the same decision
        if exit_reason:
            print_rank_last(f" exiting at iteration {state.iteration} ({exit_reason})")
            break

        if args.manual_gc and args.manual_gc_interval and state.iteration % args.manual_gc_interval == 0:
            gc.collect()
        if (
            args.eval_interval
            and valid_data
            and (state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters)
        ):
            valid_loss = evaluate(args, state, valid_data)
            if is_logging_rank():
                perplexity = math.exp(min(20.0, valid_loss))
                last.update({"validation loss": valid_loss, "validation ppl": perplexity})
                print_rank_last(
                    f" validation loss at iteration {state.iteration} | lm loss value: {valid_loss:.6E} "
                    f"| lm loss PPL: {perplexity:.6E} |"
                )
                if writer is not None:
                    writer.add_scalar("lm loss validation", valid_loss, state.iteration)
                    writer.add_scalar("lm loss validation ppl", perplexity, state.iteration)
            if state.on_validation is not None and state.on_validation(args, state, valid_loss):
                break
    profiler.stop()
    if args.save and not (args.save_interval and state.iteration % args.save_interval == 0):
        save_checkpoint(args, state)  # the final state, unless the loop just saved it
    finalize_async_saves(blocking=True)
    exit_conditions.restore_signal_handler()  # only now: a repeated signal must not cut the save short
    if args.manual_gc:
        gc.enable()
    return last


def _evaluations_before(args, iteration: int) -> int:
    """How many evaluations a run that started at iteration 0 had made before `iteration`."""
    return iteration // args.eval_interval if args.eval_interval else 0


def validation_batches(args, state: TrainState, valid_dataset, evaluations_done: int = 0) -> list | None:
    """One cycling validation reader per model chunk, placed after `evaluations_done`
    evaluations: a resumed run evaluates on the batches the run it continues would have (Megatron-LM
    derives the position from the iteration in the same way)."""
    if valid_dataset is None:
        return None
    draws = evaluations_done * args.eval_iters * args.num_microbatches
    return [MicroBatches(valid_dataset, args.micro_batch_size, cycle=True).skip(draws) for _ in state.model]


def evaluate_and_print(args, state: TrainState, valid_dataset) -> float | None:
    """--skip-train: one evaluation of the loaded model."""
    valid_data = validation_batches(args, state, valid_dataset)
    valid_loss = evaluate(args, state, valid_data)
    if is_logging_rank():
        print_rank_last(
            f" validation loss at iteration {state.iteration} | lm loss value: {valid_loss:.6E} "
            f"| lm loss PPL: {math.exp(min(20.0, valid_loss)):.6E} |"
        )
    return valid_loss


def train_or_evaluate(args, state: TrainState, train_dataset, valid_dataset) -> None:
    """The entry scripts' last step: --skip-train evaluates once; otherwise train, with TensorBoard
    (--tensorboard-dir) and Prometheus (--metrics-port) on the logging rank."""
    if args.skip_train:
        evaluate_and_print(args, state, valid_dataset)
        return
    logging_rank = is_logging_rank()
    writer = None
    if args.tensorboard_dir and logging_rank:
        writer = SummaryWriter(args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
    metrics = MetricsServer(args.metrics_port) if args.metrics_port is not None and logging_rank else None
    train(args, state, train_dataset, valid_dataset, writer, metrics)


def build_data(args, state: TrainState):
    eval_samples = 0
    if args.skip_train:
        eval_samples = args.eval_iters * args.global_batch_size
    elif args.eval_interval:
        eval_samples = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    return build_datasets(args, state.tokenizer, args.train_iters * args.global_batch_size, eval_samples)
