"""tools/model_size.py: the per-component table and summary for training flags, the vocabulary from a
tokenizer, and launch-flag errors naming the flag."""

import os
import subprocess
import sys

from megatron_r1.tokenizer import train_sentencepiece

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "model_size.py")

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--num-experts", "4",
        "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4"]  # fmt: skip


def run_tool(arguments, world_size=1):
    env = {**os.environ, "WORLD_SIZE": str(world_size)}
    return subprocess.run([sys.executable, TOOL, *arguments], capture_output=True, text=True, env=env, timeout=120)


def table_row(stdout, component):
    return next(line.split() for line in stdout.splitlines() if line.startswith(component + " "))


def test_table_and_summary():
    result = run_tool(TINY + ["--vocab-size", "100"])
    assert result.returncode == 0, result.stderr
    # 100 is padded to 128 rows; the routed experts count 4 in total and 2 per token.
    assert table_row(result.stdout, "embedding")[1:3] == [f"{128 * 64:,}", "0"]
    expert = 3 * 64 * 32
    assert table_row(result.stdout, "routed_experts")[1:3] == [f"{4 * expert:,}", f"{2 * expert:,}"]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == (
        "global batch 4 x sequence 16: 64 tokens/iteration (2 micro-batches of 2 per data-parallel rank)"
    )
    assert lines[-1].startswith("total ") and "FLOPs/iteration" in lines[-1] and lines[-1].endswith(" GB/GPU")


def test_layout_and_memory_report():
    result = run_tool(
        TINY
        + [
            "--vocab-size",
            "100",
            "--pipeline-model-parallel-size",
            "2",
            "--bf16",
            "--expert-model-parallel-size",
            "2",
            "--use-distributed-optimizer",
            "--gpus-per-node",
            "2",
            "--gpu-memory-gb",
            "1",
        ],
        world_size=4,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parallel layout: 4 processes (2 nodes x 2)" in out
    assert "attention/dense: TP 1 x PP 2 x DP 2" in out
    assert "experts: ETP 1 x EP 2 x expert-DP 1 x PP 2; 2 of 4 per EP rank" in out
    # megatron-core's order tp-cp-ep-dp-pp: data-parallel ranks adjacent, stages outermost.
    assert "pipeline stage 0 (ranks 0-1): layers 0 (1 dense, 0 MoE), embedding" in out
    assert "pipeline stage 1 (ranks 2-3): layers 1 (0 dense, 1 MoE), output layer" in out
    stage_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(stage_rows) == 2 and all(len(row) == 8 for row in stage_rows)
    assert "fits in 1 GB per GPU" in out


def test_layout_that_does_not_fit_fails():
    result = run_tool(TINY + ["--vocab-size", "100", "--gpu-memory-gb", "0.0001"])
    assert result.returncode == 1
    assert "does NOT fit in 0.0001 GB per GPU" in result.stdout


def test_vocabulary_comes_from_the_tokenizer(tmp_path):
    texts = [f"sentence {i} about apples, pears and plums number {i * 7 % 13}" for i in range(200)]
    tokenizer = train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=400)
    result = run_tool(TINY + ["--tokenizer-model", str(tmp_path / "tok.model"), "--make-vocab-size-divisible-by", "64"])
    assert result.returncode == 0, result.stderr
    rows = -(-tokenizer.vocab_size // 64) * 64
    assert table_row(result.stdout, "embedding")[1] == f"{rows * 64:,}"


def test_bad_layout_names_the_flags():
    result = run_tool(
        TINY
        + ["--vocab-size", "100", "--num-layers", "3", "--moe-layer-freq", "1", "--pipeline-model-parallel-size", "2"],
        world_size=2,
    )
    assert result.returncode == 2
    assert "--num-layers (3) is not divisible by --pipeline-model-parallel-size (2)" in result.stderr
