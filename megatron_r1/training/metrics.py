"""The one owner of a run's figures: Megatron-LM's iteration and validation lines, TensorBoard
scalars and the Prometheus endpoint, with the same fields for every recipe. A step's own figures
(StepResult.figures: the lm loss, or a recipe's rewards and KL) print where the lm loss does, in
the format the recipe registered for them."""

import math
import resource

import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_r1.flops import count_model, device_peak_tflops
from megatron_r1.moe_stats import ExpertLoadTracker
from megatron_r1.optim import params_norm


def is_logging_rank() -> bool:
    """The last rank holds the last pipeline stage's losses, as in Megatron-LM."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_logging_rank():
        print(message, flush=True)


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


def auxiliary_losses(args, iteration, writer, logged: bool = True):
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


class MetricsProcessor:
    """Collects a step's figures (collectives on every rank, on logged iterations only) and
    publishes them on the logging rank: `/metrics` first (scrapers and tests wait for the line),
    then the iteration line, then TensorBoard. `register(name, format_spec)` sets how a recipe's
    own figure prints (default: Megatron-LM's 6-digit exponent)."""

    def __init__(self, args, state, writer=None, server=None):
        self.args, self.writer, self.server = args, writer, server
        self.expert_load = None
        if args.num_experts:
            layers = args.num_layers + (args.mtp_num_layers or 0)
            self.expert_load = ExpertLoadTracker(state.model, layers, args.num_experts)
        self.tokens_per_step = args.global_batch_size * args.seq_length
        # Training FLOPs of a step at --seq-length (megatron_r1.flops), per GPU as Megatron-LM reports them.
        self.flops_per_gpu_step = count_model(args).flops_per_iteration / torch.distributed.get_world_size()
        self.peak_tflops = device_peak_tflops(args)
        self.formats = {}
        self.last = {}  # the last logged figures, for callers and tests

    def register(self, name: str, format_spec: str) -> None:
        self.formats[name] = format_spec

    def iteration_starts(self) -> None:
        if self.expert_load:
            self.expert_load.reset()

    def log_iteration(self, state, result, elapsed: float, logged: bool) -> None:
        """After the step (collective: every rank calls it every iteration)."""
        args = self.args
        aux_losses = auxiliary_losses(args, state.iteration, self.writer, logged)
        load_imbalance = self.expert_load.collect() if self.expert_load and logged else {}
        weights_norm = params_norm(state.optimizer) if args.log_params_norm and logged else None
        if not (logged and is_logging_rank()):
            return
        learning_rate = state.optimizer.param_groups[0]["lr"]
        tokens = result.tokens or self.tokens_per_step
        tflops = self.flops_per_gpu_step * tokens / self.tokens_per_step / elapsed / 1e12
        self.last = {"iteration": state.iteration, **result.figures, "grad norm": result.grad_norm,
                     "learning rate": learning_rate, "params norm": weights_norm,
                     "expert load max/mean": load_imbalance, **aux_losses}  # fmt: skip
        if self.server is not None:
            self.server.update({**self.last, "consumed samples": state.consumed_samples,
                                "skipped iterations": state.skipped_iterations, "nan iterations": state.nan_iterations,
                                "throughput tokens per second": tokens / elapsed,
                                "throughput tflops per gpu": tflops})  # fmt: skip
        figures = {**result.figures, **aux_losses}
        fields = [
            f"iteration {state.iteration:8d}/{args.train_iters:8d}",
            f"consumed samples: {state.consumed_samples:12d}",
            f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
            f"throughput (tokens/s): {tokens / elapsed:.1f}",
            f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}",
            *([f"MFU: {100 * tflops / self.peak_tflops:.1f}%"] if self.peak_tflops else []),
            f"learning rate: {learning_rate:.6E}",
            f"global batch size: {args.global_batch_size:5d}",
            *(f"{name}: {value:{self.formats.get(name, '.6E')}}" for name, value in figures.items()),
            *([f"expert load max/mean: {max(load_imbalance.values()):.2f}"] if load_imbalance else []),
            f"grad norm: {result.grad_norm:.3f}" if result.grad_norm is not None else "grad norm: n/a",
            *([f"params norm: {weights_norm:.3f}"] if weights_norm is not None else []),
            *([f"num zeros: {_or_na(result.num_zeros, '.1f')}"] if args.log_num_zeros_in_grad else []),
            f"number of skipped iterations: {state.skipped_iterations:3d}",
            f"number of nan iterations: {state.nan_iterations:3d}",
        ]
        print(" " + " | ".join(fields) + " |", flush=True)
        self._write_tensorboard(state.iteration, result, learning_rate, tokens / elapsed, tflops, weights_norm)
        for layer, imbalance in load_imbalance.items():
            self._scalar(f"moe/expert_load_max_over_mean_layer_{layer}", imbalance, state.iteration)

    def _write_tensorboard(self, iteration, result, learning_rate, tokens_per_second, tflops, weights_norm):
        scalars = {**result.figures, "learning-rate": learning_rate, "grad-norm": result.grad_norm,
                   "throughput": tokens_per_second, "num-zeros": result.num_zeros,
                   "throughput-tflops-per-gpu": tflops, "params-norm": weights_norm}  # fmt: skip
        if self.args.log_memory_to_tensorboard:
            scalars.update(memory_figures())
        for name, value in scalars.items():
            self._scalar(name, value, iteration)

    def _scalar(self, name, value, iteration) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, iteration)

    def log_validation(self, iteration: int, valid_loss: float) -> None:
        """The validation line and scalars (logging rank)."""
        if not is_logging_rank():
            return
        perplexity = print_validation_line(iteration, valid_loss)
        self.last.update({"validation loss": valid_loss, "validation ppl": perplexity})
        self._scalar("lm loss validation", valid_loss, iteration)
        self._scalar("lm loss validation ppl", perplexity, iteration)


def print_validation_line(iteration: int, valid_loss: float) -> float:
    """Megatron-LM's validation line; returns the perplexity (capped at e^20 as Megatron-LM caps it)."""
    perplexity = math.exp(min(20.0, valid_loss))
    print(
        f" validation loss at iteration {iteration} | lm loss value: {valid_loss:.6E} | lm loss PPL: {perplexity:.6E} |",
        flush=True,
    )
    return perplexity


def _or_na(value, format_spec: str) -> str:
    return "n/a" if value is None else format(value, format_spec)
