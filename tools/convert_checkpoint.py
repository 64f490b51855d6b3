"""Convert between our torch_dist checkpoints and Hugging Face transformers directories, and from
Megatron-LM's torch_dist checkpoints to ours. Export picks the architecture that represents the model
exactly: DeepseekV3ForCausalLM (MLA + MoE with shared experts and sigmoid routing, MTP layers kept) or
DeepseekV2ForCausalLM (MLA + softmax routing), else for GQA/MHA models Qwen3MoeForCausalLM,
MixtralForCausalLM, Qwen3ForCausalLM or LlamaForCausalLM; import reads each of them (the published
DeepSeek-V3 / R1 / V2 / V2-Lite, Qwen3 and Mixtral directories among them) and prints the model flags.

    # ours (any TP/PP/EP layout it was saved with) -> Hugging Face
    python tools/convert_checkpoint.py --direction mcore2hf --load ckpt [--ckpt-step N] --save hf_dir \\
        [--tokenizer-model spm.model] [--max-shard-size 5GB] [--dtype bfloat16] [--verify | --fp8]

    # Hugging Face -> ours, padded for the layout you will train with
    python tools/convert_checkpoint.py --direction hf2mcore --load hf_dir --save ckpt \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --expert-model-parallel-size 2 [--verify]
    torchrun --nproc_per_node=4 pretrain_r1.py --load ckpt --finetune --tensor-model-parallel-size 2 \\
        --expert-model-parallel-size 2 <the model flags printed by the conversion> ...

    # Megatron-LM (pretrain_gpt.py --ckpt-format torch_dist) -> ours, at its iteration
    python tools/convert_checkpoint.py --direction mlm2mcore --load mlm_save_dir [--ckpt-step N] --save ckpt
    python pretrain_r1.py --load ckpt <the flags printed by the conversion> ...   # continue (the Adam moments
                                                  # carried; else the printed command adds --no-load-optim)
    python pretrain_r1.py --load ckpt --finetune <the flags printed by the conversion> ...   # or start anew

mcore2hf reads one layer at a time (megatron-core's dist_checkpointing reassembles each tensor from
however many TP/PP/EP shards were saved and reads only the requested bytes) and writes safetensors
shards as they fill: peak memory is about one layer plus one shard, not the model (measured by
benchmarks/bench_convert.py). Padded vocabulary rows are dropped; the tokenizer files come from our
SentencePiece model. --fp8 writes DeepSeek's FP8 block format (the format of the published V3/R1
weights, which vLLM and SGLang load): every weight DeepSeek quantizes as float8_e4m3fn with a float32
weight_scale_inv per 128x128 block; the summary gives the dequantized weights' error.

hf2mcore reads bf16/fp16/fp32 weights and DeepSeek's FP8 block format (dequantized to fp32 tensor by
tensor). It runs in one process and writes a layout-independent torch_dist checkpoint (no optimizer
state: load it with --finetune); the chosen TP size fixes the vocabulary padding, and TP/PP/EP are
checked against the model. It reads a tensor (or one expert's weights) at a time and writes the
checkpoint in parts of --max-shard-size: peak memory is about one part plus one tensor in fp32, not the
model (megatron_r1/hf/import_.py; measured by benchmarks/bench_convert.py). --verify loads both whole
models, in this process, after the conversion.

mlm2mcore maps the args Megatron-LM saved in common.pt to our model flags (a setting ours cannot
represent is refused naming Megatron-LM's flag), reads the weights (Megatron-LM's stacked layers and
TransformerEngine's layer names included) and writes them with the iteration, the consumed samples,
the LR schedule and Adam's moments and step where Megatron-LM saved them per parameter: its plain
optimizer's, or its distributed optimizer's with --dist-ckpt-optim-fully-reshardable. Its distributed
optimizer's default format (dp_reshardable, bound to its DP layout) is not converted: the summary says
so, and the printed command continues with --no-load-optim (fresh moments). Not the RNG states
(megatron_r1/megatron_lm_checkpoint.py). It reads a part's worth of tensors at a time (each one
layer's slice of Megatron-LM's stacked tensor, or one expert's weights or moments; only those slices)
and writes them as a torch_dist part of --max-shard-size before reading on: peak memory is about one
part in fp32 (or one tensor, where one is larger), not the model (measured by benchmarks/bench_convert.py).

Everything is checked (architecture representable, every tensor present with the configured shape)
before anything is written; the output appears under its final name only when complete.
"""

