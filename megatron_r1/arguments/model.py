"""Model flags: the transformer's shape, multi-latent attention, mixture of experts and the layer
implementation (TransformerEngine, FP8, fused kernels).

Derived values, written by :func:`validate` only: ``num_query_groups`` (with grouped-query attention),
``transformer_impl`` (when not given), ``window_size`` (parsed), and ``max_position_embeddings``,
``ffn_hidden_size``, ``kv_channels`` (TransformerConfig's defaults, resolved)."""

import argparse

import torch
from megatron.core.transformer.enums import AttnBackend

from megatron_r1 import compat
from megatron_r1.megatron_lm_flags import missing_for_kernel


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "model", "multi-latent attention" and "mixture of experts" groups (--help lists them in
    that order; the implementation flags are the model group's last)."""
    model = parser.add_argument_group("model")
    _add_shape_arguments(model)
    _add_mla_arguments(parser.add_argument_group("multi-latent attention"))
    moe = parser.add_argument_group("mixture of experts")
    _add_moe_router_arguments(moe)
    _add_moe_dispatch_arguments(moe)
    _add_implementation_arguments(model)
    _add_fusion_arguments(model)


def _add_shape_arguments(group) -> None:
    """Layers, widths, attention heads, positions, dropout, vocabulary."""
    group.add_argument("--num-layers", type=int, default=2)
    group.add_argument("--hidden-size", type=int, default=128)
    group.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden")
    group.add_argument("--num-attention-heads", type=int, default=4)
    group.add_argument("--group-query-attention", action="store_true")
    group.add_argument("--num-query-groups", type=int, default=None)
    group.add_argument("--kv-channels", type=int, default=None)
    group.add_argument("--seq-length", type=int, default=128)
    group.add_argument("--max-position-embeddings", type=int, default=None)
    group.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    group.add_argument("--norm-epsilon", type=float, default=1e-6)
    group.add_argument("--swiglu", action="store_true", help="SwiGLU MLPs (gated SiLU)")
    group.add_argument(
        "--qk-layernorm",
        action="store_true",
        help="RMS/LayerNorm on queries and keys (MLA: on the compressed q and kv, as DeepSeek-V3)",
    )
    group.add_argument("--disable-bias-linear", action="store_true")
    group.add_argument("--position-embedding-type", choices=["rope", "learned_absolute", "none"], default="rope")
    group.add_argument(
        "--use-rotary-position-embeddings",
        dest="position_embedding_type",
        action="store_const",
        const="rope",
        help="Megatron-LM's older spelling of --position-embedding-type rope",
    )
    group.add_argument(
        "--no-position-embedding",
        action="store_true",
        help="Megatron-LM's older switch, accepted with RoPE (which adds no position embedding)",
    )
    group.add_argument("--rotary-base", type=int, default=10000)
    group.add_argument(
        "--use-rope-scaling",
        action="store_true",
        help="Llama 3.1's RoPE frequency scaling (megatron-core's: low/high frequency factors 1 and 4 over an "
        "original 8192 positions); GQA/MHA models (MLA scales RoPE with --rope-type yarn)",
    )
    group.add_argument("--rope-scaling-factor", type=float, default=8.0, help="--use-rope-scaling's factor")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument(
        "--window-size",
        nargs="+",
        default=None,
        metavar="LEFT,RIGHT",
        help="sliding-window attention; LEFT,0 for causal models (LEFT RIGHT also accepted)",
    )
    group.add_argument(
        "--window-attn-skip-freq",
        type=_int_or_list,
        default=None,
        help="with --window-size, which layers keep full attention: N, every Nth layer; or a "
        "list of 0/1 per layer, 1 for a sliding-window layer (e.g. '([1]*3+[0]*1)*2')",
    )
    group.add_argument("--hidden-dropout", type=float, default=0.0)
    group.add_argument("--attention-dropout", type=float, default=0.0)
    group.add_argument("--init-method-std", type=float, default=0.02)
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    group.add_argument(
        "--padded-vocab-size",
        type=int,
        default=None,
        help="rows of the embedding and output layer (default: the vocabulary rounded up to a "
        "multiple of --make-vocab-size-divisible-by x --tensor-model-parallel-size)",
    )


def _add_mla_arguments(group) -> None:
    """Multi-latent attention (DeepSeek-V2/V3) and its YaRN RoPE scaling."""
    group.add_argument("--multi-latent-attention", action="store_true")
    group.add_argument("--q-lora-rank", type=int, default=None, help="None: no q compression")
    group.add_argument("--kv-lora-rank", type=int, default=32)
    group.add_argument("--qk-head-dim", type=int, default=32)
    group.add_argument("--qk-pos-emb-head-dim", type=int, default=16)
    group.add_argument("--v-head-dim", type=int, default=32)
    group.add_argument("--rope-type", choices=["rope", "yarn"], default="rope")
    group.add_argument("--rotary-scaling-factor", type=float, default=1.0)
    group.add_argument("--original-max-position-embeddings", type=int, default=None)
    # floats: a saved value is checked against the default's type
    group.add_argument("--beta-fast", type=float, default=32.0)
    group.add_argument("--beta-slow", type=float, default=1.0)
    group.add_argument("--mscale", type=float, default=1.0)
    group.add_argument("--mscale-all-dim", type=float, default=0.0)


def _add_moe_router_arguments(group) -> None:
    """The experts, the router and its load balancing."""
    group.add_argument("--num-experts", type=int, default=None)
    group.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    group.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    group.add_argument(
        "--moe-layer-freq",
        type=_int_or_list,
        default=1,
        help='int, or a 0/1 pattern such as "[0]*1+[1]*3" (first layer dense)',
    )
    group.add_argument("--moe-router-topk", type=int, default=2)
    group.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    group.add_argument("--moe-router-pre-softmax", action="store_true")
    group.add_argument("--moe-router-num-groups", type=int, default=None)
    group.add_argument("--moe-router-group-topk", type=int, default=None)
    group.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    group.add_argument(
        "--moe-router-load-balancing-type",
        default="aux_loss",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"],
    )
    group.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    group.add_argument("--moe-z-loss-coeff", type=float, default=None)
    group.add_argument(
        "--moe-router-enable-expert-bias", action="store_true", help="aux-loss-free load balancing (DeepSeek-V3)"
    )
    group.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    group.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None)


