import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY_GPT_WORKER = Path(__file__).parent / "workers" / "train_tiny_gpt.py"


def run_command(cmd, cwd, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stderr[-6000:]}"
    return result


class TinyGPTRuns:
    """Runs tests/workers/train_tiny_gpt.py: one single-process reference per model variant
    (cached for the session), and multi-process layouts compared against it."""

    def __init__(self, tmp_path_factory, steps=4):
        self.tmp_path_factory = tmp_path_factory
        self.steps = steps
        self._references = {}

    def reference(self, variant_args=()):
        key = tuple(variant_args)
        if key not in self._references:
            workdir = self.tmp_path_factory.mktemp("reference")
            run_command(
                [sys.executable, str(TINY_GPT_WORKER), *variant_args, "--steps", str(self.steps),
                 "--init-dir", "init", "--grads-dir", "grads", "--out", "result.json"],
                workdir,
            )  # fmt: skip
            self._references[key] = workdir, json.loads((workdir / "result.json").read_text())
        return self._references[key]

    def parallel(self, variant_args, layout_args, workdir, nproc=2):
        reference_dir, _ = self.reference(variant_args)
        run_command(
            ["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(TINY_GPT_WORKER),
             *variant_args, *layout_args, "--steps", str(self.steps), "--load-init",
             "--init-dir", str(reference_dir / "init"), "--grads-dir", "grads",
             "--compare-grads-to", str(reference_dir / "grads"), "--out", "result.json"],
            workdir,
        )  # fmt: skip
        return json.loads((workdir / "result.json").read_text())

    def assert_layout_matches(self, variant_args, layout_args, workdir, tolerance=1e-5, nproc=2):
        """Losses of every step and (except with the distributed optimizer) every parameter's
        first-step gradient equal the single-process run's; returns the nproc-process result."""
        _, reference = self.reference(variant_args)
        result = self.parallel(variant_args, layout_args, workdir, nproc)
        loss_diffs = [abs(a - b) for a, b in zip(result["losses"], reference["losses"])]
        assert len(loss_diffs) == self.steps and max(loss_diffs) <= tolerance, loss_diffs
        if "--distributed-optimizer" not in layout_args:
            assert result["grad_rel_diff"], "no gradients compared"
            worst = max(result["grad_rel_diff"].items(), key=lambda item: item[1])
            assert worst[1] <= tolerance, worst
        return result


@pytest.fixture(scope="session")
def tiny_gpt_runs(tmp_path_factory):
    return TinyGPTRuns(tmp_path_factory)