import argparse
import json
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_r1.tokenizer import MODEL_TOKENIZER_TYPES  # noqa: E402


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--direction",
        choices=["mcore2hf", "hf2mcore", "mlm2mcore"],
        required=True,
        help="mlm2mcore: a Megatron-LM torch_dist checkpoint to ours (with its Adam moments where saved per "
        "parameter: its plain optimizer, or --dist-ckpt-optim-fully-reshardable)",
    )
    parser.add_argument(
        "--load",
        required=True,
        help="mcore2hf: our checkpoint (--save root or iter_XXXXXXX); hf2mcore: the Hugging Face directory; "
        "mlm2mcore: Megatron-LM's (--save root or iter_XXXXXXX)",
    )
    parser.add_argument("--save", required=True, help="output directory (replaced if it exists)")
    parser.add_argument(
        "--ckpt-step", type=int, default=None, help="mcore2hf, mlm2mcore: this iteration, not the latest"
    )
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="mcore2hf: SentencePiece model to export (default: the one saved with the checkpoint)",
    )
    parser.add_argument("--tokenizer-type", choices=MODEL_TOKENIZER_TYPES, default=None)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="mcore2hf: real vocabulary size (default: the tokenizer's / the checkpoint's)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=_size,
        default=_size("5GB"),
        help="mcore2hf: safetensors shard size; hf2mcore, mlm2mcore: the tensors written per torch_dist part, "
        "which bounds the memory the conversion holds",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="mcore2hf: dtype of the written weights (with --fp8: of those left unquantized)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="mcore2hf: DeepSeek's FP8 block format: the attention/MLP/expert weights as float8_e4m3fn "
        "with a float32 weight_scale_inv per 128x128 block (embeddings, norms, router, eh_proj, "
        "lm_head in --dtype); the summary reports the round-trip error",
    )
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="hf2mcore: target TP")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="hf2mcore: target PP")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1, help="hf2mcore: target EP")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="hf2mcore: vocabulary padding")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="afterwards run both models on the same random tokens (CPU, fp32) and report the max "
        "|logit difference| and top-1 agreement",
    )
    parser.add_argument("--verify-tokens", type=int, default=32, help="sequence length for --verify")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _hf2mcore(args) -> dict:
    from megatron_r1.hf.import_ import import_from_hf

    return import_from_hf(
        args.load,
        args.save,
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.make_vocab_size_divisible_by,
        max_part_bytes=args.max_shard_size,
        progress=not args.no_progress,
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.load):
        raise SystemExit(f"error: --load {args.load} does not exist")
    if os.path.abspath(args.load) == os.path.abspath(args.save):
        raise SystemExit("error: --save must differ from --load")
    if args.fp8 and args.direction != "mcore2hf":
        raise SystemExit("error: --fp8 is for mcore2hf (hf2mcore reads FP8 weights by their config.json)")
    if args.direction == "mlm2mcore" and args.verify:
        raise SystemExit("error: --verify compares with Hugging Face's model; mlm2mcore copies the weights as they are")
    if args.fp8 and args.verify:
        raise SystemExit(
            "error: --verify with --fp8: transformers runs FP8 weights only on a GPU (with FP8 "
            "activations); compare the bf16 export, the fp8 summary gives the weights' error"
        )
    from megatron_r1.checkpointing import CheckpointError, checkpoint_dir
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.hf.config import UnsupportedModelError, resolve_checkpoint
    from megatron_r1.hf.storage import WeightsError, unmap_freed_tensors

    unmap_freed_tensors()
    initialize_distributed()
    start = time.perf_counter()
    try:
        if args.direction == "mcore2hf":
            from megatron_r1.hf.export import export_to_hf

            checkpoint = (
                checkpoint_dir(args.load, args.ckpt_step)
                if args.ckpt_step is not None
                else resolve_checkpoint(args.load)
            )
            summary = export_to_hf(
                checkpoint,
                args.save,
                vocab_size=args.vocab_size,
                tokenizer_model=args.tokenizer_model,
                tokenizer_type=args.tokenizer_type,
                max_shard_bytes=args.max_shard_size,
                dtype=args.dtype,
                fp8=args.fp8,
                progress=not args.no_progress,
            )
            ours, hf_dir = checkpoint, args.save
        elif args.direction == "mlm2mcore":
            from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

            summary = convert_megatron_lm_checkpoint(
                args.load, args.save, args.ckpt_step, max_part_bytes=args.max_shard_size, progress=not args.no_progress
            )
        else:
            summary = _hf2mcore(args)
            ours, hf_dir = checkpoint_dir(args.save, 0), args.load
        summary["seconds"] = round(time.perf_counter() - start, 2)
        if args.verify:
            from megatron_r1.hf.verify import compare_logits

            summary["verify"] = compare_logits(ours, hf_dir, seq_length=args.verify_tokens)
    except (UnsupportedModelError, WeightsError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        destroy_distributed()
    flags = summary.pop("flags", None)
    print(f"converted {args.load} -> {args.save} ({args.direction})")
    print(json.dumps(summary, indent=1))
    if flags and args.direction == "mlm2mcore":
        if not summary["lr_schedule"].startswith("carried"):
            how = "--finetune"
        elif summary["optimizer"].startswith("carried"):
            how = "(to continue, with Megatron-LM's optimizer state) or --finetune"
        else:  # its moments were not carried: continue with fresh ones
            how = "--no-load-optim (to continue) or --finetune"
        print(f"model flags for pretrain_r1.py --load {args.save} {how}: " + shlex.join(flags))
    elif flags:
        print("model flags for pretrain_r1.py --load " + args.save + " --finetune: " + shlex.join(flags))


if __name__ == "__main__":
    main()
