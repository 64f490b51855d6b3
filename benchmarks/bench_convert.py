"""Peak memory of tools/convert_checkpoint.py --direction mcore2hf for a model and one 4x larger
(4x the layers, same layer width): conversion streams a layer at a time, so the peak should not grow
with the model. Each conversion runs in its own process; its peak RSS is read from
resource.getrusage(RUSAGE_CHILDREN). "above baseline" subtracts the peak RSS of a process that only
imports the converter and starts its process group (python, torch, megatron-core, transformers).

    python benchmarks/bench_convert.py [--layers 2] [--hidden-size 256] [--num-experts 16] [--workdir DIR]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_peak_rss_mib(command, cwd) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `command` run as a fresh child process."""
    start = time.perf_counter()
    # A fresh grandchild per measurement: RUSAGE_CHILDREN of this wrapper holds only that command.
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=cwd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the smaller model (the larger has 4x)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    baseline, _ = child_peak_rss_mib([sys.executable, "-c", "from megatron_r1.distributed import initialize_distributed; "
                                      "import megatron_r1.hf.export, transformers; initialize_distributed()"], REPO)  # fmt: skip
    results = []
    for layers in (args.layers, 4 * args.layers):
        name = f"ckpt_{layers}"
        model = ["--mock-data", "--vocab-size", "1000", "--num-layers", str(layers), "--hidden-size", str(args.hidden_size),
                 "--num-attention-heads", "8", "--swiglu", "--disable-bias-linear", "--multi-latent-attention",
                 "--qk-layernorm", "--q-lora-rank", "128", "--kv-lora-rank", "64", "--qk-head-dim", "32",
                 "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32", "--num-experts", str(args.num_experts),
                 "--moe-ffn-hidden-size", str(2 * args.hidden_size), "--moe-shared-expert-intermediate-size",
                 str(2 * args.hidden_size), "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                 "--untie-embeddings-and-output-weights", "--seq-length", "16", "--micro-batch-size", "1",
                 "--train-iters", "0", "--save", name]  # fmt: skip
        if not os.path.isdir(os.path.join(workdir, name)):
            subprocess.run([sys.executable, os.path.join(REPO, "pretrain_r1.py"), *model], cwd=workdir, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        peak, seconds = child_peak_rss_mib([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
                                            "--direction", "mcore2hf", "--load", name, "--save", f"hf_{layers}",
                                            "--max-shard-size", "50MB", "--no-progress"], workdir)  # fmt: skip
        hf_dir = os.path.join(workdir, f"hf_{layers}")
        size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        results.append((layers, size / 2**20, peak, seconds))
        print(f"{layers:3d} layers: weights {size / 2**20:8.1f} MiB | peak RSS {peak:8.1f} MiB "
              f"({peak - baseline:7.1f} above baseline) | {seconds:6.1f} s", flush=True)  # fmt: skip
    (small_layers, small_size, small_peak, _), (_, large_size, large_peak, _) = results
    print(f"baseline (imports + process group): {baseline:.1f} MiB")
    print(f"model size ratio {large_size / small_size:.2f}x -> peak RSS ratio {large_peak / small_peak:.3f}x "
          f"(above baseline: {(large_peak - baseline) / max(small_peak - baseline, 1e-9):.3f}x); target < 1.5x")
    print(f"work directory: {workdir}")


if __name__ == "__main__":
    main()
