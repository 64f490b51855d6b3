"""A Hugging Face DeepSeek-V3 directory -> our torch_dist checkpoint, for a chosen TP/PP/EP layout.

The checkpoint is written by one process with megatron-core's dist_checkpointing, whose torch_dist
format is layout-independent: ``pretrain_r1.py --load DIR --finetune`` reads it under any
TP/PP/EP that the flags name, each rank taking its own slices. What the target tensor-parallel size
does fix is the vocabulary padding (a multiple of --make-vocab-size-divisible-by x TP rows, checked on
load), so the layout is chosen here and validated against the model's shape.

The weights may be bf16/fp16/fp32, or DeepSeek's FP8 block format (config.json's quantization_config:
float8_e4m3fn weights with a float32 ``weight_scale_inv`` per block, megatron_r1.hf.fp8), which is
dequantized to float32 as each layer is read: the result equals importing the dequantized weights.

Memory: the tensors are read a layer at a time from the safetensors files, but the model they fill is
held whole in this one process (dist_checkpointing saves a state dict in one call), so this direction
needs about the model's size in RAM (in the dtype of --params-dtype float32).
"""

import argparse
import json
import os
import shutil

import torch
from tqdm import tqdm

from megatron_r1.arguments import build_parser, transformer_config_from_args, validate_args
from megatron_r1.checkpointing import METADATA_FILE, MODEL_FUNCTION_ARGS, MODEL_SHAPE_ARGS, TRACKER_FILE, checkpoint_dir
from megatron_r1.hf.config import UnsupportedModelError, args_from_deepseek_v3, fp8_block_size
from megatron_r1.hf.export import check_mapping
from megatron_r1.hf.fp8 import DequantizingReader
from megatron_r1.hf.keys import conversion_groups
from megatron_r1.hf.storage import SafetensorsReader, WeightsError
from megatron_r1.jsonfile import read_json_object
from megatron_r1.megatron_lm_flags import parse_known_flags
from megatron_r1.model import build_model
from megatron_r1.sharded_tensors import fill, flat_sharded_tensors, global_shape, model_sharded_state_dict
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
    argv = args_from_deepseek_v3(read_json_object(config_path, WeightsError), config_path)

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


def import_from_hf(hf_dir: str, output: str, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   expert_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                   progress: bool = True) -> dict:  # fmt: skip
    """Write our checkpoint (``output``/iter_0000000 and the tracker file) for the Hugging Face
    directory `hf_dir`; needs a one-process megatron-core parallel state. Returns a summary."""
    args, argv, config_path = read_hf_model_flags(hf_dir, make_vocab_size_divisible_by)
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    for count, name, size, flag in ((args.num_attention_heads, "num_attention_heads", tp, "--tensor-model-parallel-size"),
                                    (args.num_layers, "num_hidden_layers", pp, "--pipeline-model-parallel-size"),
                                    (args.num_experts or ep, "n_routed_experts", ep, "--expert-model-parallel-size")):  # fmt: skip
        if size < 1 or count % size:
            raise UnsupportedModelError(f"{flag} {size} does not divide {name} ({count}) of {config_path}")
    args.padded_vocab_size = vocab_size_with_padding(args.vocab_size, make_vocab_size_divisible_by, tp)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.expert_model_parallel_size = ep

    # DeepSeek's FP8 weights are dequantized tensor by tensor as the layers stream in.
    block = fp8_block_size(read_json_object(config_path, WeightsError), config_path)
    reader = DequantizingReader(SafetensorsReader(hf_dir), block)
    groups = conversion_groups(args)
    imported = [(name, [m for m in maps if not m.export_only]) for name, maps in groups]
    # Copies of the embedding / output layer that DeepSeek-V3 stores with each MTP layer.
    copies = {name for _, maps in groups for m in maps if m.export_only for name in m.hf}
    source_shapes = {name: reader.shape(name) for name in reader.keys() if name not in copies}

    config = _transformer_config(args, config_path)
    config.tensor_model_parallel_size = 1  # this process holds the whole model
    args.transformer_impl = "local"  # the Hugging Face key mapping is the local spec's
    # Every weight is filled below; the conversion streams through host memory.
    (model,) = build_model(args, config, initialize=False, device=torch.device("cpu"))
    pieces = flat_sharded_tensors(model)
    check_mapping(
        imported,
        source_shapes,
        {key: global_shape(p) for key, p in pieces.items()},
        _ToMcore(args.padded_vocab_size),
        hf_dir,
    )

    for _, maps in tqdm(imported, desc="hf -> mcore", unit="layer", disable=not progress):
        tensors = reader.load([name for m in maps for name in m.hf])
        for m in maps:
            fill(pieces[m.mcore], m.to_mcore(tensors, args.padded_vocab_size).to(torch.float32))
        del tensors

    from megatron.core import dist_checkpointing

    temporary = f"{output.rstrip('/')}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    iteration_dir = checkpoint_dir(temporary, 0)
    os.makedirs(iteration_dir)
    dist_checkpointing.save({"model": model_sharded_state_dict(model)}, iteration_dir)
    args.tokenizer_model = None
    metadata = {
        "iteration": 0, "consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0, "scheduler": None,
        "layout": {"world_size": 1, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                   "expert_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None},
        "model_args": {name: getattr(args, name) for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS},
        "converted_from": os.path.abspath(hf_dir),
        "target_layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                          "expert_model_parallel_size": ep},
    }  # fmt: skip
    with open(os.path.join(iteration_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=1)
    with open(os.path.join(temporary, TRACKER_FILE), "w") as f:
        f.write("0")
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(temporary, output)
    return {
        "tensors": sum(len(maps) for _, maps in imported),
        "layers": args.num_layers,
        "mtp_layers": args.mtp_num_layers or 0,
        "padded_vocab_size": args.padded_vocab_size,
        "flags": argv,
    }
