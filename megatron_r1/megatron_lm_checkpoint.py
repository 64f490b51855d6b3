"""A Megatron-LM torch_dist checkpoint of a GPT / MoE model -> ours (tools/convert_checkpoint.py
--direction mlm2mcore), from which pretrain_r1.py continues (with Megatron-LM's Adam moments where they
convert, else --no-load-optim) or fine-tunes (--finetune).

Megatron-LM (megatron/training/checkpointing.py, --ckpt-format torch_dist) saves with megatron-core's
dist_checkpointing, in the layout ours has:

    <save>/latest_checkpointed_iteration.txt   the iteration, or "release" (then <save>/release/)
    <save>/iter_0000100/common.pt              the non-sharded state: ``args`` (its argparse.Namespace),
                                               ``checkpoint_version``, ``iteration``, ``opt_param_scheduler``
                                               (counted in samples), ``num_floating_point_operations_so_far``
    <save>/iter_0000100/.metadata, *.distcp    the sharded state: the model (under "model", or "model0",
                                               "model1", ... per virtual pipeline stage), "optimizer",
                                               "rng_state" (a ShardedObject per pipeline/tensor rank)

Its model is megatron-core's GPTModel, as ours, so the weights keep the same checkpoint keys except:

- a model whose layers are all alike is saved *stacked* (Megatron-LM leaves megatron-core's
  ``non_homogeneous_layers`` off): one ``decoder.layers.<name>`` tensor with a leading layer axis
  (and expert axis), where ours keeps one key per layer; both are read through megatron-core;
- TransformerEngine's layers (``--transformer-impl transformer_engine``, Megatron-LM's default, and
  the only one its 0.16 builds MLA with) fuse some norms into the next linear layer and name them
  after it, where the local spec's keys differ (read under either name:
  :func:`~megatron_r1.sharded_tensors.other_implementation_key`).

Its args become our model flags, validated as if given on the command line; a setting our model
cannot represent is refused naming Megatron-LM's flag. Nothing in the checkpoint is unpickled before
every pickle in it passed :func:`~megatron_r1.checkpointing.refuse_executable_pickles` (common.pt may
hold the Namespace and megatron-core's enums, nothing that runs code).

Carried over: the weights (as saved, upcast to fp32), the iteration, the consumed samples, the LR
schedule (converted from samples to iterations unless the run counted samples) and Adam's state where
Megatron-LM saved it per parameter (megatron-core's model space: each parameter's
``optimizer.state.exp_avg.<key>``, ``exp_avg_sq`` and, of a distributed or mixed-precision optimizer,
its fp32 main weight ``param`` / ``fp32_param``; the step and param groups in common.pt). That is its
plain optimizer's state (without --use-distributed-optimizer) and its distributed optimizer's saved
with --dist-ckpt-optim-fully-reshardable. Its distributed optimizer's default format, dp_reshardable
(each DP rank's part of its buffers, bound to its layout), is not converted: the weights are, and the
summary says why the moments are not and which flag makes them convertible. Not the RNG states.

The moments are written as pretrain_r1.py's optimizer for the printed flags (megatron-core's, built on
the meta device: its param groups, chained parts and keys; Adam's settings and step Megatron-LM's)
saves them, in model space, which our loader reads under any TP/PP/EP/DP layout with the same optimizer
parts (not with --use-distributed-optimizer or --bf16, whose optimizers keep other state). With the
moments, the weights are read from Megatron-LM's fp32 main weights where it kept them (a bf16 run's):
ours, in fp32, are the main weights, and the run continues exactly.

Memory is bounded, whatever the model's size, as in the Hugging Face import (megatron_r1.hf.import_):
the model is built on the meta device (no memory) only for its sharded state dicts, under our
per-layer keys (what is written) and under Megatron-LM's key style (where each piece is read from).
The weights and moments (a tensor of one layer, a slice of Megatron-LM's stacked tensor; or one
expert's) are read a part at a time, consecutive ones of at most `max_part_bytes` together in fp32, only the saved
chunks their slices overlap (Megatron-LM saves a stacked tensor in chunks of one layer, and of one
expert), and each part is written before the next is read (megatron_r1.hf.storage's
TorchDistPartsWriter). Peak memory: about one part (one weight, where one is larger), above the
process' baseline.
"""

import argparse
import dataclasses
import os
import re

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.transformer.transformer_config import MLATransformerConfig
from tqdm import tqdm

