"""Our checkpoint -> a Hugging Face directory, one layer at a time: ``DeepseekV3ForCausalLM`` for MLA
models, the standard architecture the flags choose for GQA/MHA ones (megatron_r1.hf.config).

Every check (model representable, every tensor present with the shape the configuration implies, no
unmapped tensor) runs on the checkpoint's metadata before a byte is written; the directory is
assembled under ``<output>.tmp`` and renamed when complete.

With ``fp8=True`` the weights that DeepSeek's FP8 release quantizes are written in its block format
(megatron_r1.hf.fp8: float8_e4m3fn plus a float32 ``weight_scale_inv`` per 128x128 block, the
``quantization_config`` in config.json); the other tensors in `dtype`. The summary reports how far the
dequantized weights are from the checkpoint's.
"""

import json
import os
import shutil

import torch
from tqdm import tqdm

from megatron_r1.data.sft import END_MARKER
from megatron_r1.hf.config import UnsupportedModelError, checkpoint_args, export_fields
from megatron_r1.hf.config import hf_config as hf_config_of
from megatron_r1.hf.fp8 import (
    DEEPSEEK_BLOCK,
    SCALE_SUFFIX,
    RoundTripError,
    deepseek_quantizes,
    dequantize,
    fp8_quantization_config,
    quantize,
)
from megatron_r1.hf.keys import DEFAULT_MOE, PUBLISHED_MOE, conversion_groups
from megatron_r1.hf.storage import McoreCheckpointReader, ShardedSafetensorsWriter, WeightsError
from megatron_r1.tokenizer import SentencePieceTokenizer, build_tokenizer, tokenizer_type_for_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_hf_shapes(hf_config) -> dict:
    """Parameter and buffer shapes of transformers' model for `hf_config` under the published tensor
    names, MTP layers included (built on the meta device: no memory)."""
    import transformers

    mtp = getattr(hf_config, "num_nextn_predict_layers", 0) or 0
    config = hf_config.__class__.from_dict(
        {**hf_config.to_dict(), "num_hidden_layers": hf_config.num_hidden_layers + mtp}
    )
    with torch.device("meta"):
        model = getattr(transformers, hf_config.architectures[0])(config)
    shapes = {name: tuple(t.shape) for name, t in published_tensors(model.state_dict(), config.model_type).items()}
    hidden, vocab = hf_config.hidden_size, hf_config.vocab_size
    for i in range(mtp):
        prefix = f"model.layers.{hf_config.num_hidden_layers + i}."
        shapes.update(
            {
                f"{prefix}enorm.weight": (hidden,),
                f"{prefix}hnorm.weight": (hidden,),
                f"{prefix}eh_proj.weight": (hidden, 2 * hidden),
                f"{prefix}shared_head.norm.weight": (hidden,),
                f"{prefix}embed_tokens.weight": (vocab, hidden),
                f"{prefix}shared_head.head.weight": (vocab, hidden),
            }
        )
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def published_tensors(state_dict: dict, model_type: str = "deepseek_v3") -> dict:
    """A transformers model's `state_dict` with the experts of each MoE layer under their published
    per-expert names (views, no copies; meta tensors work too).

    transformers 5 holds a layer's experts as two tensors, ``mlp.experts.gate_up_proj`` [E, 2 x I, H]
    (each expert's gate rows, then its up rows) and ``mlp.experts.down_proj`` [E, H, I], and converts the
    published ``experts.{e}.{gate,up,down}_proj.weight`` (Mixtral: ``block_sparse_moe.experts.{e}.{w1,
    w3,w2}.weight`` and ``block_sparse_moe.gate``) into them as it loads a directory; 4.57 holds the
    published tensors themselves. Our directories keep the published names, which both load."""
    block, (gate, up, down) = PUBLISHED_MOE.get(model_type, DEFAULT_MOE)
    fused = {name[: -len(".experts.gate_up_proj")] for name in state_dict if name.endswith(".experts.gate_up_proj")}
    published = {}
    for name, tensor in state_dict.items():
        layer, _, rest = name.rpartition(".mlp.")
        experts = f"{layer}.{block}.experts"
        if f"{layer}.mlp" not in fused:
            published[name] = tensor
        elif rest == "experts.gate_up_proj":
            for e, expert in enumerate(tensor.unbind(0)):
                gate_rows, up_rows = expert.chunk(2, dim=0)
                published[f"{experts}.{e}.{gate}.weight"], published[f"{experts}.{e}.{up}.weight"] = gate_rows, up_rows
        elif rest == "experts.down_proj":
            for e, expert in enumerate(tensor.unbind(0)):
                published[f"{experts}.{e}.{down}.weight"] = expert
        else:  # the router, shared experts
            published[f"{layer}.{block}.{rest}"] = tensor
    return published


