"""Training throughput and model-FLOPs utilisation: megatron_r1 vs Hugging Face transformers.

For each config the same DeepSeek-V3-style shape (MLA, dense first layer(s), sigmoid group-limited
router, routed + shared experts, untied output layer) is trained in one process, on one device:

* megatron_r1: ``megatron_r1.training.setup`` + ``train`` (megatron-core model, DDP wrapper,
  megatron-core optimizer and pipeline schedule, the real training loop with its logging and
  MoE/NaN bookkeeping) on mock data;
* transformers: ``DeepseekV3ForCausalLM(DeepseekV3Config(...same shape...))`` with
  ``torch.optim.AdamW`` in a plain loop: the same micro-batches and gradient accumulation, gradient
  clipping at 1.0, the library's default attention (SDPA) and experts implementation.

Both use fp32 on CPU (bf16 autocast with fp32 weights for transformers, --bf16
--cross-entropy-loss-fusion for megatron_r1 on a GPU) and the same number of threads.
transformers' DeepSeek-V3 has no multi-token prediction, so MTP is off on both sides. transformers'
side is configured by the Hugging Face exporter's mapping (megatron_r1.hf.config.deepseek_config),
so each config is one both libraries compute alike.

Timing: after warm-up steps, the median step time over rounds of a few steps. On CPU the two
implementations alternate round by round, so that load from other processes on a shared machine
hits both alike; on a GPU they run one after the other (the GPU proxy's two trainers do not fit
together). Model FLOPs come from megatron_r1/flops.py (Megatron-LM's formula: 6 x active
matmul weights per token + causal attention); MFU divides the achieved FLOP rate by the peak
measured here: the best of several large fp32 matmuls on CPU (bf16 on GPU), before and after.

Configs: ``tiny`` (examples/pretrain_tiny.sh's flags), ``50m`` (~50M-parameter MoE),
``v2-lite-proxy`` (DeepSeek-V2-Lite's widths with 4 layers, for one GPU).

``--moe-grouped-gemm`` adds a third trainer: megatron_r1 with its grouped-GEMM experts
(megatron_r1/experts.py) beside the default SequentialMLP, alternating with both, and prints their
ratio; ``--only`` keeps some of the trainers (e.g. a second run under transformers 5.x, whose
DeepSeek-V3 defaults to its grouped_mm experts: ``--only megatron_r1+gg,transformers``).

Figures per trainer: megatron_r1's setup time (the model built on the device, its weights drawn and
copied there, the optimizer, the data), step time, tokens/s, TFLOP/s per GPU and MFU; on a GPU also
the peak of allocated memory and the GPU-busy fraction (the kernel time torch.profiler records over
one step, divided by that step's time). Host syncs per step are counted over one extra step
(megatron_r1/host_syncs.py): on CUDA those torch's sync debug mode reports; on any device the calls of
``Tensor.item/.tolist/.cpu`` on the benchmarked device's tensors, and on CPU the operators whose
output size depends on the data (masked_select, nonzero ...), each a sync on a GPU. Those
megatron_r1 keeps on a GPU: the loop's reads for the logged iteration line (every iteration here,
--log-interval 1) and the gradient norm (also the NaN check); per MoE layer and micro-batch,
SequentialMLP reads the tokens per expert (the grouped experts on a Hopper GPU do not), and with
expert parallelism the all-to-all waits for its split sizes (megatron_r1/token_dispatch.py permutes
on the device, where megatron-core 0.16.1's dispatchers select tokens with torch.masked_select).

Targets (issue #15): on a GPU, megatron_r1 with the grouped experts at >= 35% MFU of the measured
peak and >= 3x transformers 4.57 in the same run, the grouped experts faster than SequentialMLP; on
CPU, the grouped experts' fallback no slower than SequentialMLP, and the ratio to transformers not
below the 0.9 it had.

Run:
  python benchmarks/bench_train.py                     # tiny and 50m (CPU) / v2-lite-proxy (GPU)
  python benchmarks/bench_train.py --config 50m --rounds 5 --steps 2
  python benchmarks/bench_train.py --config 50m --moe-grouped-gemm   # grouped experts vs SequentialMLP
  python benchmarks/bench_train.py --config v2-lite-proxy --moe-grouped-gemm --only megatron_r1+gg,transformers
  python benchmarks/bench_train.py --config tiny --profile   # where the time goes, per op
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import megatron_r1  # noqa: F401  before megatron.core: silences its import warnings, skips TorchDynamo on CPU

# isort: split
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from megatron.core.utils import get_model_config
from tqdm import tqdm

from megatron_r1.arguments import parse_args
from megatron_r1.distributed import destroy_distributed
from megatron_r1.flops import count_model, human_count, padded_vocab_size
from megatron_r1.hf.config import deepseek_config
from megatron_r1.host_syncs import host_syncs_counted
from megatron_r1.training import build_data, setup, train
from megatron_r1.training.setup import fused_kernels

REPO = Path(__file__).resolve().parents[1]
GROUPED = "megatron_r1+gg"  # megatron_r1 with --moe-grouped-gemm

# Flags that make a run a benchmark: no MTP (transformers has none), no evaluation, no LR warm-up.
BENCH_OVERRIDES = ["--mtp-num-layers", "0", "--lr-warmup-iters", "0", "--log-interval", "1"]

CONFIGS = {
    "50m": (
        "--num-layers 8 --hidden-size 512 --ffn-hidden-size 1536 --num-attention-heads 8 --seq-length 256 "
        "--max-position-embeddings 256 --normalization RMSNorm --swiglu --disable-bias-linear "
        "--untie-embeddings-and-output-weights --multi-latent-attention --qk-layernorm --q-lora-rank 256 --kv-lora-rank 128 "
        "--qk-head-dim 64 --qk-pos-emb-head-dim 32 --v-head-dim 64 --rope-type yarn --rotary-scaling-factor 4 "
        "--original-max-position-embeddings 64 --mscale 1.0 --mscale-all-dim 1.0 --num-experts 16 "
        "--moe-layer-freq [0]*1+[1]*7 --moe-router-topk 2 --moe-ffn-hidden-size 192 "
        "--moe-shared-expert-intermediate-size 192 --moe-router-score-function sigmoid "
        "--moe-router-enable-expert-bias --moe-router-num-groups 4 --moe-router-group-topk 1 "
        "--moe-router-topk-scaling-factor 2.5 --moe-router-load-balancing-type seq_aux_loss "
        "--moe-aux-loss-coeff 1e-4 --moe-token-dispatcher-type alltoall --vocab-size 8192 --mock-data "
        "--micro-batch-size 4 --global-batch-size 8 --lr 1e-3 --weight-decay 0.1 --clip-grad 1.0"
    ),
    # DeepSeek-V2-Lite's widths (no q compression, 64 experts top-6, 2 shared, kv latent 512) with 1
    # dense and 3 MoE layers, so that weights, gradients and Adam states fit one 80 GB GPU. Its router
    # and kv norms take DeepSeek-V3's form (sigmoid scores, --qk-layernorm), which transformers'
    # DeepseekV3 requires and which costs the same as V2-Lite's softmax router.
    "v2-lite-proxy": (
        "--num-layers 4 --hidden-size 2048 --ffn-hidden-size 10944 --num-attention-heads 16 --seq-length 4096 "
        "--max-position-embeddings 4096 --normalization RMSNorm --swiglu --disable-bias-linear "
        "--untie-embeddings-and-output-weights --multi-latent-attention --qk-layernorm --kv-lora-rank 512 "
        "--qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 --rope-type yarn --rotary-scaling-factor 40 "
        "--original-max-position-embeddings 4096 --mscale 0.707 --mscale-all-dim 0.707 --num-experts 64 "
        "--moe-layer-freq [0]*1+[1]*3 --moe-router-topk 6 --moe-ffn-hidden-size 1408 "
        "--moe-shared-expert-intermediate-size 2816 --moe-router-score-function sigmoid "
        "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3 --moe-router-dtype fp32 "
        "--moe-token-dispatcher-type alltoall --vocab-size 102400 --mock-data --micro-batch-size 1 "
        "--global-batch-size 4 --lr 4.2e-4 --weight-decay 0.1 --clip-grad 1.0"
    ),
}


def tiny_preset_flags() -> list[str]:
    """The flags examples/pretrain_tiny.sh launches with (its DRY_RUN prints the command first)."""
    result = subprocess.run(
        ["bash", str(REPO / "examples" / "pretrain_tiny.sh")],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    command = shlex.split(result.stdout.splitlines()[0])
    return command[command.index("pretrain_r1.py") + 1 :]


# On a GPU, as NVIDIA's MoE model zoo trains: bf16, and the logits' cross entropy fused (megatron-core's
# native kernel: TransformerEngine's needs TransformerEngine).
GPU_OVERRIDES = ["--bf16", "--cross-entropy-loss-fusion"]


def config_flags(name: str, cuda: bool) -> list[str]:
    flags = tiny_preset_flags() if name == "tiny" else shlex.split(CONFIGS[name])
    return flags + BENCH_OVERRIDES + [flag for flag in GPU_OVERRIDES if cuda and flag not in flags]


# ---------------------------------------------------------------- peak


def matmul_peak(device: torch.device, repeats: int = 5) -> tuple[float, str]:
    """Best FLOP rate of large square matmuls: fp32 on CPU, bf16 on GPU."""
    size, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best, f"{str(dtype).removeprefix('torch.')} {size}^3 torch.matmul, best of {repeats}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- megatron_r1


class MegatronRun:
    """megatron_r1's training loop, advanced a few iterations at a time."""

    def __init__(self, args, total_iterations: int):
        import megatron.core

        # model.py builds megatron-core's local specs (SDPA core attention, and one GEMM pair per
        # expert, or with --moe-grouped-gemm one grouped GEMM per linear of all experts).
        experts = "grouped-GEMM experts (megatron_r1.experts)" if args.moe_grouped_gemm else "SequentialMLP experts"
        self.implementation = f"megatron-core {megatron.core.__version__}, local specs, {experts}"
        if parallel_state.model_parallel_is_initialized():
            # A second trainer in this process (--moe-grouped-gemm): one process, so its groups are
            # this rank alone, like the first trainer's.
            parallel_state.destroy_model_parallel()
        args.eval_interval = None
        args.train_iters = total_iterations
        self.args = args
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            self.state = setup(args)
            self.train_dataset, _ = build_data(args, self.state)
        self.startup_seconds = time.perf_counter() - start  # the model built, placed and wrapped; the data
        dispatchers = {
            type(m.token_dispatcher).__name__ for m in self.state.model[0].modules() if hasattr(m, "token_dispatcher")
        }
        fused = fused_kernels(get_model_config(self.state.model[0]))
        self.implementation += (
            f", {'/'.join(sorted(dispatchers))}"
            + (", --bf16" if args.bf16 else ", fp32")
            + f", fused kernels: {', '.join(fused) or 'none'}; setup {self.startup_seconds:.1f} s"
        )

    def steps(self, count: int) -> None:
        self.args.train_iters = self.state.iteration + count
        with contextlib.redirect_stdout(io.StringIO()):  # the iteration lines
            train(self.args, self.state, self.train_dataset, None)