def _add_moe_dispatch_arguments(group) -> None:
    """Token dispatch, expert capacity, MoE kernels and logging; multi-token prediction."""
    group.add_argument(
        "--moe-token-dispatcher-type",
        choices=["allgather", "alltoall", "flex"],
        default="allgather",
        help="flex: DeepEP/HybridEP kernels (CUDA; without it, alltoall)",
    )
    group.add_argument("--moe-flex-dispatcher-backend", choices=["deepep", "hybridep"], default="deepep")
    group.add_argument("--moe-deepep-num-sms", type=int, default=20, help="streaming multiprocessors DeepEP may use")
    group.add_argument(
        "--moe-hybridep-num-sms", type=int, default=16, help="streaming multiprocessors HybridEP may use"
    )
    group.add_argument("--moe-expert-capacity-factor", type=float, default=None, help="None: dropless")
    group.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    group.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs")
    group.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="each linear of all local experts as one grouped GEMM: TransformerEngine's TEGroupedMLP "
        "with --transformer-impl transformer_engine, else torch's grouped_mm (megatron_r1.experts; "
        "same checkpoints as without the flag)",
    )
    group.add_argument(
        "--moe-permute-fusion",
        action="store_true",
        help="fused token permutation (TransformerEngine on CUDA; without it, the plain path)",
    )
    group.add_argument(
        "--moe-router-fusion",
        action="store_true",
        help="fused top-k routing and aux loss (TransformerEngine on CUDA; without it, the plain path)",
    )
    group.add_argument(
        "--moe-shared-expert-overlap",
        action="store_true",
        help="run the shared experts beside the alltoall dispatch (CUDA streams; without them, in turn)",
    )
    group.add_argument(
        "--moe-router-force-load-balancing",
        action="store_true",
        help="benchmarking only: random router scores, so every expert gets its share of tokens",
    )
    group.add_argument(
        "--moe-per-layer-logging",
        action="store_true",
        help="the load-balancing and z losses of every MoE layer in TensorBoard",
    )
    group.add_argument("--mtp-num-layers", type=int, default=None)
    group.add_argument("--mtp-loss-scaling-factor", type=float, default=0.1)


