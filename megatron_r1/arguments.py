"""Command-line arguments with Megatron-LM's flag names, and the checks that run before any
process group exists.

Model flags are named after megatron-core's TransformerConfig fields (Megatron-LM's convention), so
:func:`transformer_config_from_args` passes every flag whose name is a config field straight through;
the few flags Megatron-LM names differently are mapped in ``_CONFIG_RENAMES``.
"""

import argparse
import dataclasses
import os
import re

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_r1.compat import transformer_engine_installed
from megatron_r1.data.pretrain import empty_split_error
from megatron_r1.layout import decoder_layers_per_stage
from megatron_r1.megatron_lm_flags import add_megatron_lm_arguments, parse_known_flags, validate_megatron_lm_arguments
from megatron_r1.signals import EXIT_SIGNALS
from megatron_r1.tokenizer import add_tokenizer_arguments, tokenizer_arguments_error

# Megatron-LM flag dest -> megatron-core TransformerConfig field.
_CONFIG_RENAMES = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
}


def _int_or_list(value: str):
    """--moe-layer-freq / --window-attn-skip-freq: an int N (every Nth layer) or a Python list of
    0/1 per layer such as "[0]*1+[1]*3" (Megatron-LM's recipes also write "([0]*3+[1]*58)")."""
    if value.strip().startswith(("[", "(")):
        try:
            pattern = eval(value, {"__builtins__": {}})  # list arithmetic only, no names
        except Exception as error:
            raise argparse.ArgumentTypeError(f"cannot parse layer pattern {value!r}: {error}") from None
        if not (isinstance(pattern, list) and all(x in (0, 1) for x in pattern)):
            raise argparse.ArgumentTypeError(f"layer pattern must be a list of 0/1, got {value!r}")
        return pattern
    return int(value)


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False
    )
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden")
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--group-query-attention", action="store_true")
    model.add_argument("--num-query-groups", type=int, default=None)
    model.add_argument("--kv-channels", type=int, default=None)
    model.add_argument("--seq-length", type=int, default=128)
    model.add_argument("--max-position-embeddings", type=int, default=None)
    model.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    model.add_argument("--norm-epsilon", type=float, default=1e-6)
    model.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs (gated SiLU)")
    model.add_argument(
        "--qk-layernorm",
        action="store_true",
        help="RMS/LayerNorm on queries and keys (MLA: on the compressed q and kv, as DeepSeek-V3)",
    )
    model.add_argument("--disable-bias-linear", action="store_true")
    model.add_argument("--position-embedding-type", choices=["rope", "learned_absolute", "none"], default="rope")
    model.add_argument(
        "--use-rotary-position-embeddings",
        dest="position_embedding_type",
        action="store_const",
        const="rope",
        help="Megatron-LM's older spelling of --position-embedding-type rope",
    )
    model.add_argument(
        "--no-position-embedding",
        action="store_true",
        help="Megatron-LM's older switch, accepted with RoPE (which adds no position embedding)",
    )
    model.add_argument("--rotary-base", type=int, default=10000)
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    model.add_argument(
        "--window-size",
        nargs="+",
        default=None,
        metavar="LEFT,RIGHT",
        help="sliding-window attention; LEFT,0 for causal models (LEFT RIGHT also accepted)",
    )
    model.add_argument(
        "--window-attn-skip-freq",
        type=_int_or_list,
        default=None,
        help="with --window-size, which layers keep full attention: N, every Nth layer; or a "
        "list of 0/1 per layer, 1 for a sliding-window layer (e.g. '([1]*3+[0]*1)*2')",
    )
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument("--init-method-std", type=float, default=0.02)
    model.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    model.add_argument(
        "--padded-vocab-size",
        type=int,
        default=None,
        help="rows of the embedding and output layer (default: the vocabulary rounded up to a "
        "multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size)",
    )

    mla = parser.add_argument_group("multi-latent attention")
    mla.add_argument("--multi-latent-attention", action="store_true")
    mla.add_argument("--q-lora-rank", type=int, default=None, help="None: no q compression")
    mla.add_argument("--kv-lora-rank", type=int, default=32)
    mla.add_argument("--qk-head-dim", type=int, default=32)
    mla.add_argument("--qk-pos-emb-head-dim", type=int, default=16)
    mla.add_argument("--v-head-dim", type=int, default=32)
    mla.add_argument("--rope-type", choices=["rope", "yarn"], default="rope")
    mla.add_argument("--rotary-scaling-factor", type=float, default=1.0)
    mla.add_argument("--original-max-position-embeddings", type=int, default=None)
    mla.add_argument(
        "--beta-fast", type=float, default=32.0
    )  # floats: a saved value is checked against the default's type
    mla.add_argument("--beta-slow", type=float, default=1.0)
    mla.add_argument("--mscale", type=float, default=1.0)
    mla.add_argument("--mscale-all-dim", type=float, default=0.0)

    moe = parser.add_argument_group("mixture of experts")
    moe.add_argument("--num-experts", type=int, default=None)
    moe.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    moe.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    moe.add_argument(
        "--moe-layer-freq",
        type=_int_or_list,
        default=1,
        help='int, or a 0/1 pattern such as "[0]*1+[1]*3" (first layer dense)',
    )
    moe.add_argument("--moe-router-topk", type=int, default=2)
    moe.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    moe.add_argument("--moe-router-pre-softmax", action="store_true")
    moe.add_argument("--moe-router-num-groups", type=int, default=None)
    moe.add_argument("--moe-router-group-topk", type=int, default=None)
    moe.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    moe.add_argument(
        "--moe-router-load-balancing-type",
        default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
    )
    moe.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    moe.add_argument("--moe-z-loss-coeff", type=float, default=None)
    moe.add_argument(
        "--moe-router-enable-expert-bias", action="store_true", help="aux-loss-free load balancing (DeepSeek-V3)"
    )
    moe.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    moe.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None)
    moe.add_argument(
        "--moe-token-dispatcher-type",
        choices=["allgather", "alltoall", "flex"],
        default="allgather",
        help="flex: DeepEP/HybridEP kernels (CUDA; without it, alltoall)",
    )
    moe.add_argument("--moe-flex-dispatcher-backend", choices=["deepep", "hybridep"], default="deepep")
    moe.add_argument("--moe-deepep-num-sms", type=int, default=20, help="streaming multiprocessors DeepEP may use")
    moe.add_argument("--moe-hybridep-num-sms", type=int, default=16, help="streaming multiprocessors HybridEP may use")
    moe.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="None: dropless")
    moe.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    moe.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs")
    moe.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="each linear of all local experts as one grouped GEMM: TransformerEngine's TEGroupedMLP "
        "with --transformer-impl transformer_engine, else torch's grouped_mm (megatron_r1.experts; "
        "same checkpoints as without the flag)",
    )
    moe.add_argument(
        "--moe-permute-fusion",
        action="store_true",
        help="fused token permutation (TransformerEngine on CUDA; without it, the plain path)",
    )
    moe.add_argument(
        "--moe-router-fusion",
        action="store_true",
        help="fused top-k routing and aux loss (TransformerEngine on CUDA; without it, the plain path)",
    )
    moe.add_argument(
        "--moe-shared-expert-overlap",
        action="store_true",
        help="run the shared experts beside the alltoall dispatch (CUDA streams; without them, in turn)",
    )
    moe.add_argument(
        "--moe-router-force-load-balancing",
        action="store_true",
        help="benchmarking only: random router scores, so every expert gets its share of tokens",
    )
    moe.add_argument(
        "--moe-per-layer-logging",
        action="store_true",
        help="the load-balancing and z losses of every MoE layer in TensorBoard",
    )
    moe.add_argument("--mtp-num-layers", type=int, default=None)
    moe.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1)

    model.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default=None,
        help="layer implementation; default: transformer_engine when it is installed and CUDA "
        "is available, else local (megatron-core modules + megatron_r1.layers)",
    )
    model.add_argument(
        "--enable-experimental",
        action="store_true",
        help="megatron-core's experimental features (megatron.core.config.set_experimental_flag)",
    )
    model.add_argument(
        "--fp8-format", choices=["e4m3", "hybrid"], default=None, help="FP8 training through TransformerEngine"
    )
    model.add_argument(
        "--fp8-recipe",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
        default="delayed",
        help="with --fp8-format: TransformerEngine's scaling recipe",
    )
    model.add_argument("--fp8-amax-history-len", type=int, default=1, help="with --fp8-recipe delayed")
    model.add_argument(
        "--fp8-amax-compute-algo",
        choices=["most_recent", "max"],
        default="most_recent",
        help="with --fp8-recipe delayed",
    )
    model.add_argument(
        "--attention-backend",
        choices=[backend.name for backend in AttnBackend],
        default="auto",
        help="TransformerEngine's attention kernel (megatron-core sets NVTE_*_ATTN); the local "
        "implementation always uses torch's scaled_dot_product_attention",
    )
    model.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="fused vocab-parallel cross entropy (CUDA; without it, the plain path)",
    )
    model.add_argument(
        "--cross-entropy-fusion-impl",
        choices=["native", "te"],
        default="native",
        help="with --cross-entropy-loss-fusion: megatron-core's or TransformerEngine's kernel",
    )

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    parallel.add_argument(
        "--expert-tensor-parallel-size", type=int, default=None, help="default: the tensor-parallel size"
    )
    parallel.add_argument(
        "--decoder-first-pipeline-num-layers",
        type=int,
        default=None,
        help="decoder layers on the first pipeline stage; the stages without a given number "
        "share the rest evenly (e.g. DeepSeek-V3's 61 layers)",
    )
    parallel.add_argument(
        "--decoder-last-pipeline-num-layers",
        type=int,
        default=None,
        help="decoder layers on the last pipeline stage (which also holds the output layer and the MTP layers)",
    )
    parallel.add_argument(
        "--pipeline-model-parallel-layout",
        default=None,
        metavar="LAYOUT",
        help="the layers of every pipeline stage, as Megatron-LM writes them: E embedding, t decoder "
        "layer, m MTP layer, L loss, | between stages (PP x virtual stages, in layer order), "
        "(...)*n repeats; e.g. DeepSeek-V3 on PP 16 x 2 virtual stages: Et|(tt|)*30mL",
    )
    parallel.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="interleaved 1F1B: each rank holds num_layers / (PP x this) model chunks",
    )
    parallel.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="interleaved 1F1B, the other way to say it: model chunks per pipeline rank",
    )
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10,
        help="how long a collective may wait for the other ranks before the run fails (raise "
        "it when loading or saving checkpoints on a slow file system takes longer)",
    )
    parallel.add_argument("--use-distributed-optimizer", action="store_true")
    parallel.add_argument(
        "--overlap-grad-reduce", action="store_true", help="reduce each gradient bucket while the backward pass goes on"
    )
    parallel.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="with the distributed optimizer: all-gather the updated parameters during the "
        "next forward pass, bucket by bucket, instead of after the optimizer step",
    )
    parallel.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    parallel.add_argument(
        "--recompute-activations",
        dest="recompute_granularity",
        action="store_const",
        const="selective",
        help="Megatron-LM's older spelling of --recompute-granularity selective",
    )
    parallel.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    parallel.add_argument("--recompute-num-layers", type=int, default=None)
    parallel.add_argument(
        "--recompute-modules",
        nargs="+",
        default=None,
        choices=["core_attn", "layernorm", "mla_up_proj", "mlp", "moe", "moe_act", "shared_experts"],
        help="with --recompute-granularity selective: the submodules whose activations are "
        "recomputed in the backward pass (default: core_attn)",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--micro-batch-size", type=int, default=2)
    training.add_argument(
        "--global-batch-size", type=int, default=None, help="default: micro-batch size x data-parallel size"
    )
    training.add_argument("--train-iters", type=int, default=None, help="optimizer steps (default 20)")
    training.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="instead of --train-iters: samples to train on; the LR schedule then counts "
        "samples (--lr-warmup-samples, --lr-decay-samples, --lr-wsd-decay-samples)",
    )
    training.add_argument("--seed", type=int, default=1234)
    training.add_argument(
        "--empty-unused-memory-level",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="return cached, unused GPU memory to the driver (less fragmentation, slower): "
        "1 after each forward-backward pass, 2 also after each optimizer step",
    )
    training.add_argument(
        "--disable-bf16-reduced-precision-matmul",
        action="store_true",
        help="bf16 GEMMs on the GPU accumulate in full precision (cuBLAS may otherwise reduce partial sums in bf16)",
    )
    training.add_argument(
        "--manual-gc",
        action="store_true",
        help="turn Python's threshold-triggered garbage collector off during training and "
        "collect at fixed points instead, the same on every rank (no straggler pauses)",
    )
    training.add_argument(
        "--manual-gc-interval",
        type=int,
        default=0,
        help="with --manual-gc: collect every this many iterations (0: only around evaluations)",
    )
    training.add_argument(
        "--no-manual-gc-eval",
        dest="manual_gc_eval",
        action="store_false",
        help="with --manual-gc: do not collect before and after each evaluation",
    )
    training.add_argument(
        "--seq-length-curriculum",
        nargs="+",
        default=None,
        metavar="LENGTH:FROM_ITER",
        help="e.g. 256:0 2048:1000 8192:5000; each LENGTH divides --seq-length, whose samples "
        "are cut into LENGTH-token sequences (same tokens per step)",
    )
    training.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    training.add_argument(
        "--grad-reduce-in-bf16",
        action="store_true",
        help="with --bf16: accumulate and all-reduce gradients in bf16 (half the grad buffers' "
        "memory and traffic; fp32 by default)",
    )
    training.add_argument(
        "--no-gradient-accumulation-fusion",
        dest="gradient_accumulation_fusion",
        action="store_false",
        help="compute each weight gradient apart and add it to the grad buffer, instead of "
        "accumulating it there in one GEMM (with Apex's CUDA extension, or on CPU)",
    )
    training.add_argument(
        "--optimizer", choices=["adam", "lion"], default="adam", help="adam: AdamW (decoupled weight decay); lion: Lion"
    )
    training.add_argument("--weight-decay", type=float, default=0.01)
    training.add_argument("--clip-grad", type=float, default=1.0)
    training.add_argument("--adam-beta1", type=float, default=0.9)
    training.add_argument("--adam-beta2", type=float, default=0.95)
    training.add_argument("--adam-eps", type=float, default=1e-8)
    training.add_argument("--lion-beta1", type=float, default=0.9)
    training.add_argument("--lion-beta2", type=float, default=0.99)
    training.add_argument(
        "--calculate-per-token-loss",
        action="store_true",
        help="the loss is the mean over all loss tokens of the global batch, not the mean of each "
        "micro-batch's mean (the same when every micro-batch has as many loss tokens)",
    )
    training.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="of the training LM loss (validation loss stays plain cross entropy)",
    )

    lr = parser.add_argument_group("learning rate")
    lr.add_argument("--lr", type=float, default=3e-4)
    lr.add_argument("--min-lr", type=float, default=0.0)
    lr.add_argument(
        "--decoupled-lr",
        type=float,
        default=None,
        help="the input embedding's and output layer's own peak learning rate (same schedule)",
    )
    lr.add_argument(
        "--decoupled-min-lr",
        type=float,
        default=None,
        help="with --decoupled-lr: their minimum learning rate (default: --min-lr)",
    )
    lr.add_argument(
        "--lr-decay-style",
        default="cosine",
        choices=["constant", "linear", "cosine", "cosine-warm-restarts", "inverse-square-root", "WSD"],
    )
    lr.add_argument("--lr-warmup-init", type=float, default=0.0, help="the learning rate warm-up starts from")
    lr.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 0")
    lr.add_argument("--lr-warmup-samples", type=int, default=None, help="with --train-samples; default: 0")
    lr.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="instead of --lr-warmup-iters/samples: this fraction of the decay",
    )
    lr.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    lr.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples; default: --train-samples")
    lr.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    lr.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples")
    lr.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine"], default="exponential")
    lr.add_argument(
        "--lr-restart-iters",
        type=int,
        default=None,
        help="cosine-warm-restarts: length of the first cycle after warmup",
    )
    lr.add_argument(
        "--lr-restart-mult",
        type=float,
        default=1.0,
        help="cosine-warm-restarts: each cycle is this many times longer than the last",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="indexed-dataset prefixes, optionally weighted: 0.45 zh_text_document 0.55 en_...",
    )
    data.add_argument(
        "--train-data-path",
        nargs="*",
        default=None,
        help="instead of --data-path and --split: the training data (prefixes, optionally weighted)",
    )
    data.add_argument(
        "--valid-data-path",
        nargs="*",
        default=None,
        help="with --train-data-path: the validation data (fine-tuning: .jsonl files or "
        "tools/preprocess_sft.py prefixes; default: a --split share of --data-path)",
    )
    data.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    data.add_argument("--mock-data", action="store_true", help="synthetic data, for smoke runs")
    data.add_argument("--data-cache-path", default=None)
    data.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    data.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="tokens attend only within their own document of a sample (documents end at the end-of-document token)",
    )
    data.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="position ids restart at each document of a sample (what RoPE sees does not change: it "
        "depends on relative positions only)",
    )
    data.add_argument(
        "--no-mmap-bin-files",
        dest="mmap_bin_files",
        action="store_false",
        help="read the .bin files with file reads instead of memory maps (e.g. on network file "
        "systems where mmap is slow)",
    )
    add_tokenizer_arguments(parser, required=False)

    checkpoint = parser.add_argument_group("checkpointing")
    checkpoint.add_argument("--save", default=None, help="checkpoint directory to write")
    checkpoint.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    checkpoint.add_argument(
        "--load", default=None, help="checkpoint directory to resume from (default: --save, so rerunning resumes)"
    )
    checkpoint.add_argument("--ckpt-step", type=int, default=None, help="load this iteration, not the latest")
    checkpoint.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    checkpoint.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    checkpoint.add_argument(
        "--dist-ckpt-strictness",
        default="assume_ok_unexpected",
        choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all", "ignore_all"],
        help="megatron-core's handling of keys the model asks for that the checkpoint lacks "
        "('unexpected') and, with the '_all' values, of checkpoint keys nothing loads "
        "('missing', e.g. the optimizer state under --no-load-optim)",
    )
    checkpoint.add_argument(
        "--no-save-optim",
        action="store_true",
        help="checkpoints without the optimizer state (a resume then needs --no-load-optim)",
    )
    checkpoint.add_argument("--no-save-rng", action="store_true", help="checkpoints without the RNG states")
    checkpoint.add_argument(
        "--finetune",
        action="store_true",
        help="load weights only: iteration, data position, optimizer and schedule start anew",
    )
    checkpoint.add_argument("--keep-last-n", type=int, default=None, help="delete older checkpoints than the last N")
    checkpoint.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR/WD schedule from the flags, not the checkpoint",
    )
    checkpoint.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="save (with --save) and exit after an iteration divisible by this",
    )
    checkpoint.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints from a forked process while training goes on; each becomes "
        "visible (rename, tracker) once written on every rank",
    )
    checkpoint.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on --exit-signal, every rank stops after the same iteration, saves (with --save) and exits 0",
    )
    checkpoint.add_argument(
        "--exit-signal",
        choices=EXIT_SIGNALS,
        default="SIGTERM",
        help="the signal --exit-signal-handler catches; e.g. SIGUSR1 with SLURM's --signal=B:USR1@120",
    )
    checkpoint.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save (with --save) and exit once the run has lasted this long (all ranks agree)",
    )
    checkpoint.add_argument(
        "--rollback-after-bad-steps",
        type=int,
        default=None,
        metavar="N",
        help="after N consecutive skipped (NaN/Inf) iterations, restore weights, optimizer and LR "
        "schedule from the latest checkpoint under --save; the data goes on past the "
        "batches since then",
    )

    logging = parser.add_argument_group("logging and evaluation")
    logging.add_argument("--log-interval", type=int, default=1)
    logging.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for the iteration line's MFU (default: the dense bf16 peak "
        "of a known GPU, megatron_r1/flops.py; none on CPU)",
    )
    logging.add_argument("--eval-interval", type=int, default=None, help="default: no evaluation")
    logging.add_argument("--eval-iters", type=int, default=2)
    logging.add_argument("--skip-train", action="store_true", help="only evaluate the (loaded) model")
    logging.add_argument("--tensorboard-dir", default=None)
    logging.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port from the logging (last) rank",
    )
    logging.add_argument(
        "--profile",
        action="store_true",
        help="profile iterations --profile-step-start to --profile-step-end (exclusive) on "
        "--profile-ranks: with --use-pytorch-profiler into --tensorboard-dir, else for nsys "
        "(nsys profile -c cudaProfilerApi)",
    )
    logging.add_argument("--use-pytorch-profiler", action="store_true", help="with --profile: torch.profiler")
    logging.add_argument("--profile-step-start", type=int, default=10)
    logging.add_argument("--profile-step-end", type=int, default=12)
    logging.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    logging.add_argument(
        "--tensorboard-queue-size", type=int, default=1000, help="TensorBoard events held before they are written out"
    )
    logging.add_argument(
        "--log-memory-to-tensorboard",
        action="store_true",
        help="memory figures in TensorBoard: the CUDA allocator's, or without CUDA the peak RSS",
    )
    logging.add_argument(
        "--log-num-zeros-in-grad",
        action="store_true",
        help="the number of zero gradient elements in the iteration line and TensorBoard",
    )
    logging.add_argument(
        "--log-params-norm",
        action="store_true",
        help="the L2 norm of all weights in the iteration line and TensorBoard",
    )
    logging.add_argument(
        "--logging-level",
        type=int,
        default=None,
        help="Python logging level of megatron-core and megatron-r1 (e.g. 40: errors only)",
    )
    add_megatron_lm_arguments(parser)
    return parser


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = build_parser(description)
    args = parse_known_flags(parser, argv)
    validate_args(args, parser.error)
    return args