# ---------------------------------------------------------------- transformers


def transformers_config(args):
    """The DeepseekV3Config of the model the megatron_r1 flags describe: the HF exporter's own mapping,
    so both sides compute the same function (no KV cache while training)."""
    config = deepseek_config(args, args.padded_vocab_size)
    config.use_cache = False
    return config


class TransformersRun:
    """DeepseekV3ForCausalLM and torch.optim.AdamW in a plain loop."""

    def __init__(self, args, device: torch.device):
        from transformers import DeepseekV3ForCausalLM

        torch.manual_seed(args.seed)
        self.model = DeepseekV3ForCausalLM(transformers_config(args)).to(device).train()
        self.implementation = (
            f"DeepseekV3ForCausalLM, attention={self.model.config._attn_implementation}, "
            # transformers 4.x has one experts implementation (a loop over per-expert MLPs); 5.x names its choice.
            f"experts={getattr(self.model.config, '_experts_implementation', 'per-expert loop')}"
            + (", bf16 autocast" if device.type == "cuda" else ", fp32")
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            weight_decay=args.weight_decay,
        )
        self.clip_grad = args.clip_grad
        self.num_microbatches = args.global_batch_size // args.micro_batch_size
        generator = torch.Generator().manual_seed(args.seed)
        shape = (self.num_microbatches, args.micro_batch_size, args.seq_length)
        self.tokens = torch.randint(0, args.padded_vocab_size, shape, generator=generator).to(device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        )

    def steps(self, count: int) -> None:
        for _ in range(count):
            self.optimizer.zero_grad(set_to_none=True)
            for micro_batch in self.tokens:
                with self.autocast:
                    loss = self.model(input_ids=micro_batch, labels=micro_batch).loss
                (loss / self.num_microbatches).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.optimizer.step()


