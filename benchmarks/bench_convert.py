"""Peak memory of tools/convert_checkpoint.py in every direction, mcore2hf, hf2mcore and mlm2mcore, for a
model and one 4x larger (4x the layers, same layer width): mcore2hf reads a layer at a time and writes
a safetensors shard at a time, hf2mcore reads a tensor (or one expert's weights) at a time and writes a
torch_dist part at a time, mlm2mcore reads a part's worth of weights and writes it before reading the
next, so the peak above the baseline should be about one layer plus one shard (mcore2hf), one part
plus one tensor (hf2mcore) or one part (mlm2mcore), whatever the model size.

Each conversion runs in its own process; its peak RSS is read from resource.getrusage(RUSAGE_CHILDREN).
"above baseline" subtracts the peak RSS of a process that only imports the converters and starts its
process group (python, torch, megatron-core, transformers). RSS is an honest measure here: the
checkpoint is read with read() (torch.distributed.checkpoint's FileSystemReader), not mmap, so no page
cache is counted; the file-backed part of RSS (RssFile in /proc/PID/status) stays at the shared
libraries' ~110 MiB, and the growth is anonymous memory. Besides a layer and a shard, mcore2hf holds
~60 MiB that does not depend on the model's size (transformers' DeepseekV3 code and the meta-device
model that the shapes are checked against). hf2mcore reads the exported directory of the same model
back (--max-shard-size is its part size too); mlm2mcore reads the same model (with random weights and
a vocabulary of 100) as Megatron-LM saves it, its layers stacked.

    python benchmarks/bench_convert.py [--layers 2] [--hidden-size 256] [--num-experts 16] [--workdir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 50 * 10**6  # --max-shard-size of the conversions (hf2mcore, mlm2mcore: the torch_dist part size)
BASELINE = (
    "from megatron_r1.distributed import initialize_distributed; import megatron_r1.hf.export, "
    "megatron_r1.hf.import_, megatron_r1.megatron_lm_checkpoint, transformers; initialize_distributed()"
)
# Writes the model of argv[3:] (our flags) as Megatron-LM saves it, into argv[2], with the tests' helpers
# (argv[1]: tests/): Megatron-LM's args are ours of the same names, which its flags share.
MEGATRON_LM_SAVE = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from test_megatron_lm_checkpoint import megatron_lm_args, our_args, write_megatron_lm_checkpoint

from megatron_r1.checkpointing import MODEL_FUNCTION_ARGS, MODEL_SHAPE_ARGS
from megatron_r1.distributed import initialize_distributed

initialize_distributed()
flags = sys.argv[3:]
model = {name: getattr(our_args(flags), name) for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS}
write_megatron_lm_checkpoint(flags, megatron_lm_args(**model, seq_length=16), Path(sys.argv[2]), stock_local=False)
"""


def child_peak_rss_mib(command, cwd) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `command` run as a fresh child process."""
    start = time.perf_counter()
    # A fresh grandchild per measurement: RUSAGE_CHILDREN of this wrapper holds only that command.
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=cwd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024, time.perf_counter() - start


def largest_layer_mib(hf_dir) -> float:
    """Bytes of the largest ``model.layers.N`` in the exported directory, in MiB."""
    from safetensors import safe_open

    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    per_layer = {}
    for filename in set(weight_map.values()):
        with safe_open(os.path.join(hf_dir, filename), "pt") as f:
            for name in f.keys():
                if name.startswith("model.layers."):
                    layer = int(name.split(".")[2])
                    per_layer[layer] = per_layer.get(layer, 0) + f.get_tensor(name).nbytes
    return max(per_layer.values()) / 2**20


def directory_mib(directory, suffix) -> float:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(suffix)) / 2**20


def model_flags(layers, args) -> list[str]:
    """The benchmark's model with `layers` layers, in our flags."""
    return ["--num-layers", str(layers), "--hidden-size", str(args.hidden_size), "--num-attention-heads", "8",
            "--swiglu", "--disable-bias-linear", "--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "128",
            "--kv-lora-rank", "64", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
            "--num-experts", str(args.num_experts), "--moe-ffn-hidden-size", str(2 * args.hidden_size),
            "--moe-shared-expert-intermediate-size", str(2 * args.hidden_size), "--moe-router-score-function",
            "sigmoid", "--moe-router-enable-expert-bias", "--untie-embeddings-and-output-weights",
            "--seq-length", "16"]  # fmt: skip