from megatron_r1.arguments import build_parser, transformer_config_from_args, validate_args
from megatron_r1.checkpointing import (
    TRACKER_FILE,
    CheckpointError,
    checkpoint_dir,
    optimizer_kind,
    optimizer_parts,
    optimizer_sharded_state_dict,
    publish_weights_checkpoint,
    read_common_state,
    saved_tensor_shapes,
    temporary_checkpoint,
)
from megatron_r1.hf.storage import McoreCheckpointReader, TorchDistPartsWriter
from megatron_r1.megatron_lm_flags import DEFAULT_ONLY, UNSUPPORTED, parse_known_flags
from megatron_r1.optim import build_optimizer
from megatron_r1.sharded_tensors import meta_model, model_layout, model_sharded_state_dict, other_implementation_key
from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES

_off = lambda value: not value
_unset = lambda value: value is None
_one = lambda value: not isinstance(value, (list, tuple)) or len(value) <= 1
_ACTIVATIONS = "the MLP activation is GeLU, or SwiGLU with --swiglu"
_ATTENTION = "only softmax attention (MHA/GQA, MLA) is built here"
# Megatron-LM settings of models megatron-r1 does not build: (its args' attribute names, newest first;
# its flag; whether a value is representable; why not).
_UNREPRESENTABLE = (
    (("use_legacy_models",), "--use-legacy-models", _off, "legacy (pre-megatron-core) models have other modules"),
    (("spec",), "--spec", _unset, "a custom layer spec; megatron-core's GPT specs (local, TransformerEngine) map here"),
    (("heterogeneous_layers_config_path",), "--heterogeneous-layers-config-path", _unset, "heterogeneous layers are not built here"),
    (("heterogeneous_layers_config_encoded_json",), "--heterogeneous-layers-config-encoded-json", _unset, "heterogeneous layers are not built here"),
    (("is_hybrid_model",), "--is-hybrid-model", _off, "hybrid Mamba models are not built here"),
    (("hybrid_override_pattern",), "--hybrid-override-pattern", _unset, "hybrid Mamba models are not built here"),
    (("experimental_attention_variant",), "--experimental-attention-variant", _unset, _ATTENTION),
    (("linear_attention_freq",), "--linear-attention-freq", _unset, _ATTENTION),
    (("transformer_impl",), "--transformer-impl", lambda v: v in (None, "local", "transformer_engine"), "the local and TransformerEngine layers map here"),
    (("normalization",), "--normalization", lambda v: v in (None, "RMSNorm", "LayerNorm"), "RMSNorm or LayerNorm only"),
    (("layernorm_zero_centered_gamma", "apply_layernorm_1p"), "--apply-layernorm-1p", _off, UNSUPPORTED["--apply-layernorm-1p"]),
    (("position_embedding_type",), "--position-embedding-type", lambda v: v in (None, "rope", "learned_absolute", "none"), "rope, learned_absolute or none only"),
    (("rotary_percent",), "--rotary-percent", lambda v: v in (None, 1.0), DEFAULT_ONLY["--rotary-percent"][2]),
    (("rotary_seq_len_interpolation_factor",), "--rotary-seq-len-interpolation-factor", lambda v: v in (None, 1.0), DEFAULT_ONLY["--rotary-seq-len-interpolation-factor"][2]),
    (("rotary_interleaved",), "--rotary-interleaved", _off, "interleaved RoPE channels are not supported"),
    (("no_rope_freq",), "--no-rope-freq", _unset, "layers without RoPE are not supported"),
    (("squared_relu",), "--squared-relu", _off, _ACTIVATIONS),
    (("quick_geglu",), "--quick-geglu", _off, _ACTIVATIONS),
    (("openai_gelu",), "--openai-gelu", _off, _ACTIVATIONS),
    (("glu_linear_offset",), "--glu-linear-offset", lambda v: not v, _ACTIVATIONS),
    (("activation_func_clamp_value",), "--activation-func-clamp-value", _unset, _ACTIVATIONS),
    (("qk_l2_norm",), "--qk-l2-norm", _off, "L2-normalised queries and keys are not supported (--qk-layernorm is)"),
    (("softmax_type",), "--softmax-type", lambda v: v in (None, "vanilla"), "only the vanilla attention softmax"),
    (("attention_output_gate",), "--attention-output-gate", _off, "gated attention output is not supported"),
    (("apply_residual_connection_post_layernorm",), "--apply-residual-connection-post-layernorm", _off, "residuals are taken before the norms here"),
    (("use_mup",), "--use-mup", _off, "muP scaling is not supported"),
    (("moe_latent_size",), "--moe-latent-size", _unset, "MoE latent projections are not supported"),
    (("moe_router_topk_limited_devices",), "--moe-router-topk-limited-devices", _unset, "device-limited routing is not supported (group-limited routing is: --moe-router-num-groups)"),
    (("moe_router_score_function",), "--moe-router-score-function", lambda v: v in (None, "softmax", "sigmoid"), "softmax or sigmoid router scores only"),
    (("moe_apply_probs_on_input",), "--moe-apply-probs-on-input", _off, "the routing probabilities scale the experts' outputs here"),
    (("moe_shared_expert_gate",), "--moe-shared-expert-gate", _off, "gated shared experts are not supported"),
    (("mtp_use_repeated_layer",), "--mtp-use-repeated-layer", _off, "each MTP layer has its own weights here"),
    (("moe_router_load_balancing_type",), "--moe-router-load-balancing-type", _one, "one load-balancing loss at a time"),
    (("moe_aux_loss_coeff",), "--moe-aux-loss-coeff", _one, "one load-balancing loss at a time"),
)  # fmt: skip