# ---------------------------------------------------------------- measurement


def host_syncs_per_step(run, device) -> collections.Counter:
    with host_syncs_counted(device) as counts:
        run.steps(1)
        _synchronize(device)
    return counts


def timed_rounds(runs: dict, device, options, progress) -> dict[str, dict]:
    """Per run: seconds per step of each round (the runs alternating round by round), host syncs per
    step, and on a GPU its GPU-busy fraction and peak of allocated memory (one run at a time there)."""
    for run in runs.values():
        run.steps(options.warmup)
        _synchronize(device)
        progress.update(options.warmup)
    measured = {name: {"seconds": []} for name in runs}
    for _ in range(options.rounds):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            run.steps(options.steps)
            _synchronize(device)
            measured[name]["seconds"].append((time.perf_counter() - start) / options.steps)
            progress.update(options.steps)
    for name, run in runs.items():
        if options.profile:
            profile(name, run, device, options.profile_rows)
        measured[name]["host_syncs"] = host_syncs_per_step(run, device)
        if device.type == "cuda":
            measured[name]["gpu_busy"] = gpu_busy_fraction(run)
            measured[name]["peak_memory"] = torch.cuda.max_memory_allocated()
    return measured


def gpu_busy_fraction(run) -> float:
    """The time of the GPU's own activities (kernels, copies) over one step, as torch.profiler
    records them, divided by that step's time (profiling adds host time, so this errs low). Only
    the device's events are summed: the host operators that launched them carry the same time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        start = time.perf_counter()
        run.steps(1)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    device_us = sum(event.device_time_total for event in profiler.events() if event.device_type == DeviceType.CUDA)
    return device_us / 1e6 / seconds


def profile(name: str, run, device, rows: int) -> None:
    """torch.profiler's heaviest operators (self time) over one step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with torch_profile(activities=activities) as profiler:
        run.steps(1)
        _synchronize(device)
    print(f"\n--- {name}: one step, top {rows} operators by self time")
    print(profiler.key_averages().table(sort_by=sort_key, row_limit=rows))


