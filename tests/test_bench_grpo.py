"""benchmarks/bench_grpo.py at its smallest: it sets up, compares rollouts with transformers on the
exported model and splits a grpo_r1.py step, printing each figure (no timing is checked)."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import run_command

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_grpo.py"
# Two prompts of different lengths: rows finish while the longer prompt's are still fed.
SMALLEST = ["--prompts", "2", "--varied-lengths", "3", "--group-size", "2", "--max-new-tokens", "4", "--warmup", "0",
            "--rounds", "1", "--grpo-iterations", "1"]  # fmt: skip
NUMBER = r"([0-9.]+(?:e[-+]\d+)?)"


def test_bench_grpo_prints_rollout_rates_and_the_step_split(tmp_path):
    output = run_command([sys.executable, str(BENCH), *SMALLEST, "--workdir", str(tmp_path)], tmp_path).stdout
    device = re.search(r"^device: .+, (float32|bfloat16); torch ", output, re.M)
    assert device, output
    same = re.search(rf"^same model: prefill logits .*: largest {NUMBER}, median position {NUMBER}$", output, re.M)
    # fp32: the same function; bf16: rounding, and at a few positions another expert on a near tie.
    assert float(same.group(1)) < 1e-4 if device.group(1) == "float32" else float(same.group(2)) < 3e-2, output
    lengths = re.search(
        r"^rollouts: 2 prompts \((\d+)-(\d+) tokens\) x 2 responses x 4 new tokens = 16 tokens", output, re.M
    )
    assert lengths and int(lengths.group(2)) == int(lengths.group(1)) + 3, output
    for name in ("megatron_r1", r"transformers \(per prompt\)", r"transformers \(all prompts\)"):
        row = re.search(rf"^{name} +{NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$", output, re.M)
        assert row and float(row.group(3)) > 0, (name, output)
    for peer in ("per prompt", "all prompts"):
        assert re.search(rf"^ratio megatron_r1 / transformers \({peer}\) tokens/s: {NUMBER} \(best", output, re.M)
    assert "GRPO step split (grpo_r1.py, iteration 1; 2 prompts x 2 responses" in output, output
    shares = re.findall(r"^  (.+?) +(-?[0-9.]+) s +(-?[0-9.]+)%$", output, re.M)
    names = [name for name, _, _ in shares]
    assert names[0] == "rollout time (s)" and "update time (s)" in names and names[-1].startswith("other"), shares
    assert abs(sum(float(share) for _, _, share in shares) - 100) < 0.5, shares
    step = float(re.search(rf"^  step \(elapsed time per iteration\) +{NUMBER} s$", output, re.M).group(1))
    assert step > 0 and re.search(rf"^  rollout tokens/s \(grpo_r1.py's figure\): {NUMBER}$", output, re.M)


def test_bench_grpo_refuses_a_group_of_one(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--group-size", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "--group-size must be at least 2, got 1" in result.stderr, result.stderr