# Our flag <- Megatron-LM's args attribute (older names after it), values passed as they are (None: left out).
_VALUE_FLAGS = (
    ("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"), ("--ffn-hidden-size", "ffn_hidden_size"),
    ("--num-attention-heads", "num_attention_heads"), ("--kv-channels", "kv_channels"),
    ("--seq-length", "seq_length"), ("--max-position-embeddings", "max_position_embeddings"),
    ("--normalization", "normalization"), ("--norm-epsilon", "layernorm_epsilon", "norm_epsilon"),
    ("--rotary-base", "rotary_base"), ("--init-method-std", "init_method_std"),
    ("--make-vocab-size-divisible-by", "make_vocab_size_divisible_by"),
    ("--hidden-dropout", "hidden_dropout"), ("--attention-dropout", "attention_dropout"),
    ("--mtp-num-layers", "mtp_num_layers"), ("--mtp-loss-scaling-factor", "mtp_loss_scaling_factor"),
    ("--window-attn-skip-freq", "window_attn_skip_freq"), ("--rope-scaling-factor", "rope_scaling_factor"),
)  # fmt: skip
_SWITCHES = (
    ("--swiglu", "swiglu"), ("--qk-layernorm", "qk_layernorm"), ("--use-rope-scaling", "use_rope_scaling"),
    ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights"),
)  # fmt: skip
# Megatron-LM 0.16 has flags for these MLA fields; the YaRN ones it leaves at MLATransformerConfig's defaults.
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
               "rotary_scaling_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
               "original_max_position_embeddings")  # fmt: skip
_MOE_FIELDS = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
               "moe_router_score_function", "moe_router_num_groups", "moe_router_group_topk",
               "moe_router_topk_scaling_factor", "moe_router_dtype", "moe_layer_freq")  # fmt: skip
# How MoE models train (a continued run should go on the same way): Megatron-LM saves a single loss
# type / coefficient as a one-element list.
_MOE_TRAINING_FIELDS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                        "moe_router_bias_update_rate", "moe_expert_capacity_factor", "moe_token_drop_policy")  # fmt: skip
_MOE_SWITCHES = ("moe_router_pre_softmax", "moe_router_enable_expert_bias", "moe_pad_expert_input_to_capacity")
# Megatron-LM's tokenizers that tokenize as ours of the same name do (its SentencePieceTokenizer adds
# BERT-style ids, which ours does not).
_SAME_TOKENIZERS = ("GPTSentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer", "NullTokenizer")
_MLA_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MLATransformerConfig)}


def _value(ckpt_args, *names):
    """The first of `names` that Megatron-LM's args have (names change between its versions), else None."""
    for name in names:
        if hasattr(ckpt_args, name):
            return getattr(ckpt_args, name)
    return None


def _flag_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def unrepresentable_settings(ckpt_args) -> list[str]:
    """Megatron-LM's flags in `ckpt_args` whose models ours cannot represent, each with its value and why."""
    refused = []
    for names, flag, representable, reason in _UNREPRESENTABLE:
        value = _value(ckpt_args, *names)
        if not representable(value):
            refused.append(f"{flag} {_flag_value(value)}: {reason}" if value is not True else f"{flag}: {reason}")
    if _value(ckpt_args, "add_qkv_bias") and _value(ckpt_args, "add_bias_linear") is False:
        refused.append("--add-qkv-bias: a bias on the QKV projection alone is not supported")
    return refused


