"""benchmarks/bench_train.py at its smallest: the tiny config's trainers each print their figures and
host syncs, the ratios are judged against the targets, and --only keeps the trainers named (no
timing is checked)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import run_command

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_train.py"
SMALLEST = ["--config", "tiny", "--warmup", "0", "--rounds", "1", "--steps", "1", "--threads", "1"]
NUMBER = r"([0-9.]+)"
# implementation, step ms, best ms, spread, tokens/s, TFLOP/s, MFU, peak memory and GPU busy (GPU only), syncs
ROW = rf"^tiny +(\S+) +{NUMBER} +{NUMBER} +{NUMBER}% +{NUMBER} +{NUMBER} +{NUMBER}% +- +-  (.+)$"


def trainer_rows(output: str) -> dict[str, re.Match]:
    return {match.group(1): match for match in re.finditer(ROW, output, re.M)}


def test_bench_train_prints_every_trainers_figures_and_judges_the_targets(tmp_path):
    output = run_command([sys.executable, str(BENCH), *SMALLEST, "--moe-grouped-gemm"], tmp_path).stdout
    found = trainer_rows(output)
    assert set(found) == {"megatron_r1", "megatron_r1+gg", "transformers"}, output
    for match in found.values():
        tokens_per_s, mfu = float(match.group(5)), float(match.group(7))
        assert tokens_per_s > 0 and 0 < mfu < 100, output
    # Every trainer reads something back per step (at least the loss); transformers' per-expert loop
    # reads each expert's token count.
    assert all(re.search(r"(item|tolist) [1-9]", match.group(8)) for match in found.values()), output
    assert re.search(
        rf"^ratio --moe-grouped-gemm / SequentialMLP tokens/s: {NUMBER} \((meets|misses) the 1.00 target", output, re.M
    ), output
    assert re.search(
        r"^ratio megatron_r1\+gg / transformers tokens/s: [0-9.]+ \((meets|misses) the 0.9x CPU floor", output, re.M
    ), output


def test_bench_train_runs_only_the_trainers_named(tmp_path):
    output = run_command(
        [sys.executable, str(BENCH), *SMALLEST, "--only", "megatron_r1+gg,transformers"], tmp_path
    ).stdout
    assert set(trainer_rows(output)) == {"megatron_r1+gg", "transformers"}, output
    assert "SequentialMLP tokens/s" not in output and "ratio megatron_r1+gg / transformers" in output
    refused = subprocess.run([sys.executable, str(BENCH), "--only", "megatron"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--only: no trainer megatron (megatron_r1" in refused.stderr