def trainer_builders(name: str, options, device) -> tuple[dict, object]:
    """The trainers to compare (by --moe-grouped-gemm and --only), unbuilt, and the flags' args."""
    cuda = device.type == "cuda"
    args = parse_args(f"bench_train {name}", config_flags(name, cuda))
    # + the host-sync count's step (+ the profiled one, + the GPU-busy one)
    total_steps = options.warmup + options.rounds * options.steps + 1 + options.profile + cuda
    args.padded_vocab_size = padded_vocab_size(args)  # as training.setup pads it
    grouped_args = parse_args(f"bench_train {name}", config_flags(name, cuda) + ["--moe-grouped-gemm"])
    grouped_args.padded_vocab_size = args.padded_vocab_size
    builders = {
        "megatron_r1": lambda: MegatronRun(args, total_steps),
        GROUPED: lambda: MegatronRun(grouped_args, total_steps),
        "transformers": lambda: TransformersRun(args, device),
    }
    wanted = options.only or ["megatron_r1", *([GROUPED] if options.moe_grouped_gemm else []), "transformers"]
    return {impl: build for impl, build in builders.items() if impl in wanted}, args


def measure_trainers(builders: dict, name: str, options, device) -> tuple[dict, dict]:
    """(figures per trainer, its description): on CPU all resident and alternating (load from other
    processes hits all alike); on a GPU one after the other (two trainers of the GPU-sized proxy do
    not fit one GPU together), transformers first (a plain module frees its memory when dropped)."""
    total_progress = len(builders) * (options.warmup + options.rounds * options.steps)
    with tqdm(total=total_progress, desc=name, unit="step") as progress:
        if device.type == "cpu":
            runs = {impl: build() for impl, build in builders.items()}
            return timed_rounds(runs, device, options, progress), {i: r.implementation for i, r in runs.items()}
        measured, implementations = {}, {}
        for impl, build in reversed(builders.items()):
            torch.cuda.reset_peak_memory_stats()
            run = build()
            implementations[impl] = run.implementation
            measured.update(timed_rounds({impl: run}, device, options, progress))
            del run
            torch.cuda.empty_cache()
    return measured, implementations


