"""Merge LoRA adapters (a `finetune_r1.py --lora --save DIR` run) into their base checkpoint:
every targeted weight becomes W + (alpha / rank) * B @ A, and the result is a full checkpoint in
Megatron layout, loadable (weights only) by `finetune_r1.py --pretrained-checkpoint OUT` or
`pretrain_r1.py --load OUT --finetune`, under any parallel layout. One process, on CPU.

Example:
  python tools/merge_lora.py --lora-load runs/sft_lora --save runs/sft_merged
  (the base checkpoint is the run's --pretrained-checkpoint, recorded in runs/sft_lora/lora.json)
"""

import argparse
import json
import os
import shutil
import sys

import megatron_r1  # noqa: F401  before megatron.core: on CPU its import then skips TorchDynamo (platform.py)

# isort: split
import torch
from megatron.core import dist_checkpointing
from tqdm import tqdm

from megatron_r1.arguments import build_parser
from megatron_r1.checkpointing import (
    METADATA_FILE,
    TRACKER_FILE,
    CheckpointError,
    _write_text_atomically,
    checkpoint_dir,
    find_checkpoint,
    load_weights,
    read_metadata,
)
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.finetuning import LORA_CONFIG_FILE
from megatron_r1.lora import (
    LoRAConfig,
    adapter_layers,
    add_adapters_to_duplicated_linears,
    is_adapter_key,
    lora_spec_transform,
)
from megatron_r1.model import build_model
from megatron_r1.sharded_tensors import model_sharded_state_dict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-load", required=True, help="the LoRA run's --save directory (adapters + lora.json)")
    parser.add_argument("--ckpt-step", type=int, default=None, help="merge this iteration's adapters, not the latest")
    parser.add_argument("--pretrained-checkpoint", default=None, help="base checkpoint; default: the one in lora.json")
    parser.add_argument("--save", required=True, help="directory to write the merged checkpoint to")
    args = parser.parse_args(argv)
    config_path = os.path.join(args.lora_load, LORA_CONFIG_FILE)
    if not os.path.isfile(config_path):
        parser.error(
            f"--lora-load {args.lora_load}: no {LORA_CONFIG_FILE} (not a finetune_r1.py --lora --save directory)"
        )
    with open(config_path) as f:
        args.lora_config = json.load(f)
    args.pretrained_checkpoint = args.pretrained_checkpoint or args.lora_config["pretrained_checkpoint"]
    if not args.pretrained_checkpoint:
        parser.error(
            "the LoRA run had no --pretrained-checkpoint; give the base checkpoint with --pretrained-checkpoint"
        )
    return args


def _model_flags(model_args: dict) -> argparse.Namespace:
    """Flag defaults with a checkpoint's model flags: enough to rebuild its weights (one process)."""
    flags = build_parser("").parse_args([])
    vars(flags).update(model_args)
    flags.virtual_pipeline_model_parallel_size = None
    flags.transformer_impl = "local"
    return flags


def _checkpoint(directory: str, step=None) -> str:
    path = find_checkpoint(argparse.Namespace(load=directory, ckpt_step=step))
    if path is None:
        sys.exit(f"error: {directory}: no checkpoint (no {TRACKER_FILE})")
    return path


def _merged_model(base_path: str, adapter_path: str, flags, lora: LoRAConfig):
    """The base model with the adapters loaded (not yet folded in), on the CPU: merging is a
    host-memory conversion wherever the compute device is."""
    (model,) = build_model(
        flags,
        initialize=False,
        layer_spec_transform=lora_spec_transform(lora, flags.swiglu),
        prepare_chunk=lambda chunk: add_adapters_to_duplicated_linears(chunk, lora),
        device=torch.device("cpu"),
    )
    load_weights(base_path, [model], keep=lambda key: not is_adapter_key(key))
    load_weights(adapter_path, [model], keep=is_adapter_key)
    return model


def main(argv=None):
    args = parse_args(argv)
    adapter_path = _checkpoint(args.lora_load, args.ckpt_step)
    base_path = _checkpoint(args.pretrained_checkpoint)
    lora = LoRAConfig(
        args.lora_config["rank"], args.lora_config["alpha"], 0.0, tuple(args.lora_config["target_modules"])
    )
    initialize_distributed()
    try:
        metadata = read_metadata(adapter_path)
        model = _merged_model(base_path, adapter_path, _model_flags(metadata["model_args"]), lora)
    except CheckpointError as error:
        sys.exit(f"error: {error}")

    layers = adapter_layers(model)
    for layer in tqdm(layers, desc="merging", unit="linear"):
        layer.merge_adapter()

    final = checkpoint_dir(args.save, metadata["iteration"])
    temporary = f"{final}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    merged = {k: v for k, v in model_sharded_state_dict(model).items() if not is_adapter_key(k)}
    dist_checkpointing.save({"model": merged}, temporary)
    merged_metadata = {
        "iteration": metadata["iteration"], "consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0,
        "scheduler": metadata["scheduler"], "layout": {**metadata["layout"], "world_size": 1},
        "model_args": metadata["model_args"], "weights_only": True,
        "merged_from": {"base": base_path, "adapters": adapter_path, "lora": args.lora_config},
    }  # fmt: skip
    _write_text_atomically(os.path.join(temporary, METADATA_FILE), json.dumps(merged_metadata, indent=1))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(temporary, final)
    _write_text_atomically(os.path.join(args.save, TRACKER_FILE), str(metadata["iteration"]))
    destroy_distributed()
    print(
        f"merged {len(layers)} adapted linears (rank {lora.rank}, alpha {lora.alpha}) of {adapter_path} "
        f"into {base_path}: {final}"
    )


if __name__ == "__main__":
    main()