def validate_args(args, error) -> None:
    """Fill derived values and reject inconsistent layouts with one line naming the flags; runs
    before any process group exists, so a bad launch fails in seconds on every rank alike."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    if world_size % (tp * pp):
        error(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp})"
        )
    args.data_parallel_size = world_size // (tp * pp)
    args.world_size = world_size
    if args.num_attention_heads % tp:
        error(
            f"--num-attention-heads ({args.num_attention_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if args.group_query_attention or args.num_query_groups:
        args.num_query_groups = args.num_query_groups or args.num_attention_heads
        if args.num_query_groups % tp:
            error(
                f"--num-query-groups ({args.num_query_groups}) is not divisible by --tensor-model-parallel-size ({tp})"
            )
    _resolve_pipeline_split(args, error)
    if args.recompute_modules and args.recompute_granularity != "selective":
        error("--recompute-modules needs --recompute-granularity selective")
    if args.recompute_modules and "mla_up_proj" in args.recompute_modules and not args.multi_latent_attention:
        error("--recompute-modules mla_up_proj needs --multi-latent-attention")
    if args.recompute_modules and "layernorm" in args.recompute_modules and not transformer_engine_installed():
        error("--recompute-modules layernorm needs TransformerEngine (megatron-core recomputes TE's norms)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        error(f"--peak-tflops ({args.peak_tflops:g}) must be positive")
    if args.distributed_timeout_minutes <= 0:
        error(f"--distributed-timeout-minutes ({args.distributed_timeout_minutes:g}) must be positive")
    if args.manual_gc_interval < 0:
        error(f"--manual-gc-interval ({args.manual_gc_interval}) must be 0 or positive")
    if args.profile and not 0 <= args.profile_step_start < args.profile_step_end:
        error(
            f"--profile-step-start ({args.profile_step_start}) must be below --profile-step-end "
            f"({args.profile_step_end})"
        )
    if args.profile and args.use_pytorch_profiler and not args.tensorboard_dir:
        error("--use-pytorch-profiler writes its trace into --tensorboard-dir: give one")
    if args.profile and not args.use_pytorch_profiler and not torch.cuda.is_available():
        error(
            "--profile without --use-pytorch-profiler marks the iterations for nsys, which needs CUDA: add "
            "--use-pytorch-profiler"
        )
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        error("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if isinstance(args.moe_layer_freq, list) and len(args.moe_layer_freq) != args.num_layers:
        error(f"--moe-layer-freq pattern has {len(args.moe_layer_freq)} entries, --num-layers is {args.num_layers}")
    if args.num_experts:
        if args.num_experts % ep:
            error(f"--num-experts ({args.num_experts}) is not divisible by --expert-model-parallel-size ({ep})")
        etp = args.expert_tensor_parallel_size or tp
        if world_size % (etp * ep * pp):
            error(
                f"world size {world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
                f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp})"
            )
        if tp > 1 and not args.sequence_parallel:
            error("MoE with --tensor-model-parallel-size > 1 requires --sequence-parallel")
        if not args.disable_bias_linear:
            # megatron-core 0.16's expert MLP adds its bias in place on an autograd view.
            error("--num-experts requires --disable-bias-linear (expert biases are not supported)")
    elif ep > 1:
        error("--expert-model-parallel-size > 1 needs --num-experts")
    if args.multi_latent_attention and tp > 1 and not args.sequence_parallel:
        error("--multi-latent-attention with --tensor-model-parallel-size > 1 requires --sequence-parallel")
    te_usable = transformer_engine_installed() and torch.cuda.is_available()
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if te_usable else "local"
    if args.transformer_impl == "transformer_engine" and not te_usable:
        error("--transformer-impl transformer_engine needs CUDA and TransformerEngine (pip install -e .[gpu])")
    validate_megatron_lm_arguments(args, error)
    if (
        args.recompute_modules
        and "moe_act" in args.recompute_modules
        and not (args.moe_grouped_gemm and args.transformer_impl == "transformer_engine")
    ):
        error(
            "--recompute-modules moe_act needs --moe-grouped-gemm with --transformer-impl transformer_engine "
            "(megatron-core recomputes TEGroupedMLP's activation)"
        )
    if args.fp8_format and args.transformer_impl != "transformer_engine":
        error("--fp8-format needs --transformer-impl transformer_engine (CUDA + TransformerEngine)")
    if args.window_size is not None:
        args.window_size = _parse_window(args.window_size, error)
    skip = args.window_attn_skip_freq
    if skip is not None:
        if args.window_size is None:
            error("--window-attn-skip-freq needs --window-size (the sliding window of the other layers)")
        if isinstance(skip, list) and len(skip) != args.num_layers:
            error(f"--window-attn-skip-freq pattern has {len(skip)} entries, --num-layers is {args.num_layers}")
        if isinstance(skip, int) and skip < 1:
            error(f"--window-attn-skip-freq ({skip}) must be at least 1")
    if args.no_position_embedding and args.position_embedding_type != "rope":
        error(
            f"--no-position-embedding goes with RoPE only; for no position information at all: "
            f"--position-embedding-type none (not {args.position_embedding_type})"
        )
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # nothing to split; as Megatron-LM does
    if args.mtp_num_layers and args.position_embedding_type == "learned_absolute":
        error("--mtp-num-layers needs --position-embedding-type rope")

    per_step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or per_step
    if args.global_batch_size % per_step:
        error(
            f"--global-batch-size ({args.global_batch_size}) is not divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({args.data_parallel_size})"
        )
    args.num_microbatches = args.global_batch_size // per_step
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        error(
            f"interleaved pipelining needs the number of micro-batches ({args.num_microbatches} = "
            f"--global-batch-size / (--micro-batch-size x data-parallel size)) divisible by "
            f"--pipeline-model-parallel-size ({pp})"
        )
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    # TransformerConfig's defaults, resolved here so that a checkpoint's saved shape compares equal
    # whether a size was given explicitly or by default.
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    if args.seq_length_curriculum:
        args.seq_length_curriculum = _parse_curriculum(args, error)
        if args.reset_attention_mask or args.reset_position_ids:
            error(
                "--seq-length-curriculum cuts samples into independent sequences: not with "
                "--reset-attention-mask/--reset-position-ids"
            )
    if args.reset_attention_mask and args.transformer_impl == "transformer_engine":
        error(
            "--reset-attention-mask needs --transformer-impl local (TransformerEngine's causal attention takes "
            "no document mask)"
        )
    _resolve_schedule_units(args, error)
    for flag in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            error(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must be in [0, 1)")
    if not 0.0 <= args.label_smoothing < 1.0:
        error(f"--label-smoothing ({args.label_smoothing}) must be in [0, 1)")

    args.load = args.load or args.save
    if args.save_interval and not args.save:
        error("--save-interval needs --save DIR")
    if args.rollback_after_bad_steps is not None and (args.rollback_after_bad_steps < 1 or not args.save):
        error(
            f"--rollback-after-bad-steps ({args.rollback_after_bad_steps}) must be at least 1 and needs --save DIR "
            f"(the checkpoints it rolls back to)"
        )
    if args.rollback_after_bad_steps is not None and args.no_save_optim:
        error("--rollback-after-bad-steps restores the optimizer state from the checkpoints: not with --no-save-optim")
    if args.padded_vocab_size is not None and args.padded_vocab_size % tp:
        error(f"--padded-vocab-size ({args.padded_vocab_size}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.grad_reduce_in_bf16 and not args.bf16:
        error("--grad-reduce-in-bf16 needs --bf16 (fp32 training keeps fp32 gradients)")
    if args.decoupled_min_lr is not None and args.decoupled_lr is None:
        error("--decoupled-min-lr needs --decoupled-lr")
    if args.keep_last_n is not None and args.keep_last_n < 1:
        error(f"--keep-last-n ({args.keep_last_n}) must be at least 1")
    args.data_per_split = None  # [train, valid, test] blends, from --train/valid-data-path
    if args.tokenizer_type == "NullTokenizer" and args.tokenizer_model:
        error("--tokenizer-type NullTokenizer reads token ids, no --tokenizer-model")
    if args.mock_data:
        if not (args.tokenizer_model or args.vocab_size):
            error("--mock-data needs --vocab-size or a tokenizer (--tokenizer-model)")
        if not args.tokenizer_model:
            args.tokenizer_type = "NullTokenizer"  # ids 0..N-1, as the mock data draws them
    else:
        per_split = args.train_data_path is not None or args.valid_data_path is not None
        if per_split and args.data_path:
            error("--data-path and --train-data-path/--valid-data-path are alternatives: give one")
        if not (args.data_path or per_split):
            error("give --data-path PREFIX [...] (indexed datasets from tools/preprocess_data.py) or --mock-data")
        if missing := tokenizer_arguments_error(args):
            error(f"--data-path needs the tokenizer the data was made with: {missing}")
        if per_split:
            if args.train_data_path is None:
                error("--valid-data-path needs --train-data-path (or use --data-path with --split)")
            train = _parse_blend(args.train_data_path, "--train-data-path", error)
            valid = (
                None if args.valid_data_path is None else _parse_blend(args.valid_data_path, "--valid-data-path", error)
            )
            args.data_per_split = [train, valid, None]
            if valid is None and (args.eval_interval or args.skip_train):
                error("evaluation (--eval-interval, --skip-train) reads validation data: give --valid-data-path")
        else:
            args.data_path = _parse_blend(args.data_path, "--data-path", error)
            proportions = r"\d*\.?\d+([,/]\d*\.?\d+){0,2}"  # up to 3 numbers, as megatron-core reads them
            if not re.fullmatch(proportions, args.split) or not any(map(float, re.split("[,/]", args.split))):
                error(f"--split {args.split}: give train,valid,test proportions such as 969,30,1")
            evaluated = bool(args.skip_train or args.eval_interval)  # evaluation reads the validation split
            try:
                message = empty_split_error(args.data_path, args.split, [not args.skip_train, evaluated, False])
            except ValueError as bad_index:
                message = f"--data-path: {bad_index}"
            if message:
                error(message)
    if args.tokenizer_model and not os.path.exists(args.tokenizer_model):
        error(f"--tokenizer-model {args.tokenizer_model}: no such file or directory")


def _resolve_pipeline_split(args, error):
    """Which decoder layers each pipeline stage (and virtual-pipeline chunk) holds: an even split,
    --decoder-first/last-pipeline-num-layers, or Megatron-LM's --pipeline-model-parallel-layout.
    Sets args.virtual_pipeline_model_parallel_size (None without interleaving)."""
    pp = args.pipeline_model_parallel_size
    uneven = args.decoder_first_pipeline_num_layers is not None or args.decoder_last_pipeline_num_layers is not None
    virtual = args.num_layers_per_virtual_pipeline_stage or args.num_virtual_stages_per_pipeline_rank
    args.virtual_pipeline_model_parallel_size = None
    if args.pipeline_model_parallel_layout:
        if uneven or virtual:
            error(
                "--pipeline-model-parallel-layout places every layer: not with "
                "--decoder-first/last-pipeline-num-layers, --num-layers-per-virtual-pipeline-stage or "
                "--num-virtual-stages-per-pipeline-rank"
            )
        layout = _parse_pipeline_layout(args, error)
        vpp = layout.virtual_pipeline_model_parallel_size
        if pp == 1 and vpp > 1:
            error(
                f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout}: {vpp} stages need "
                "--pipeline-model-parallel-size > 1"
            )
        args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
        return
    if uneven:
        if pp == 1 or virtual:
            error(
                "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1 and no virtual "
                "pipeline (for both: --pipeline-model-parallel-layout)"
            )
        try:
            decoder_layers_per_stage(
                args.num_layers, pp, args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
            )
        except ValueError as exc:
            error(str(exc))
    elif args.num_layers % pp:
        error(
            f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp}); "
            "or split it unevenly with --decoder-first/last-pipeline-num-layers"
        )
    if args.num_virtual_stages_per_pipeline_rank:
        if args.num_layers_per_virtual_pipeline_stage:
            error(
                "--num-virtual-stages-per-pipeline-rank and --num-layers-per-virtual-pipeline-stage are "
                "alternatives: give one"
            )
        chunks = pp * args.num_virtual_stages_per_pipeline_rank
        if pp == 1 or args.num_layers % chunks:
            error(
                f"--num-virtual-stages-per-pipeline-rank ({args.num_virtual_stages_per_pipeline_rank}) needs "
                f"--pipeline-model-parallel-size > 1 and --num-layers ({args.num_layers}) divisible by "
                f"PP x it ({chunks})"
            )
        args.num_layers_per_virtual_pipeline_stage = args.num_layers // chunks
    if args.num_layers_per_virtual_pipeline_stage:
        layers_per_stage = args.num_layers // pp
        if pp == 1 or layers_per_stage % args.num_layers_per_virtual_pipeline_stage:
            error(
                f"--num-layers-per-virtual-pipeline-stage ({args.num_layers_per_virtual_pipeline_stage}) needs "
                f"--pipeline-model-parallel-size > 1 and must divide the {layers_per_stage} layers per stage"
            )
        vpp = layers_per_stage // args.num_layers_per_virtual_pipeline_stage
        args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None


def _parse_pipeline_layout(args, error) -> PipelineParallelLayerLayout:
    """--pipeline-model-parallel-layout, parsed and checked by megatron-core; MTP layers must sit with
    the loss (on the last stage)."""
    flag = f"--pipeline-model-parallel-layout {args.pipeline_model_parallel_layout}"
    try:
        layout = PipelineParallelLayerLayout(args.pipeline_model_parallel_layout, args.pipeline_model_parallel_size)
        mtp_apart = layout.validate_layer_layout(args.num_layers, args.mtp_num_layers)
    except (AssertionError, ValueError) as exc:
        error(
            f"{flag}: {exc} (--num-layers {args.num_layers}, --mtp-num-layers {args.mtp_num_layers or 0}, "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size})"
        )
    if mtp_apart:
        error(f"{flag}: the MTP layers (m) must be on the last pipeline stage, with the loss (L)")
    return layout


def _resolve_schedule_units(args, error):
    """--train-iters counts the run and its LR schedule in iterations, --train-samples in samples (as
    Megatron-LM: the schedule then advances by the global batch size each iteration). Fills
    args.train_iters and the schedule's warm-up / decay / WSD lengths in the chosen unit
    (args.lr_warmup_steps, args.lr_decay_steps, args.lr_wsd_decay_steps)."""
    unit = "samples" if args.train_samples is not None else "iters"
    other = "iters" if unit == "samples" else "samples"
    for name in ("lr_warmup", "lr_decay", "lr_wsd_decay"):
        if getattr(args, f"{name}_{other}") is not None:
            error(
                f"--{name.replace('_', '-')}-{other} does not go with --train-{unit}: "
                f"use --{name.replace('_', '-')}-{unit}"
            )
    if unit == "samples":
        if args.train_iters is not None:
            error("--train-iters and --train-samples are alternatives: give one")
        if args.lr_decay_style == "cosine-warm-restarts":
            error("--lr-decay-style cosine-warm-restarts counts iterations (--lr-restart-iters): use --train-iters")
        args.train_iters = args.train_samples // args.global_batch_size
        total = args.train_samples
    else:
        args.train_iters = 20 if args.train_iters is None else args.train_iters
        total = args.train_iters
    # --train-iters 0 (load, then save in another layout) still builds a schedule.
    args.lr_decay_steps = getattr(args, f"lr_decay_{unit}") or max(total, 1)
    args.lr_wsd_decay_steps = getattr(args, f"lr_wsd_decay_{unit}")
    warmup = getattr(args, f"lr_warmup_{unit}")
    if args.lr_warmup_fraction is not None:
        if warmup is not None:
            error(f"--lr-warmup-fraction and --lr-warmup-{unit} are alternatives: give one")
        warmup = int(args.lr_warmup_fraction * args.lr_decay_steps)
    args.lr_warmup_steps = warmup or 0
    if args.lr_warmup_steps and args.lr_warmup_steps >= args.lr_decay_steps:
        error(
            f"the warm-up ({args.lr_warmup_steps} {unit}) must be shorter than the decay "
            f"(--lr-decay-{unit} {args.lr_decay_steps}, default --train-{unit})"
        )
    if args.lr_decay_style == "cosine-warm-restarts" and not args.lr_restart_iters:
        error("--lr-decay-style cosine-warm-restarts needs --lr-restart-iters")
    if args.lr_decay_style == "WSD" and not args.lr_wsd_decay_steps:
        error(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit}")


def _parse_window(tokens, error) -> list[int]:
    """`--window-size 4096,0` (Megatron-LM) or `--window-size 4096 0` -> [4096, 0]."""
    try:
        window = [int(part) for part in ",".join(tokens).split(",")]
    except ValueError:
        window = []
    if len(window) != 2 or min(window) < 0:
        error(f"--window-size {' '.join(tokens)}: give LEFT,RIGHT, two numbers of tokens (e.g. 4096,0)")
    return window


def _parse_curriculum(args, error):
    """`256:0 2048:1000` -> [(0, 256), (1000, 2048)], checked against --seq-length and TP."""
    stages = []
    for entry in args.seq_length_curriculum:
        try:
            length, start = (int(part) for part in entry.split(":"))
        except ValueError:
            error(f"--seq-length-curriculum: {entry!r} is not LENGTH:FROM_ITER")
        if length <= 0 or args.seq_length % length:
            error(f"--seq-length-curriculum: {length} does not divide --seq-length ({args.seq_length})")
        if args.sequence_parallel and length % args.tensor_model_parallel_size:
            error(
                f"--seq-length-curriculum: {length} is not divisible by --tensor-model-parallel-size "
                f"({args.tensor_model_parallel_size}) as sequence parallelism needs"
            )
        stages.append((start, length))
    stages.sort()
    if stages[0][0] != 0:
        error("--seq-length-curriculum: the first stage must start at iteration 0")
    return stages


def current_seq_length(args, iteration: int) -> int:
    """The sequence length for (0-based) `iteration` under --seq-length-curriculum."""
    if not args.seq_length_curriculum:
        return args.seq_length
    return [length for start, length in args.seq_length_curriculum if start <= iteration][-1]


def _parse_blend(tokens, flag, error):
    """`--data-path a b` or `--data-path 0.4 a 0.6 b` -> (prefixes, weights or None), with every
    prefix's .bin/.idx checked."""
    if not tokens:
        error(f"{flag}: give indexed-dataset prefixes (from tools/preprocess_data.py)")
    try:
        weights = [float(t) for t in tokens[0::2]]
        prefixes = tokens[1::2]
        if len(weights) != len(prefixes):
            error(f"{flag}: weights and prefixes must alternate, got {' '.join(tokens)}")
    except ValueError:
        weights, prefixes = None, list(tokens)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                error(f"{flag}: {prefix}{suffix} does not exist")
    return prefixes, weights


