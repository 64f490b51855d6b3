"""A Hugging Face directory -> our torch_dist checkpoint, for a chosen TP/PP/EP layout: DeepSeek-V3 /
R1 / V2 / V2-Lite, Qwen3-MoE, Mixtral, Qwen3 or Llama (megatron_r1.hf.model_flags reads its config.json).

The checkpoint is written by one process with megatron-core's dist_checkpointing, whose torch_dist
format is layout-independent: ``pretrain_r1.py --load DIR --finetune`` reads it under any
TP/PP/EP that the flags name, each rank taking its own slices. What the target tensor-parallel size
does fix is the vocabulary padding (a multiple of --make-vocab-size-divisible-by x TP rows, checked on
load), so the layout is chosen here and validated against the model's shape.

The weights may be bf16/fp16/fp32, or DeepSeek's FP8 block format (config.json's quantization_config:
float8_e4m3fn weights with a float32 ``weight_scale_inv`` per block, megatron_r1.hf.fp8), which is
dequantized to float32 tensor by tensor as it is read: the result equals importing the dequantized weights.

Memory is bounded, whatever the model's size: the model is built on the meta device (no memory),
only for megatron-core's sharded state dict, which names each checkpoint tensor, its pieces and their
layout (the same keys and pieces as the model's own save). The pieces are then filled a unit at a
time, a tensor or one expert's part of the experts' tensor (only that unit's Hugging Face tensors
are read), and written in parts of at most `max_part_bytes` (megatron_r1.hf.storage's
TorchDistPartsWriter: one dist_checkpointing.save per part, the parts' metadata merged into the one
checkpoint). Peak memory: about one part plus one unit (fp32), above the process' baseline.
"""

import argparse
import dataclasses
import json
import os
import shutil

import torch
from tqdm import tqdm

from megatron_r1.arguments import build_parser, transformer_config_from_args, validate_args
from megatron_r1.checkpointing import (
    METADATA_FILE,
    MODEL_FUNCTION_ARGS,
    MODEL_SHAPE_ARGS,
    TRACKER_FILE,
    checkpoint_dir,
    temporary_checkpoint,
)
from megatron_r1.hf.config import UnsupportedModelError
from megatron_r1.hf.export import check_mapping
from megatron_r1.hf.fp8 import DequantizingReader
from megatron_r1.hf.keys import conversion_groups
from megatron_r1.hf.model_flags import args_from_hf_config, fp8_block_size
from megatron_r1.hf.storage import SafetensorsReader, TorchDistPartsWriter, WeightsError
from megatron_r1.jsonfile import read_json_object
from megatron_r1.megatron_lm_flags import parse_known_flags
from megatron_r1.sharded_tensors import global_shape, local_slices, meta_model_layout
from megatron_r1.tokenizer import vocab_size_with_padding


class _ToMcore:
    def __init__(self, padded_vocab_size):
        self.padded_vocab_size = padded_vocab_size

    @staticmethod
    def source_keys(m):
        return list(m.hf)

    def meta(self, m, shapes):
        tensors = {name: torch.empty(shapes[name], device="meta") for name in m.hf}
        return {m.mcore: tuple(m.to_mcore(tensors, self.padded_vocab_size).shape)}


def read_hf_model_flags(
    hf_dir: str, make_vocab_size_divisible_by: int = 128
) -> tuple[argparse.Namespace, list[str], str]:
    """``(args, model flags, config path)`` for the model of `hf_dir`'s config.json; WeightsError /
    UnsupportedModelError naming config.json when it is unreadable or describes no model we build."""
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{hf_dir}: no config.json")
    argv = args_from_hf_config(read_json_object(config_path, WeightsError), config_path)

    def refuse(message):  # argparse's and validate_args' errors, which would exit
        raise UnsupportedModelError(f"{config_path}: its model flags are refused: {message}")

    parser = build_parser("")
    parser.error = refuse
    args = parse_known_flags(
        parser, argv + ["--mock-data", "--make-vocab-size-divisible-by", str(make_vocab_size_divisible_by)]
    )
    validate_args(args, refuse)
    _transformer_config(args, config_path)
    return args, argv, config_path


def _transformer_config(args, config_path: str):
    try:
        return transformer_config_from_args(args)
    except (ValueError, AssertionError) as error:  # megatron-core's own checks of the shapes
        raise UnsupportedModelError(f"{config_path}: megatron-core refuses the model: {error}") from None


def _units(maps, pieces: dict):
    """``(map, its pieces, first expert)`` per unit of work: a tensor, or one expert's part of the
    experts' tensor (the pieces with that expert's number on the prepended axis; only that expert's
    Hugging Face tensors are read)."""
    for m in maps:
        own = pieces[m.mcore]
        if m.kind not in ("experts", "experts_glu") or any(piece.prepend_axis_num != 1 for piece in own):
            yield m, own, 0
            continue
        per_expert = len(m.hf) // global_shape(own)[0]  # 1, or 2 (gate and up)
        by_expert = {}
        for piece in own:
            by_expert.setdefault(piece.global_offset[0], []).append(piece)
        for expert, expert_pieces in sorted(by_expert.items()):
            names = m.hf[expert * per_expert : (expert + 1) * per_expert]
            yield dataclasses.replace(m, hf=names), expert_pieces, expert