def make_unless_there(workdir, name, command) -> None:
    """Run `command` in `workdir`, which makes `name` there, unless there is one."""
    if not os.path.isdir(os.path.join(workdir, name)):
        subprocess.run(command, cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pretrain_checkpoint(workdir, name, flags) -> None:
    """Our checkpoint of the model of `flags` (untrained), unless there is one."""
    training = ["--mock-data", "--vocab-size", "1000", "--micro-batch-size", "1", "--train-iters", "0", "--save", name]
    make_unless_there(workdir, name, [sys.executable, os.path.join(REPO, "pretrain_r1.py"), *flags, *training])


def megatron_lm_checkpoint(workdir, name, flags) -> None:
    """The model of `flags` (random weights) as Megatron-LM saves it, unless there is one."""
    make_unless_there(
        workdir, name, [sys.executable, "-c", MEGATRON_LM_SAVE, os.path.join(REPO, "tests"), name, *flags]
    )


def convert(workdir, direction, load, save) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one tools/convert_checkpoint.py run."""
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    command = [sys.executable, tool, "--direction", direction, "--load", load, "--save", save]
    return child_peak_rss_mib([*command, "--max-shard-size", str(SHARD_BYTES), "--no-progress"], workdir)


def measure(workdir, layers, args, baseline) -> dict:
    """Every direction for the model with `layers` layers: its sizes and each direction's peak."""
    shard_mib = SHARD_BYTES / 2**20
    flags = model_flags(layers, args)
    pretrain_checkpoint(workdir, f"ckpt_{layers}", flags)
    export_peak, export_seconds = convert(workdir, "mcore2hf", f"ckpt_{layers}", f"hf_{layers}")
    hf_dir = os.path.join(workdir, f"hf_{layers}")
    size, layer_mib = directory_mib(hf_dir, ".safetensors"), largest_layer_mib(hf_dir)
    import_peak, import_seconds = convert(workdir, "hf2mcore", f"hf_{layers}", f"back_{layers}")
    checkpoint_mib = directory_mib(os.path.join(workdir, f"back_{layers}", "iter_0000000"), ".distcp")
    megatron_lm_checkpoint(workdir, f"mlm_{layers}", flags)
    mlm_peak, mlm_seconds = convert(workdir, "mlm2mcore", f"mlm_{layers}", f"from_mlm_{layers}")
    print(
        f"{layers:3d} layers: weights {size:8.1f} MiB (fp32) | mcore2hf peak RSS {export_peak:8.1f} MiB "
        f"({export_peak - baseline:7.1f} above baseline; one layer {layer_mib:.1f} + one shard {shard_mib:.1f} = "
        f"{layer_mib + shard_mib:.1f}), {export_seconds:6.1f} s | hf2mcore peak RSS {import_peak:8.1f} MiB "
        f"({import_peak - baseline:7.1f} above baseline; one part {shard_mib:.1f}; {checkpoint_mib:.1f} MiB "
        f"written), {import_seconds:6.1f} s | mlm2mcore peak RSS {mlm_peak:8.1f} MiB "
        f"({mlm_peak - baseline:7.1f} above baseline; one part {shard_mib:.1f}), {mlm_seconds:6.1f} s",
        flush=True,
    )
    return {"size": size, "mcore2hf": export_peak, "hf2mcore": import_peak, "mlm2mcore": mlm_peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the smaller model (the larger has 4x)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(workdir, exist_ok=True)
    baseline, _ = child_peak_rss_mib([sys.executable, "-c", BASELINE], REPO)
    small, large = (measure(workdir, layers, args, baseline) for layers in (args.layers, 4 * args.layers))
    print(f"baseline (imports + process group): {baseline:.1f} MiB")
    for direction in ("mcore2hf", "hf2mcore", "mlm2mcore"):
        above = (large[direction] - baseline) / max(small[direction] - baseline, 1e-9)
        print(
            f"{direction}: model size ratio {large['size'] / small['size']:.2f}x -> peak RSS ratio "
            f"{large[direction] / small[direction]:.3f}x (above baseline: {above:.3f}x); target < 1.5x"
        )
    print(f"work directory: {workdir}")


if __name__ == "__main__":
    main()