def check_mapping(groups, source_shapes: dict, target_shapes: dict, convert, source: str) -> None:
    """Every mapped source tensor exists, none is left unmapped, and converting tensors of the source
    shapes (meta tensors: no data) yields exactly the target's tensors and shapes."""
    maps = [m for _, group in groups for m in group]
    used = {key for m in maps for key in convert.source_keys(m)}
    missing = sorted(used - set(source_shapes))
    if missing:
        raise WeightsError(
            f"{source}: the configuration needs tensors the weights lack: {', '.join(missing[:8])}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    unmapped = sorted(set(source_shapes) - used)
    if unmapped:
        raise WeightsError(f"{source}: tensors the configuration does not account for: {', '.join(unmapped[:8])}")
    produced, origin = {}, {}
    for m in maps:
        for name, shape in convert.meta(m, source_shapes).items():
            produced[name], origin[name] = shape, convert.source_keys(m)[0]
    wrong = [
        f"{name} {produced.get(name)} (from {origin.get(name)} in the weights) vs {shape} (configuration)"
        for name, shape in target_shapes.items()
        if produced.get(name) != shape
    ]
    extra = sorted(set(produced) - set(target_shapes))
    if wrong or extra:
        raise WeightsError(f"{source}: weights do not match the configuration: " + "; ".join(wrong[:8] + extra[:8]))


class _ToHF:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    @staticmethod
    def source_keys(m):
        return [m.mcore]

    def meta(self, m, shapes):
        tensor = torch.empty(shapes[m.mcore], device="meta")
        return {name: tuple(t.shape) for name, t in m.to_hf(tensor, self.vocab_size).items()}


def _export_group(reader, maps, writer, vocab_size: int, dtype: torch.dtype, fp8_error: RoundTripError | None) -> None:
    """One layer's tensors into the writer (DeepSeek's quantized weights in FP8 blocks when
    `fp8_error` collects their error). A function of its own so that nothing of the layer outlives
    it: the writer keeps copies, not views, of what it has not written yet."""
    tensors = reader.load([m.mcore for m in maps])
    for m in maps:
        for name, tensor in m.to_hf(tensors[m.mcore], vocab_size).items():
            if fp8_error is not None and deepseek_quantizes(name):
                weight, scale_inv = quantize(tensor, DEEPSEEK_BLOCK)
                fp8_error.add(tensor, dequantize(weight, scale_inv, DEEPSEEK_BLOCK))
                writer.add(name, weight)
                writer.add(name + SCALE_SUFFIX, scale_inv)
            else:
                writer.add(name, tensor.to(dtype))


def _generation_stop_ids(tokenizer) -> list[int] | None:
    """Where transformers' generate stops: the end of the document and, when the vocabulary has the
    chat template's end-of-turn token, the end of an assistant reply (as tools/generate.py --chat)."""
    if tokenizer is None or tokenizer.eod is None:
        return None
    try:
        return [tokenizer.eod, tokenizer.token_to_id(END_MARKER)]
    except KeyError:
        return [tokenizer.eod]


def _write_json(path: str, fields: dict) -> None:
    """`fields` as the JSON file `path`, written by us rather than by the installed transformers: the
    directory is the same whichever version exports it (a null stays: it overrides a default)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fields, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_tokenizer(tokenizer, directory: str, max_position_embeddings: int) -> None:
    if isinstance(tokenizer, SentencePieceTokenizer):  # converted (also GPTSentencePiece/Llama2Tokenizer)
        from megatron_r1.hf.tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, directory, max_position_embeddings)
    elif tokenizer is not None:  # a Hugging Face tokenizer already: its files as they are
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            source = os.path.join(os.path.dirname(tokenizer.model_file), name)
            if os.path.isfile(source):
                shutil.copy(source, directory)


def export_to_hf(checkpoint: str, output: str, vocab_size: int | None = None, tokenizer_model: str | None = None,
                 tokenizer_type: str | None = None, max_shard_bytes: int = 5 * 2**30, dtype: str = "float32",
                 fp8: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Write the Hugging Face directory `output` for checkpoint directory `checkpoint` (an
    ``iter_XXXXXXX``); needs a one-process torch.distributed group. Returns a summary."""
    args = checkpoint_args(checkpoint)
    tokenizer_model = tokenizer_model or args.tokenizer_model
    tokenizer = None
    if tokenizer_model:
        if not os.path.exists(tokenizer_model):
            raise FileNotFoundError(
                f"tokenizer {tokenizer_model} (--tokenizer-model, or saved in the checkpoint) does not exist"
            )
        tokenizer = build_tokenizer(tokenizer_type_for_model(tokenizer_type, args.tokenizer_type), tokenizer_model)
    vocab_size = vocab_size or (tokenizer.vocab_size if tokenizer else args.vocab_size)
    if not vocab_size:
        raise UnsupportedModelError("the real vocabulary size is unknown: give --vocab-size or --tokenizer-model")
    if vocab_size > args.padded_vocab_size:
        raise WeightsError(
            f"vocabulary of {vocab_size} tokens, but the checkpoint's embedding has {args.padded_vocab_size} rows"
        )
    fields = export_fields(
        args,
        vocab_size,
        bos_token_id=tokenizer.bos if tokenizer else None,
        eos_token_id=tokenizer.eod if tokenizer else None,
        pad_token_id=tokenizer.pad if tokenizer else None,
    )
    if fp8 and fields["model_type"] != "deepseek_v3":
        raise UnsupportedModelError(
            f"--fp8 writes DeepSeek's FP8 block format; {fields['architectures'][0]} is exported in --dtype"
        )
    hf_config = hf_config_of(fields)
    groups = conversion_groups(args)
    reader = McoreCheckpointReader(checkpoint)
    reader.name_as(m.mcore for _, maps in groups for m in maps)  # a TransformerEngine run's checkpoint too
    to_hf = _ToHF(vocab_size)
    check_mapping(
        groups, {key: reader.shape(key) for key in reader.keys()}, expected_hf_shapes(hf_config), to_hf, checkpoint
    )
    fp8_error = RoundTripError() if fp8 else None
    fields["dtype"] = dtype
    if fp8:
        fields["quantization_config"] = fp8_quantization_config(DEEPSEEK_BLOCK)

    temporary = f"{output.rstrip('/')}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    writer = ShardedSafetensorsWriter(temporary, max_shard_bytes)
    for _, maps in tqdm(groups, desc="mcore -> hf", unit="layer", disable=not progress):
        _export_group(reader, maps, writer, vocab_size, DTYPES[dtype], fp8_error)
    shards = writer.finish()
    _write_json(os.path.join(temporary, "config.json"), fields)
    generation = {"bos_token_id": fields["bos_token_id"], "eos_token_id": _generation_stop_ids(tokenizer),
                  "pad_token_id": fields["pad_token_id"]}  # fmt: skip
    _write_json(
        os.path.join(temporary, "generation_config.json"), {k: v for k, v in generation.items() if v is not None}
    )
    _write_tokenizer(tokenizer, temporary, args.max_position_embeddings)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(temporary, output)
    summary = {"tensors": len(json.load(open(os.path.join(output, "model.safetensors.index.json")))["weight_map"]),
               "shards": shards, "bytes": writer.total_bytes, "vocab_size": vocab_size,
               "padded_vocab_size": args.padded_vocab_size, "layers": args.num_layers, "mtp_layers": args.mtp_num_layers or 0,
               "tokenizer": tokenizer is not None}  # fmt: skip
    if fp8_error is not None:
        summary["fp8"] = fp8_error.summary(DEEPSEEK_BLOCK)
    return summary