def model_flags(ckpt_args, padded_vocab_size: int) -> list[str]:
    """Our model flags for the model Megatron-LM's `ckpt_args` describe (call
    :func:`unrepresentable_settings` first); `padded_vocab_size`: its embedding's rows."""
    flags = []
    for flag, *names in _VALUE_FLAGS:
        if (value := _value(ckpt_args, *names)) is not None:
            flags += [flag, _flag_value(value)]
    flags += [flag for flag, name in _SWITCHES if _value(ckpt_args, name)]
    if _value(ckpt_args, "add_bias_linear") is False or _value(ckpt_args, "disable_bias_linear"):
        flags.append("--disable-bias-linear")
    position = "rope" if _value(ckpt_args, "use_rotary_position_embeddings") else None
    flags += [
        "--position-embedding-type",
        position or _value(ckpt_args, "position_embedding_type") or "learned_absolute",
    ]
    if (window := _value(ckpt_args, "window_size")) is not None:
        flags += ["--window-size", ",".join(str(int(side)) for side in window)]
    if _value(ckpt_args, "multi_latent_attention"):
        flags += [
            "--multi-latent-attention",
            "--rope-type",
            _value(ckpt_args, "rope_type") or _MLA_DEFAULTS["rope_type"],
        ]
        for name in _MLA_FIELDS:
            value = _value(ckpt_args, name) if hasattr(ckpt_args, name) else _MLA_DEFAULTS[name]
            if value is not None:
                flags += [f"--{name.replace('_', '-')}", _flag_value(value)]
    elif _value(ckpt_args, "group_query_attention"):
        flags += ["--group-query-attention", "--num-query-groups", str(_value(ckpt_args, "num_query_groups"))]
    if _value(ckpt_args, "num_experts"):
        flags += ["--num-experts", str(_value(ckpt_args, "num_experts"))]
        for name in _MOE_FIELDS + _MOE_TRAINING_FIELDS:
            value = _value(ckpt_args, name)
            value = value[0] if name in _MOE_TRAINING_FIELDS and isinstance(value, (list, tuple)) and value else value
            if value is not None:
                flags += [f"--{name.replace('_', '-')}", _flag_value(value)]
        flags += [f"--{name.replace('_', '-')}" for name in _MOE_SWITCHES if _value(ckpt_args, name)]
    return flags + ["--padded-vocab-size", str(padded_vocab_size), "--transformer-impl", "local"]


def tokenizer_settings(ckpt_args) -> tuple[str | None, str | None, int | None]:
    """(tokenizer type, tokenizer model, vocabulary size) of ours for Megatron-LM's tokenizer; Nones
    where ours tokenizes differently (the weights convert all the same: give the tokenizer when training)."""
    kind = _value(ckpt_args, "tokenizer_type")
    if kind not in _SAME_TOKENIZERS:
        return None, None, None
    if kind == "NullTokenizer":  # Megatron-LM's ends documents with an extra id after its --vocab-size ones
        vocab_size = _value(ckpt_args, "vocab_size")
        return (kind, None, vocab_size + 1) if isinstance(vocab_size, int) else (None, None, None)
    return kind, _value(ckpt_args, "tokenizer_model"), _value(ckpt_args, "vocab_size")


def model_args_from_megatron_lm(ckpt_args, padded_vocab_size: int, source: str):
    """``(args, flags)``: our parsed and validated flags (one process) for Megatron-LM's `ckpt_args`,
    read from `source`; CheckpointError naming every Megatron-LM flag ours cannot represent."""
    if not isinstance(ckpt_args, argparse.Namespace):
        raise CheckpointError(f"{source}: its 'args' is a {type(ckpt_args).__name__}, not Megatron-LM's arguments")
    refused = unrepresentable_settings(ckpt_args)
    if refused:
        raise CheckpointError(f"{source}: Megatron-LM settings megatron-r1 cannot represent: " + "; ".join(refused))
    flags = model_flags(ckpt_args, padded_vocab_size)

    def refuse(message):  # argparse's and validate_args' errors, which would exit
        raise CheckpointError(f"{source}: its model, as our flags {' '.join(flags)}, is refused: {message}")

    parser = build_parser("")
    parser.error = refuse
    args = parse_known_flags(parser, flags + ["--mock-data", "--vocab-size", str(padded_vocab_size)])
    validate_args(args, refuse)
    try:
        transformer_config_from_args(args)
    except (ValueError, AssertionError) as error:  # megatron-core's own checks of the shapes
        refuse(f"megatron-core: {error}")
    args.tokenizer_type, args.tokenizer_model, args.vocab_size = tokenizer_settings(ckpt_args)
    return args, flags