def benchmark(name: str, options, device) -> dict:
    builders, args = trainer_builders(name, options, device)
    measured, implementations = measure_trainers(builders, name, options, device)
    count = count_model(args)
    destroy_distributed()
    # megatron-core's process-wide MoE loss tracker is sized by the first model's layer count.
    get_moe_layer_wise_logging_tracker().clear()
    result = {"config": name, "count": count, "implementations": implementations, "impls": {}}
    for impl in builders:
        rounds = measured[impl]["seconds"]
        step_seconds = statistics.median(rounds)
        result["impls"][impl] = {
            "step_ms": 1000 * step_seconds,
            "best_ms": 1000 * min(rounds),
            "spread": (max(rounds) - min(rounds)) / step_seconds,
            "tokens_per_s": count.tokens_per_iteration / step_seconds,
            "flops_per_s": count.flops_per_iteration / step_seconds,
            **{key: value for key, value in measured[impl].items() if key != "seconds"},
        }
    return result


def _parse_options(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        action="append",
        choices=["tiny", *CONFIGS],
        help="repeatable; default: tiny and 50m on CPU, v2-lite-proxy on GPU",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=2, help="steps per implementation per round")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both (default: torch's choice); on a machine shared with "
        "other work, 1 keeps threads from waiting on each other",
    )
    parser.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="also megatron_r1 with --moe-grouped-gemm (megatron_r1/experts.py), compared with "
        "the default SequentialMLP experts",
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        default=None,
        metavar="IMPL[,IMPL]",
        help=f"only these trainers, of megatron_r1, {GROUPED} (its grouped-GEMM experts) and transformers",
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    parser.add_argument("--profile-rows", type=int, default=15)
    options = parser.parse_args(argv)
    for flag, minimum in (("warmup", 0), ("rounds", 1), ("steps", 1), ("threads", 1)):
        value = getattr(options, flag)
        if value is not None and value < minimum:
            parser.error(f"--{flag} must be at least {minimum}, got {value}")
    unknown = set(options.only or []) - {"megatron_r1", GROUPED, "transformers"}
    if unknown:
        parser.error(f"--only: no trainer {', '.join(sorted(unknown))} (megatron_r1, {GROUPED}, transformers)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("needs Hugging Face transformers: pip install transformers (keep torch as installed)")
    return options


def _print_result(result: dict, gpu: bool) -> None:
    """One config's trainers: step times, tokens/s, TFLOP/s, MFU (on a GPU also peak memory and
    GPU-busy fraction), host syncs, and the ratios against the targets."""
    count = result["count"]
    print(
        f"\n{result['config']}: {human_count(count.total_params)} params, "
        f"{human_count(count.active_params)} active, {count.tokens_per_iteration} tokens/step, "
        f"{count.flops_per_iteration:.3e} FLOPs/step"
    )
    for impl, description in result["implementations"].items():
        print(f"  {impl}: {description}")
    print(
        f"{'config':<14} {'implementation':<15} {'step ms':>9} {'best ms':>9} {'spread':>7} {'tokens/s':>10} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9} {'GPU busy':>9}  host syncs per step"
    )
    for impl, figures in result["impls"].items():
        syncs = ", ".join(f"{what} {n}" for what, n in figures["host_syncs"].items() if n) or "none"
        peak = f"{figures['peak_memory'] / 2**30:.1f}" if "peak_memory" in figures else "-"
        busy = f"{100 * figures['gpu_busy']:.0f}%" if "gpu_busy" in figures else "-"
        print(
            f"{result['config']:<14} {impl:<15} {figures['step_ms']:>9.1f} {figures['best_ms']:>9.1f} "
            f"{100 * figures['spread']:>6.0f}% {figures['tokens_per_s']:>10.1f} {figures['flops_per_s'] / 1e12:>8.2f} "
            f"{100 * figures['mfu']:>6.2f}% {peak:>9} {busy:>9}  {syncs}"
        )
    for line in _verdicts(result["impls"], gpu):
        print(line)


def _verdicts(impls: dict, gpu: bool) -> list[str]:
    """The targets of the docstring, each with the figure it judges (those the trainers run allow)."""
    lines = []
    ours = impls.get(GROUPED) or impls.get("megatron_r1")
    ours_name = GROUPED if GROUPED in impls else "megatron_r1"
    if GROUPED in impls and "megatron_r1" in impls:
        sequential, grouped = impls["megatron_r1"], impls[GROUPED]
        ratio = grouped["tokens_per_s"] / sequential["tokens_per_s"]
        lines.append(
            f"ratio --moe-grouped-gemm / SequentialMLP tokens/s: {ratio:.2f} ({_meets(ratio >= 1.0)} the 1.00 target); "
            f"best rounds: {sequential['best_ms'] / grouped['best_ms']:.2f}"
        )
    if ours and "transformers" in impls:
        peer = impls["transformers"]
        ratio, target = ours["tokens_per_s"] / peer["tokens_per_s"], 3.0 if gpu else 0.9
        lines.append(
            f"ratio {ours_name} / transformers tokens/s: {ratio:.2f} ({_meets(ratio >= target)} the {target:.1f}x "
            f"{'GPU target' if gpu else 'CPU floor'}); best rounds: {peer['best_ms'] / ours['best_ms']:.2f}"
        )
    if ours and gpu:
        lines.append(f"{ours_name} MFU: {100 * ours['mfu']:.1f}% ({_meets(ours['mfu'] >= 0.35)} the 35% target)")
    return lines


def _meets(condition: bool) -> str:
    return "meets" if condition else "misses"


def main(argv=None) -> None:
    options = _parse_options(argv)  # (says so when transformers is missing)
    import transformers

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = options.config or (["v2-lite-proxy"] if device.type == "cuda" else ["tiny", "50m"])

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    # The peak is measured before and after the runs and the better kept: on a shared machine a
    # single measurement can land in a busy moment and inflate every MFU.
    peak_before, peak_how = matmul_peak(device)
    results = [benchmark(name, options, device) for name in names]
    peak_after, _ = matmul_peak(device)
    peak = max(peak_before, peak_after)
    for result in results:
        for figures in result["impls"].values():
            figures["mfu"] = figures["flops_per_s"] / peak

    print(
        f"\ndevice: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"transformers {transformers.__version__}"
    )
    print(
        f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_how}; before the runs {peak_before / 1e9:.1f}, "
        f"after {peak_after / 1e9:.1f})"
    )
    if device.type == "cpu":
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (a shared machine slows both sides alike)")
    print(
        "step ms: median over rounds; best: the fastest round (interference from other processes only adds "
        "time); spread: (slowest - fastest round) / median"
    )
    for result in results:
        _print_result(result, device.type == "cuda")


if __name__ == "__main__":
    sys.exit(main())