def _write_unit(writer, reader, m, pieces, first_expert: int, padded_vocab_size: int) -> None:
    """Each piece of the unit with its part of the converted tensor, as data of its own (not a view
    that would keep the whole tensor alive), to the writer. A function of its own so that nothing
    of the unit outlives it."""
    tensor = m.to_mcore(reader.load(m.hf), padded_vocab_size)  # from `first_expert` on, for an expert
    for piece in pieces:
        prepended = tuple(piece.global_offset[: piece.prepend_axis_num])
        if prepended:
            prepended = (prepended[0] - first_expert, *prepended[1:])
        data = tensor[prepended + local_slices(piece)]
        writer.add(
            dataclasses.replace(piece, data=data.to(piece.dtype, memory_format=torch.contiguous_format, copy=True))
        )


def _target_layout(args, config_path: str, tp: int, pp: int, ep: int) -> None:
    """Check that the layout divides the model, and pad the vocabulary for its TP size."""
    for count, name, size, flag in ((args.num_attention_heads, "num_attention_heads", tp, "--tensor-model-parallel-size"),
                                    (args.num_query_groups or tp, "num_key_value_heads", tp, "--tensor-model-parallel-size"),
                                    (args.num_layers, "num_hidden_layers", pp, "--pipeline-model-parallel-size"),
                                    (args.num_experts or ep, "the routed experts", ep, "--expert-model-parallel-size")):  # fmt: skip
        if size < 1 or count % size:
            raise UnsupportedModelError(f"{flag} {size} does not divide {name} ({count}) of {config_path}")
    args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, args.make_vocab_size_divisible_by, tp)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size = ep


def _publish(args, hf_dir: str, temporary: str, output: str) -> None:
    """megatron_r1.json and the tracker file next to the written weights, then ``temporary`` ->
    ``output`` (replaced)."""
    args.tokenizer_model = None
    metadata = {
        "iteration": 0, "consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0, "scheduler": None,
        "layout": {"world_size": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                   "expert_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None},
        "optimizer_parts": 0, "rng_saved": False,
        "model_args": {name: getattr(args, name) for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS},
        "converted_from": os.path.abspath(hf_dir),
        "target_layout": {"tensor_model_parallel_size": args.tensor_model_parallel_size,
                          "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                          "expert_model_parallel_size": args.expert_model_parallel_size},
    }  # fmt: skip
    with open(os.path.join(checkpoint_dir(temporary, 0), METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=1)
    with open(os.path.join(temporary, TRACKER_FILE), "w") as f:
        f.write("0")
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(temporary, output)


def import_from_hf(hf_dir: str, output: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   expert_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                   max_part_bytes: int = 5 * 2**30, progress: bool = True) -> dict:  # fmt: skip
    """Write our checkpoint (``output``/iter_0000000 and the tracker file) for the Hugging Face
    directory `hf_dir`, holding at most about `max_part_bytes` of weights (plus one tensor, or one
    expert's) at a time; needs a one-process megatron-core parallel state. Returns a summary."""
    args, argv, config_path = read_hf_model_flags(hf_dir, make_vocab_size_divisible_by)
    _target_layout(
        args, config_path, tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    )
    # DeepSeek's FP8 weights are dequantized tensor by tensor as they stream in.
    block = fp8_block_size(read_json_object(config_path, WeightsError), config_path)
    reader = DequantizingReader(SafetensorsReader(hf_dir), block)
    groups = conversion_groups(args)
    imported = [(name, [m for m in maps if not m.export_only]) for name, maps in groups]
    # Copies of the embedding / output layer that DeepSeek-V3 stores with each MTP layer.
    copies = {name for _, maps in groups for m in maps if m.export_only for name in m.hf}
    source_shapes = {name: reader.shape(name) for name in reader.keys() if name not in copies}

    config = _transformer_config(args, config_path)
    config.tensor_model_parallel_size = 1  # the pieces are those of a one-process layout
    args.transformer_impl = "local"  # the Hugging Face key mapping is the local spec's
    pieces, objects, common = meta_model_layout(args, config)
    check_mapping(
        imported,
        source_shapes,
        {key: global_shape(p) for key, p in pieces.items()},
        _ToMcore(args.padded_vocab_size),
        hf_dir,
    )

    with temporary_checkpoint(output, 0) as temporary:
        writer = TorchDistPartsWriter(checkpoint_dir(temporary, 0), max_part_bytes)
        for _, maps in tqdm(imported, desc="hf -> mcore", unit="layer", disable=not progress):
            for m, unit_pieces, first_expert in _units(maps, pieces):
                _write_unit(writer, reader, m, unit_pieces, first_expert, args.padded_vocab_size)
        for item in objects:  # the layers' (empty) extra state
            writer.add(item)
        parts = writer.finish(common)
        _publish(args, hf_dir, temporary, output)
    return {
        "tensors": sum(len(maps) for _, maps in imported),
        "layers": args.num_layers,
        "mtp_layers": args.mtp_num_layers or 0,
        "padded_vocab_size": args.padded_vocab_size,
        "parts": parts,
        "flags": argv,
    }