# How the layers' keys are laid out: ours (one key per layer), or stacked along a layer axis.
_KEY_STYLES = (("per-layer", {"non_homogeneous_layers": True}), ("stacked", {"singleton_local_shards": False}))


def _sharded_tensors(name: str, item) -> list:
    """The ShardedTensors of a state-dict entry's sharded form, megatron-core's factory applied if it
    has one (e.g. SwiGLU's fc1 -> its gate and up halves)."""
    sharded = {name: item}
    apply_factories(sharded)
    return [value for value in nested_values(sharded) if isinstance(value, ShardedTensor)]


def _requested_weights(model, saved: dict) -> tuple[str, dict, int, list[str]]:
    """(key style, weights, TransformerEngine names used, missing keys) of the key style under which
    `saved` (checkpoint key -> shape) holds every weight of `model`, else of the closest one. `weights`:
    state-dict name -> its pieces as pairs (ours, under our per-layer keys; the ShardedTensor without
    data that reads it from the Megatron-LM checkpoint), paired in order: a state-dict entry has the
    same pieces under either key style."""
    ours = {
        name: _sharded_tensors(name, item)
        for name, item in model_sharded_state_dict(model).items()
        if not isinstance(item, ShardedObject)
    }
    best = None
    for style, metadata in _KEY_STYLES:
        theirs = model.sharded_state_dict(metadata=metadata)
        weights, renamed, missing = {}, 0, set()
        for name, pieces in ours.items():
            requests = [request.without_data() for request in _sharded_tensors(name, theirs[name])]
            for request in requests:
                if request.key not in saved and (alias := other_implementation_key(request.key, saved)):
                    request.key, renamed = alias, renamed + 1
                elif request.key not in saved:
                    missing.add(request.key)
            weights[name] = list(zip(pieces, requests, strict=True))
        if best is None or len(missing) < len(best[3]):
            best = (style, weights, renamed, sorted(missing))
    return best


def _parts(weights: dict, max_part_bytes: int):
    """``(pieces with their requests, their bytes in fp32)`` of consecutive whole weights (a tensor of
    one layer, or one expert's) of at most `max_part_bytes` together (a larger weight alone): what one
    read fetches and one part holds. One read per part, not per weight: each read unpickles the
    checkpoint's metadata anew (megatron-core's load), which grows with the checkpoint."""
    part, part_bytes = [], 0
    for pairs in weights.values():
        weight_bytes = sum(piece.data.nbytes for piece, _ in pairs)  # of the meta device's (fp32) data
        if part and part_bytes + weight_bytes > max_part_bytes:
            yield part, part_bytes
            part, part_bytes = [], 0
        part += pairs
        part_bytes += weight_bytes
    if part:
        yield part, part_bytes


def _write_part(writer, reader, part: list) -> None:
    """Read the part's pieces from the Megatron-LM checkpoint (only their slices, in our pieces' fp32)
    and write them as one part. A function of its own so that nothing read outlives it."""
    read = reader.read_slices({str(i): request for i, (_, request) in enumerate(part)})
    for i, (piece, _) in enumerate(part):
        writer.add(dataclasses.replace(piece, data=read[str(i)]))
    writer.flush()


def megatron_lm_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """The checkpoint directory of a Megatron-LM --save root (its tracker's iteration, or `iteration`),
    or `path` itself when it is one; CheckpointError unless it is torch_dist (common.pt)."""
    tracker = os.path.join(path, TRACKER_FILE)
    if iteration is not None:
        path = checkpoint_dir(path, iteration)
    elif os.path.isfile(tracker):
        with open(tracker, "rb") as f:
            text = f.read(64).decode("utf-8", errors="replace").strip()
        if not (text == "release" or re.fullmatch(r"[0-9]+", text)):
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        path = os.path.join(path, "release") if text == "release" else checkpoint_dir(path, int(text))
    if os.path.isdir(os.path.join(path, "mp_rank_00")):
        raise CheckpointError(
            f"{path}: a Megatron-LM checkpoint of --ckpt-format torch (mp_rank_XX/); have Megatron-LM save it as "
            "torch_dist (--ckpt-convert-format torch_dist --ckpt-convert-save DIR) and convert that"
        )
    if not os.path.isfile(os.path.join(path, "common.pt")):
        raise CheckpointError(f"{path}: no common.pt, not a torch_dist checkpoint of Megatron-LM")
    return path