def _add_implementation_arguments(group) -> None:
    """The layer implementation, FP8, the attention backend and the fused cross entropy."""
    group.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default=None,
        help="layer implementation; default: transformer_engine when it is installed and CUDA "
        "is available, else local (megatron-core modules + megatron_r1.layers)",
    )
    group.add_argument(
        "--enable-experimental",
        action="store_true",
        help="megatron-core's experimental features (megatron.core.config.set_experimental_flag)",
    )
    group.add_argument(
        "--fp8-format", choices=["e4m3", "hybrid"], default=None, help="FP8 training through TransformerEngine"
    )
    group.add_argument(
        "--fp8-recipe",
        choices=["delayed", "tensorwise", "mxfp8", "blockwise"],
        default="delayed",
        help="with --fp8-format: TransformerEngine's scaling recipe",
    )
    group.add_argument("--fp8-amax-history-len", type=int, default=1, help="with --fp8-recipe delayed")
    group.add_argument(
        "--fp8-amax-compute-algo",
        choices=["most_recent", "max"],
        default="most_recent",
        help="with --fp8-recipe delayed",
    )
    group.add_argument(
        "--attention-backend",
        choices=[backend.name for backend in AttnBackend],
        default="auto",
        help="TransformerEngine's attention kernel (megatron-core sets NVTE_*_ATTN); the local "
        "implementation always uses torch's scaled_dot_product_attention",
    )
    group.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="fused vocab-parallel cross entropy (native: megatron-core's, compiled on CUDA, run as written on CPU)",
    )
    group.add_argument(
        "--cross-entropy-fusion-impl",
        choices=["native", "te"],
        default="native",
        help="with --cross-entropy-loss-fusion: megatron-core's or TransformerEngine's kernel (without "
        "CUDA and TransformerEngine, native)",
    )


def _add_fusion_arguments(group) -> None:
    """megatron-core's fused elementwise kernels, on by default as in Megatron-LM (its flags turn
    them off). The bias-activation and bias-dropout-add fusions are PyTorch functions that
    megatron-core compiles with torch.compile on CUDA; on CPU, where compiling is off, the same
    functions run uncompiled."""
    group.add_argument(
        "--no-bias-swiglu-fusion",
        dest="bias_swiglu_fusion",
        action="store_false",
        help="unfused SwiGLU (the fused one also keeps only its input for the backward pass)",
    )
    group.add_argument(
        "--no-bias-gelu-fusion",
        dest="bias_gelu_fusion",
        action="store_false",
        help="unfused bias + GELU (the fusion applies to dense GELU MLPs with biases)",
    )
    group.add_argument(
        "--no-bias-dropout-fusion",
        dest="bias_dropout_fusion",
        action="store_false",
        help="unfused bias + dropout + residual add",
    )
    group.add_argument(
        "--no-rope-fusion",
        dest="apply_rope_fusion",
        action="store_false",
        help="unfused rotary embeddings; the fused kernels train only, where megatron-core has one: "
        "MLA with --rope-type yarn on CUDA (its Triton kernel), other RoPE with TransformerEngine",
    )


