"""Checkpoints: exact resume after kill -9, interrupted saves, distributed-optimizer state,
resharding between layouts, and refusal of a mismatched model shape."""

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import run_command

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_r1.py"
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
        "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid", "--hidden-dropout", "0.1",
        "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "2"]  # fmt: skip
TWO_PROCESSES = ["torchrun", "--standalone", "--nproc_per_node=2"]


def pretrain(cwd, *argv, launcher=(sys.executable,)):
    return run_command([*launcher, str(PRETRAIN), *TINY, *argv], cwd, timeout=300).stdout


def plain_tensors(path):
    """Every tensor of a checkpoint (model and optimizer state), read in a one-process world."""
    code = (
        "import sys, torch\n"
        "from megatron.core import dist_checkpointing\n"
        "from megatron_r1.distributed import initialize_distributed\n"
        "initialize_distributed()\n"
        "tensors = dist_checkpointing.load_plain_tensors(sys.argv[1])\n"
        "torch.save({k: v for k, v in tensors.items() if torch.is_tensor(v)}, sys.argv[2])\n"
    )
    out = Path(path).parent / f"{Path(path).name}.pt"
    run_command([sys.executable, "-c", code, str(path), str(out)], Path(path).parent)
    return torch.load(out, weights_only=True)


def assert_identical(first, second):
    first, second = plain_tensors(first), plain_tensors(second)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, different
    assert any(key.startswith("optimizer") for key in first), "optimizer state missing"


def test_kill_minus_nine_after_a_save_then_rerun_is_bit_identical(tmp_path):
    pretrain(tmp_path, "--train-iters", "6", "--save", "straight")
    argv = [sys.executable, str(PRETRAIN), *TINY, "--train-iters", "6", "--save", "killed", "--save-interval", "2"]
    kill_after = random.Random(0).randint(3, 5)  # a step after the save at iteration 2
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)  # fmt: skip
    for line in process.stdout:
        if line.startswith(f" iteration {kill_after:8d}/"):
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = run_command(argv, tmp_path).stdout
    assert re.search(r"resumed from iteration [24] ", resumed), resumed
    assert_identical(tmp_path / "straight" / "iter_0000006", tmp_path / "killed" / "iter_0000006")


def test_an_interrupted_save_leaves_the_previous_checkpoint_the_latest(tmp_path):
    pretrain(tmp_path, "--train-iters", "4", "--save", "ckpt", "--exit-interval", "2")
    # What a crash in the middle of writing iteration 4 leaves behind.
    debris = tmp_path / "ckpt" / "iter_0000004.tmp"
    debris.mkdir()
    (debris / "__0_0.distcp").write_bytes(b"half a shard")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    output = pretrain(tmp_path, "--train-iters", "4", "--save", "ckpt")
    assert "resumed from iteration 2 " in output
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]


def test_distributed_optimizer_state_survives_save_and_load(tmp_path):
    two = dict(launcher=TWO_PROCESSES)
    pretrain(tmp_path, "--use-distributed-optimizer", "--train-iters", "4", "--save", "straight", **two)
    pretrain(tmp_path, "--use-distributed-optimizer", "--train-iters", "4", "--save", "resumed", "--exit-interval", "2",
             **two)  # fmt: skip
    output = pretrain(tmp_path, "--use-distributed-optimizer", "--train-iters", "4", "--save", "resumed", **two)
    assert "resumed from iteration 2 " in output
    assert_identical(tmp_path / "straight" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")


def _validation_loss(output):
    return float(re.search(r"lm loss value: (\S+)", output)[1])


def test_checkpoints_reshard_between_layouts(tmp_path):
    """Saved with TP=2 + SP: the same evaluation loss when loaded with TP=2, TP=1, EP=2 and PP=2."""
    two = dict(launcher=TWO_PROCESSES)
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    pretrain(tmp_path, *tp2, "--train-iters", "3", "--save", "ckpt", **two)
    evaluate = ["--load", "ckpt", "--skip-train", "--eval-iters", "2", "--hidden-dropout", "0.0"]
    reference = _validation_loss(pretrain(tmp_path, *tp2, *evaluate, **two))
    for layout, launcher in [([], (sys.executable,)), (["--expert-model-parallel-size", "2"], TWO_PROCESSES),
                             (["--pipeline-model-parallel-size", "2"], TWO_PROCESSES)]:  # fmt: skip
        loss = _validation_loss(pretrain(tmp_path, *layout, *evaluate, launcher=launcher))
        assert abs(loss - reference) <= 1e-5, (layout, loss, reference)


def test_a_checkpoint_of_another_shape_is_refused_naming_the_flag(tmp_path):
    pretrain(tmp_path, "--train-iters", "1", "--save", "ckpt")
    result = subprocess.run([sys.executable, str(PRETRAIN), *TINY, "--hidden-size", "64", "--train-iters", "2",
                             "--load", "ckpt"], cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0
    assert "--hidden-size 32 (checkpoint) vs 64 (now)" in result.stderr, result.stderr[-2000:]