def _schedule_in_iterations(ckpt_args, state) -> tuple[dict | None, str]:
    """Megatron-LM's LR-schedule state in ours' units: it counts samples; ours iterations unless the
    run counts samples (--train-samples). (state or None, what was done)."""
    if not isinstance(state, dict) or "num_steps" not in state:
        return None, "not saved"
    if _value(ckpt_args, "train_samples"):
        return dict(state), "carried (in samples: continue with --train-samples)"
    batch = _value(ckpt_args, "global_batch_size")
    if _value(ckpt_args, "rampup_batch_size") or not batch or state["num_steps"] % batch:
        return None, "not carried: its steps are not whole global batches (--rampup-batch-size)"
    converted = dict(state)
    for key in ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps"):
        if isinstance(state.get(key), (int, float)):
            steps = state[key] / batch
            converted[key] = int(steps) if steps == int(steps) else steps
    return converted, "carried (samples -> iterations)"


# Megatron-LM's optimizer state in model space, each parameter's whole under its model key: its plain
# optimizer's, and its distributed optimizer's with --dist-ckpt-optim-fully-reshardable
# ("fully_reshardable"; the default "dp_reshardable" keeps each DP rank's part of its buffers, and the
# older "fully_sharded_model_space", which megatron-core 0.16 no longer saves, each rank's flattened
# ranges). A chained optimizer's parts are prefixed "chained_<i>." unless saved with
# chained_optim_avoid_prefix (Megatron-LM 0.14 on). "param" and "fp32_param": the fp32 main weights
# of its distributed and its mixed-precision optimizer.
_OPTIMIZER_KEY = re.compile(r"(?:chained_\d+\.)?optimizer\.state\.(exp_avg_sq|exp_avg|fp32_param|param)\.(.+)")
_MAIN_WEIGHTS = ("param", "fp32_param")
_MODEL_SPACE_FORMATS = ("fully_reshardable",)
# Our Adam settings <- Megatron-LM's args, where its saved param groups lack them: the param groups our
# checkpoint saves are what a resumed optimizer uses (torch's load_state_dict takes the saved groups'
# hyperparameters; the LR schedule then sets lr and weight_decay anew).
_ADAM_ARGS = ("adam_beta1", "adam_beta2", "adam_eps", "weight_decay", "lr", "min_lr")
_GROUP_SETTINGS = ("lr", "weight_decay", "betas", "eps", "max_lr", "min_lr")


def _their_key(their_keys: dict, kinds: tuple, model_key: str) -> str | None:
    """The checkpoint key of the first of `kinds` of Megatron-LM's optimizer state it holds for `model_key`."""
    return next((their_keys[kind, model_key] for kind in kinds if (kind, model_key) in their_keys), None)


def _param_group_identity(group: dict) -> tuple:
    """What megatron-core tells its param groups apart by (the parameters' weight-decay and LR settings)."""
    return tuple(group.get(key) for key in param_group_identifier_keys)


def _values_under(state, key: str):
    """Every value under `key` in the nested dicts and lists of `state`."""
    if isinstance(state, dict):
        for name, value in state.items():
            yield from [value] if name == key else _values_under(value, key)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _values_under(value, key)