def validate(args, error) -> None:
    """The model flags against each other and the tensor-parallel size (the expert-parallel layout is
    parallelism's), and the only place the model's derived values are written."""
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        error(
            f"--num-attention-heads ({args.num_attention_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    args.num_query_groups = _query_groups(args, error)
    _check_moe(args, error)
    if args.multi_latent_attention and tp > 1 and not args.sequence_parallel:
        error("--multi-latent-attention with --tensor-model-parallel-size > 1 requires --sequence-parallel")
    args.transformer_impl = _implementation(args, error)
    _check_implementation_features(args, error)
    args.window_size = None if args.window_size is None else _parse_window(args.window_size, error)
    _check_positions(args, error)
    args.max_position_embeddings, args.ffn_hidden_size, args.kv_channels = _default_sizes(args)
    for flag in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, flag) < 1.0:
            error(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must be in [0, 1)")
    if args.padded_vocab_size is not None and args.padded_vocab_size % tp:
        error(f"--padded-vocab-size ({args.padded_vocab_size}) is not divisible by --tensor-model-parallel-size ({tp})")


def _query_groups(args, error) -> int | None:
    """num_query_groups: the attention heads' count under --group-query-attention without
    --num-query-groups; as given otherwise."""
    if not (args.group_query_attention or args.num_query_groups):
        return args.num_query_groups
    groups = args.num_query_groups or args.num_attention_heads
    if groups % args.tensor_model_parallel_size:
        error(
            f"--num-query-groups ({groups}) is not divisible by "
            f"--tensor-model-parallel-size ({args.tensor_model_parallel_size})"
        )
    return groups


def _check_moe(args, error) -> None:
    if isinstance(args.moe_layer_freq, list) and len(args.moe_layer_freq) != args.num_layers:
        error(f"--moe-layer-freq pattern has {len(args.moe_layer_freq)} entries, --num-layers is {args.num_layers}")
    if not args.num_experts:
        return
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        error("MoE with --tensor-model-parallel-size > 1 requires --sequence-parallel")
    if not args.disable_bias_linear:
        # megatron-core 0.16's expert MLP adds its bias in place on an autograd view.
        error("--num-experts requires --disable-bias-linear (expert biases are not supported)")


def _implementation(args, error) -> str:
    """transformer_impl: as given, else transformer_engine where TransformerEngine and CUDA are
    there, else local."""
    te_usable = compat.transformer_engine_installed() and torch.cuda.is_available()
    impl = args.transformer_impl or ("transformer_engine" if te_usable else "local")
    if impl == "transformer_engine" and not te_usable:
        error("--transformer-impl transformer_engine needs CUDA and TransformerEngine (pip install -e .[gpu])")
    return impl


def _check_implementation_features(args, error) -> None:
    """What needs --transformer-impl transformer_engine."""
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
    _check_cross_entropy_fusion(args, error)


def _check_cross_entropy_fusion(args, error) -> None:
    # megatron-core 0.16.1's native kernel (the one that runs unless --cross-entropy-fusion-impl te
    # and TransformerEngine's kernel can run here) returns the logits' gradient in bf16.
    te_flag = "--cross-entropy-fusion-impl te"
    te_kernel = args.cross_entropy_fusion_impl == "te" and missing_for_kernel(te_flag, args) is None
    if args.cross_entropy_loss_fusion and not te_kernel and not args.bf16:
        error("--cross-entropy-loss-fusion (native) rounds the logits' gradient to bf16: use it with --bf16")


def _parse_window(tokens, error) -> list[int]:
    """`--window-size 4096,0` (Megatron-LM) or `--window-size 4096 0` -> [4096, 0]."""
    try:
        window = [int(part) for part in ",".join(tokens).split(",")]
    except ValueError:
        window = []
    if len(window) != 2 or min(window) < 0:
        error(f"--window-size {' '.join(tokens)}: give LEFT,RIGHT, two numbers of tokens (e.g. 4096,0)")
    return window


def _check_positions(args, error) -> None:
    """Sliding-window layers and position embeddings (after --window-size is parsed)."""
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
    if args.mtp_num_layers and args.position_embedding_type == "learned_absolute":
        error("--mtp-num-layers needs --position-embedding-type rope")
    if args.use_rope_scaling and (args.multi_latent_attention or args.position_embedding_type != "rope"):
        error(
            "--use-rope-scaling scales RoPE of GQA/MHA models (--position-embedding-type rope); MLA's: --rope-type yarn"
        )


def _default_sizes(args) -> tuple[int, int, int]:
    """max_position_embeddings, ffn_hidden_size and kv_channels: TransformerConfig's defaults,
    resolved here so that a checkpoint's saved shape compares equal whether a size was given
    explicitly or by default."""
    return (
        args.max_position_embeddings or args.seq_length,
        args.ffn_hidden_size or 4 * args.hidden_size,
        args.kv_channels or args.hidden_size // args.num_attention_heads,
    )
