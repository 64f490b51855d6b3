"""The rest of Megatron-LM's flags, so that a Megatron-LM training script runs here or fails with a
reason: switches that change nothing in megatron-r1 (accepted; --help says what it does instead),
GPU kernel choices (passed to megatron-core; without CUDA or the package their kernel comes from
they fall back to the plain path, which computes the same), and flags of features megatron-r1 does
not have (refused naming the flag and what to use, not argparse's bare "unrecognized arguments")."""

import argparse
import difflib
import importlib.util
import os
import sys

import torch

# Megatron-LM switches with nothing to switch here, and why.
IGNORED_SWITCHES = {
    "--use-mcore-models": "megatron-core models are the only ones",
    "--use-flash-attn": "the attention kernel is chosen automatically (Megatron-LM no longer reads this flag either)",
    "--log-throughput": "the iteration line always shows the throughput",
    "--log-validation-ppl-to-tensorboard": "validation perplexity always goes to TensorBoard (--tensorboard-dir)",
    "--log-timers-to-tensorboard": "there are no per-phase timers; iteration throughput goes to TensorBoard",
    "--no-create-attention-mask-in-dataloader": "the data loader never builds attention masks",
    "--auto-detect-ckpt-format": "checkpoints have one format, torch_dist",
    "--no-check-for-nan-in-loss-and-grad": "steps with non-finite gradients are always skipped and counted",
    "--no-masked-softmax-fusion": "attention never runs megatron-core's masked softmax (torch's "
    "scaled_dot_product_attention, or TransformerEngine's attention, computes it)",
    "--accumulate-allreduce-grads-in-fp32": "gradients are always accumulated and all-reduced in fp32",
    "--attention-softmax-in-fp32": "the attention softmax runs in fp32 already (megatron-core's default; the fused "
    "SDPA kernels accumulate in fp32)",
}

# GPU kernel choices megatron-core implements with CUDA kernels from optional packages; the plain
# path computes the same. Flag -> (the value that turns the choice off, the package the kernel comes
# from). (--moe-grouped-gemm is not one: without TransformerEngine it selects megatron_r1.experts,
# which runs everywhere; nor is --cross-entropy-loss-fusion, whose native kernel is PyTorch's.)
GPU_KERNEL_CHOICES = {
    "--moe-permute-fusion": ("moe_permute_fusion", False, "transformer_engine"),
    "--moe-router-fusion": ("moe_router_fusion", False, "transformer_engine"),
    "--moe-shared-expert-overlap": ("moe_shared_expert_overlap", False, None),
    "--cross-entropy-fusion-impl te": ("cross_entropy_fusion_impl", "native", "transformer_engine"),
    "--moe-token-dispatcher-type flex": ("moe_token_dispatcher_type", "alltoall", "deep_ep"),
}
PACKAGE_NAMES = {"transformer_engine": "TransformerEngine", "deep_ep": "DeepEP"}

# Megatron-LM flags whose only value here is their default -> (default, type, why).
DEFAULT_ONLY = {
    "--context-parallel-size": (
        1,
        int,
        "context parallelism is not supported (long sequences: --recompute-granularity, --sequence-parallel)",
    ),
    "--rotary-percent": (1.0, float, "partial RoPE is not supported"),
    "--rotary-seq-len-interpolation-factor": (
        1.0,
        float,
        "RoPE position interpolation is not supported (DeepSeek's long-context scaling: --rope-type yarn)",
    ),
    **{
        flag: ("fp32", str, "low-precision optimizer state is not supported (it is kept in fp32)")
        for flag in ("--main-grads-dtype", "--main-params-dtype", "--exp-avg-dtype", "--exp-avg-sq-dtype")
    },
}