def _megatron_lm_adam_state(ckpt_args, common: dict, saved: dict) -> tuple[dict | None, int | None, str]:
    """``(checkpoint key of each (kind, model key) of its optimizer state, Adam's step, its format)`` of
    the Megatron-LM checkpoint; ``(None, None, why not)`` where its moments cannot be carried exactly."""
    state = common.get("optimizer")
    if state is None:
        return None, None, "not carried: saved without its optimizer state (Megatron-LM's --no-save-optim)"
    if (optimizer := _value(ckpt_args, "optimizer") or "adam") != "adam":
        return None, None, f"not carried: --optimizer {optimizer} keeps no Adam moments"
    formats = set(_values_under(state, "param_state_sharding_type"))
    if unconvertible := sorted(formats - set(_MODEL_SPACE_FORMATS)):
        why = (
            f"not carried: Megatron-LM's distributed optimizer saved them as {', '.join(unconvertible)}, each "
            "data-parallel rank's part of its buffers, not each parameter's whole; have Megatron-LM load the "
            "checkpoint on its layout and save it again with --dist-ckpt-optim-fully-reshardable, and convert that"
        )
        return None, None, why
    steps = {float(step) for name in ("common_step", "step") for step in _values_under(state, name) if step is not None}
    if len(steps) != 1:
        return None, None, f"not carried: its optimizer state holds no single Adam step ({sorted(steps)})"
    keys = {match.groups(): key for key in saved if (match := _OPTIMIZER_KEY.fullmatch(key))}
    return keys, int(steps.pop()), formats.pop() if formats else "plain optimizer"


def _our_optimizer_state(args, ckpt_args, their_state: dict, model, step: int) -> tuple[dict, int]:
    """``(sharded state dict, chained parts)`` of the optimizer pretrain_r1.py builds for `args` (one
    process; the meta `model`'s), as our checkpoints save it after `step` Adam steps with Megatron-LM's
    settings (`their_state`: its optimizer's common state): the moments on the meta device, the param
    groups (each with the settings of Megatron-LM's group of the same parameters) and step in its
    common state."""
    for name in _ADAM_ARGS:
        if (value := _value(ckpt_args, name)) is not None:
            setattr(args, name, value)
    model.ddp_config = DistributedDataParallelConfig()  # what megatron-core reads of a DDP-wrapped chunk
    optimizer = build_optimizer(args, [model])
    their_groups = {
        _param_group_identity(group): group for groups in _values_under(their_state, "param_groups") for group in groups
    }
    for wrapper in optimizer.chained_optimizers:
        wrapper.init_state_fn(wrapper.optimizer, wrapper.config)  # (torch's optimizers start theirs lazily)
        for state in wrapper.optimizer.state.values():
            state["step"] = torch.tensor(float(step))  # as torch's Adam counts it
        for group in wrapper.optimizer.param_groups:
            theirs = their_groups.get(_param_group_identity(group), {})
            group.update({name: theirs[name] for name in _GROUP_SETTINGS if name in theirs})
    return optimizer_sharded_state_dict(optimizer, model_sharded_state_dict(model), False), optimizer_parts(optimizer)


def _requested_moments(pieces: dict, weights: dict, their_keys: dict) -> tuple[dict, list[str]]:
    """``(our optimizer state's checkpoint key -> its pieces paired with the requests that read them from
    the Megatron-LM checkpoint, what it lacks)``: each piece is read as its weight's piece is (the same
    slice of the same tensor, under the optimizer's key), a main weight from Megatron-LM's or the weight."""
    weight_requests = {
        (piece.key, piece.global_offset): request for pairs in weights.values() for piece, request in pairs
    }
    moments, missing = {}, []
    for key, key_pieces in pieces.items():
        if not (match := _OPTIMIZER_KEY.fullmatch(key)):
            continue
        kind, model_key = match.groups()
        pairs = moments[key] = []
        for piece in key_pieces:
            request = weight_requests[model_key, piece.global_offset]
            source = _their_key(their_keys, _MAIN_WEIGHTS if kind in _MAIN_WEIGHTS else (kind,), request.key)
            if source is None and kind not in _MAIN_WEIGHTS:
                missing.append(f"optimizer.state.{kind}.{request.key}")
            pairs.append((piece, dataclasses.replace(request, key=source or request.key)))
    return moments, missing


def _carried_moments(args, ckpt_args, common, saved, model, weights) -> tuple[dict, dict | None, int, str]:
    """``(moments' pieces with their requests, our optimizer's sharded state dict or None, its parts, what
    was done)``. Where the moments are carried, the weights are read from Megatron-LM's fp32 main weights
    if it kept them (a bf16 run's): ours are the main weights, which continue the run exactly."""
    their_keys, step, found = _megatron_lm_adam_state(ckpt_args, common, saved)
    if their_keys is None:
        return {}, None, 0, found
    optimizer_state, parts = _our_optimizer_state(args, ckpt_args, common["optimizer"], model, step)
    moments, missing = _requested_moments(model_layout(model, optimizer_state)[0], weights, their_keys)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return {}, None, 0, f"not carried: its {found} state lacks {', '.join(missing[:3])}{more}"
    main_weights = 0
    for pairs in weights.values():
        for _, request in pairs:
            if key := _their_key(their_keys, _MAIN_WEIGHTS, request.key):
                request.key, main_weights = key, main_weights + 1
    source = ", the weights from its fp32 main weights" if main_weights else ""
    return moments, optimizer_state, parts, f"carried ({found}: Adam's moments and step {step}{source})"