def transformer_config_from_args(args, padded_vocab_size: int | None = None) -> TransformerConfig:
    """A TransformerConfig (MLATransformerConfig with --multi-latent-attention) from the flags:
    every flag that names a config field passes through."""
    config_cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = {}
    for name, value in vars(args).items():
        field = _CONFIG_RENAMES.get(name, name)
        if field in fields and value is not None:
            kwargs[field] = value
    kwargs.update(
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        bf16=args.bf16,
        window_size=tuple(args.window_size) if args.window_size else None,
        fp8=args.fp8_format,
        attention_backend=AttnBackend[args.attention_backend],
        # Interleaving as Megatron-LM sets it up: with PP=2 both pipeline neighbours are one rank,
        # and only the unbatched, rank-parity-ordered p2p path matches their messages correctly.
        overlap_p2p_comm=bool(args.virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not args.virtual_pipeline_model_parallel_size,
        # Initialise full weights on CPU and then shard them, so that every parallel layout starts
        # from the same model for the same seed (megatron-core's use_cpu_initialization).
        use_cpu_initialization=True,
        perform_initialization=True,
        # It needs the grad buffers of megatron-core's DDP wrapper: training.setup turns it on.
        gradient_accumulation_fusion=False,
    )
    if not args.multi_latent_attention:
        for mla_field in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            kwargs.pop(mla_field, None)
    else:
        # None means "no q compression" (DeepSeek-V2-Lite); dropped with the other None flags above,
        # MLATransformerConfig would fall back to its default rank of 512.
        kwargs["q_lora_rank"] = args.q_lora_rank
        if args.original_max_position_embeddings is None:
            kwargs["original_max_position_embeddings"] = args.max_position_embeddings
    if args.num_experts is None:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("moe_")}
    if not args.mtp_num_layers:  # megatron-core runs MTP for any value but None, 0 included
        kwargs.pop("mtp_num_layers", None)
    return config_cls(**kwargs)