# Megatron-LM flags of features megatron-r1 does not have -> what to do instead.
UNSUPPORTED = {
    "--fp16": "fp16 training (with loss scaling) is not supported: use --bf16",
    "--apply-query-key-layer-scaling": "it is for fp16 training, which is not supported: use --bf16",
    "--loss-scale": "fp16 training (with loss scaling) is not supported: use --bf16",
    "--initial-loss-scale": "fp16 training (with loss scaling) is not supported: use --bf16",
    "--wandb-project": "Weights & Biases is not built in: use --tensorboard-dir or --metrics-port",
    "--wandb-exp-name": "Weights & Biases is not built in: use --tensorboard-dir or --metrics-port",
    "--wandb-save-dir": "Weights & Biases is not built in: use --tensorboard-dir or --metrics-port",
    "--use-precision-aware-optimizer": "low-precision optimizer state is not supported (it is kept in fp32)",
    "--optimizer-cpu-offload": "optimizer offloading is not supported: shard the optimizer state with "
    "--use-distributed-optimizer",
    "--optimizer-offload-fraction": "optimizer offloading is not supported: shard the optimizer state with "
    "--use-distributed-optimizer",
    "--overlap-cpu-optimizer-d2h-h2d": "optimizer offloading is not supported",
    "--cpu-offloading-num-layers": "activation offloading is not supported: use --recompute-granularity",
    "--use-megatron-fsdp": "FSDP is not supported: --use-distributed-optimizer shards the optimizer state",
    "--use-torch-fsdp2": "FSDP is not supported: --use-distributed-optimizer shards the optimizer state",
    "--data-parallel-sharding-strategy": "FSDP is not supported: --use-distributed-optimizer shards the optimizer state",
    "--tp-comm-overlap": "TransformerEngine's tensor-parallel communication overlap (userbuffers) is not set up",
    "--overlap-moe-expert-parallel-comm": "overlapping expert-parallel communication with another micro-batch is "
    "not supported",
    "--delay-wgrad-compute": "it goes with --overlap-moe-expert-parallel-comm, which is not supported",
    "--fp8-param-gather": "fp8 parameter all-gather is not supported (fp8 compute is: --fp8-format)",
    "--reuse-grad-buf-for-mxfp8-param-ag": "fp8 parameter all-gather is not supported (fp8 compute is: --fp8-format)",
    "--moe-router-padding-for-fp8": "fp8 expert-GEMM padding is not supported",
    "--moe-router-padding-for-quantization": "fp8 expert-GEMM padding is not supported",
    "--rampup-batch-size": "batch-size ramp-up is not supported",
    "--step-batch-size-schedule": "batch-size ramp-up is not supported",
    "--vocab-file": "GPT-2 BPE tokenizers are not supported: --tokenizer-type SentencePieceTokenizer or "
    "HuggingFaceTokenizer with --tokenizer-model",
    "--merge-file": "GPT-2 BPE tokenizers are not supported: --tokenizer-type SentencePieceTokenizer or "
    "HuggingFaceTokenizer with --tokenizer-model",
    "--apply-layernorm-1p": "zero-centred norm weights are not supported",
}


class _Ignored(argparse.Action):
    """A Megatron-LM switch accepted and ignored: sets nothing."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        pass


def add_megatron_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's switches that change nothing here, and its flags that take only the value
    meaning "off" here (any other value is refused in validate_megatron_lm_arguments)."""
    group = parser.add_argument_group(
        "Megatron-LM compatibility",
        "accepted so that Megatron-LM scripts run unchanged; each says why it changes nothing here",
    )
    for flag, reason in IGNORED_SWITCHES.items():
        group.add_argument(flag, action=_Ignored, help=reason)
    group.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="ignored: samples are read in the training process (memory-mapped slices need no loader processes)",
    )
    group.add_argument(
        "--dataloader-type",
        choices=["single"],
        default="single",
        help="the order of Megatron-LM's default sampler (the dataset's samples are shuffled)",
    )
    group.add_argument(
        "--ckpt-format",
        choices=["torch_dist"],
        default="torch_dist",
        help="megatron-core's dist_checkpointing format, the only one",
    )
    for flag, (default, value_type, reason) in DEFAULT_ONLY.items():
        group.add_argument(flag, type=value_type, default=default, help=f"only {_shown(default)}: {reason}")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else value


def validate_megatron_lm_arguments(args, error) -> None:
    """Refuse the values of the compatibility flags megatron-r1 cannot honour; turn the GPU kernel
    choices this machine cannot run off (one line on stderr names them and what they lack)."""
    for flag, (default, _, reason) in DEFAULT_ONLY.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value != default:
            error(f"{flag} {_shown(value)}: only {_shown(default)} is supported here; {reason}")
    fallen_back = {}  # what is missing -> the flags it turned off
    for flag, (dest, off, _) in GPU_KERNEL_CHOICES.items():
        if getattr(args, dest) == (flag.partition(" ")[2] or True):
            missing = missing_for_kernel(flag, args)
            if missing:
                setattr(args, dest, off)
                fallen_back.setdefault(missing, []).append(flag)
    if fallen_back and int(os.environ.get("RANK", "0")) == 0:
        reasons = [f"without {missing}, the plain megatron-core path stands in for {', '.join(flags)}"
                   for missing, flags in fallen_back.items()]  # fmt: skip
        print(f"{'; '.join(reasons)} (same results)", file=sys.stderr)


def missing_for_kernel(flag: str, args) -> str | None:
    """What this machine or layout lacks for the kernel `flag` (of GPU_KERNEL_CHOICES) chooses
    (None: nothing)."""
    package = GPU_KERNEL_CHOICES[flag][2]
    if not torch.cuda.is_available():
        return "CUDA"
    if package and importlib.util.find_spec(package) is None:
        return PACKAGE_NAMES[package]
    expert_tp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    if flag.endswith(" flex") and expert_tp * args.expert_model_parallel_size == 1:
        return "a second expert-parallel or expert-tensor-parallel rank"  # megatron-core's flex requires one
    return None


def parse_known_flags(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args, with the flags it does not know explained: a Megatron-LM feature
    megatron-r1 does not have names what to use instead, a misspelling the closest flag."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_explain_unknown(parser, unknown))
    return args


def _explain_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    flags = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    if not flags:
        return f"unrecognized arguments: {' '.join(unknown)}"
    known = [option for action in parser._actions for option in action.option_strings]
    reasons = []
    for flag in flags:
        if flag in UNSUPPORTED:
            reasons.append(f"{flag}: {UNSUPPORTED[flag]}")
        else:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            reasons.append(f"{flag}: unknown flag" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(reasons)