def convert_megatron_lm_checkpoint(load: str, output: str, iteration: int | None = None,
                                   max_part_bytes: int = 5 * 2**30, progress: bool = True) -> dict:  # fmt: skip
    """Write our checkpoint ``output`` (iter_XXXXXXX at Megatron-LM's iteration, the tracker file) of the
    Megatron-LM checkpoint `load` (--save root or checkpoint directory), holding about `max_part_bytes`
    of weights (and optimizer moments) at a time (one tensor, where one is larger); needs a one-process
    megatron-core parallel state. Checks everything before writing. Returns a summary."""
    path = megatron_lm_checkpoint_dir(load, iteration)
    common = read_common_state(path)
    ckpt_args, saved = common.get("args"), saved_tensor_shapes(path)
    if "embedding.word_embeddings.weight" not in saved:
        raise CheckpointError(f"{path}: no embedding.word_embeddings.weight, not a GPT model's checkpoint")
    padded_vocab_size = saved["embedding.word_embeddings.weight"][0]
    args, flags = model_args_from_megatron_lm(ckpt_args, padded_vocab_size, os.path.join(path, "common.pt"))
    model = meta_model(args, transformer_config_from_args(args))
    style, weights, renamed, missing = _requested_weights(model, saved)
    if missing:
        impl = _value(ckpt_args, "transformer_impl")
        hint = f" (saved with --transformer-impl {impl}, whose names are mapped to the local ones)" if impl else ""
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{path} lacks weights of the model its args describe{hint}: {', '.join(missing[:5])}{more}"
        )
    moments, optimizer_state, chained_parts, moments_note = _carried_moments(
        args, ckpt_args, common, saved, model, weights
    )
    # Once megatron-core's check of our pieces passed.
    _, objects, common_state = model_layout(model, optimizer_state)
    schedule, schedule_note = _schedule_in_iterations(ckpt_args, common.get("opt_param_scheduler"))
    it = int(common.get("iteration") or 0)
    consumed = int(_value(ckpt_args, "consumed_train_samples") or it * (_value(ckpt_args, "global_batch_size") or 0))
    reader = McoreCheckpointReader(path)
    with temporary_checkpoint(output, it) as temporary:
        writer = TorchDistPartsWriter(checkpoint_dir(temporary, it), max_part_bytes)
        for item in objects:  # the layers' (empty) extra state, in the first part
            writer.add(item)
        tensors = {**weights, **moments}
        total = sum(piece.data.nbytes for pairs in tensors.values() for piece, _ in pairs)
        with tqdm(total=total, desc="megatron-lm -> mcore", unit="B", unit_scale=True, disable=not progress) as bar:
            for part, part_bytes in _parts(tensors, max_part_bytes):
                _write_part(writer, reader, part)
                bar.update(part_bytes)
        parts = writer.finish(common_state)
        publish_weights_checkpoint(
            args, temporary, output, it, consumed_samples=consumed, scheduler=schedule, optimizer_parts=chained_parts,
            optimizer_kind=optimizer_kind(args),
            converted_from=os.path.abspath(path), megatron_lm_checkpoint_version=common.get("checkpoint_version"),
        )  # fmt: skip
    return {
        "iteration": it, "consumed_samples": consumed, "weights": len(weights), "parts": parts, "key_style": style,
        "transformer_engine_names": renamed, "lr_schedule": schedule_note, "optimizer": moments_note,
        "tokenizer": args.tokenizer_type or f"{_value(ckpt_args, 'tokenizer_type')} (tokenizes otherwise here: give yours)",
        "flags": flags + _tokenizer_flags(args),
    }  # fmt: skip


def _tokenizer_flags(args) -> list[str]:
    if args.tokenizer_type == "NullTokenizer":
        return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab_size)]
    if args.tokenizer_type in MODEL_TOKENIZER_TYPES and args.tokenizer_model:
        return ["--tokenizer-type", args.tokenizer_type, "--tokenizer-model", args.tokenizer_model]
    return []
