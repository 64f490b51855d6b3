"""tools/model_size.py: the per-component table and summary for training flags, the vocabulary from a
tokenizer, and launch-flag errors naming the flag; with --grpo, the reference policy, KV cache and
rollout logits against hand computation, and grpo_r1.py's flags checked as it checks them."""

import os
import subprocess
import sys

import pytest

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


# A dense model with a 64K vocabulary, sized as GRPO would run it: 8 heads of 128 channels, fp32.
GRPO = ["--num-layers", "2", "--hidden-size", "1024", "--num-attention-heads", "8", "--ffn-hidden-size", "4096",
        "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--vocab-size", "65536",
        "--micro-batch-size", "1", "--grpo", "--prompt-data", os.path.join(REPO_ROOT, "megatron_r1", "assets",
        "tiny_grpo.jsonl"), "--pretrained-checkpoint", "ckpt", "--grpo-prompts-per-step", "1"]  # fmt: skip


def grpo_line(stdout, start):
    return next(line.strip() for line in stdout.splitlines() if line.strip().startswith(start))


def grpo_report(group, seq_length, response, *flags):
    result = run_tool(GRPO + ["--grpo-group-size", str(group), "--seq-length", str(seq_length),
                              "--max-position-embeddings", str(seq_length), "--max-response-length", str(response),
                              *flags])  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpo_report_counts_the_reference_kv_cache_and_logits():
    out = grpo_report(16, 8192, 8064)
    # One group's cache: 16 sequences x 8192 tokens x 2 layers x (K + V of 8 heads x 128) x 4 bytes.
    kv = 16 * 8192 * 2 * 2048 * 4
    assert grpo_line(out, "rollout KV cache:").startswith(
        f"rollout KV cache: {kv / 1e9:.2f} GB (16 sequences (1 prompt(s) x group 16) x 8192 tokens"
    )
    # The prefill's logits: 16 x (8192 - 8064) prompt positions x 65536 entries x 4 bytes, twice.
    logits = 2 * 16 * 128 * 65536 * 4
    assert grpo_line(out, "rollout activations:").startswith(
        f"rollout activations: {logits / 1e9:.2f} GB (the prefill's"
    )
    # The table: stage, dense/expert params, weights, grads, optimizer, activations, reference, KV cache,
    # rollout activations, total.
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["0"])
    weights, grads, optimizer, activations, reference, kv_column, logits_column, total = map(float, row[3:])
    assert (kv_column, logits_column) == (round(kv / 1e9, 2), round(logits / 1e9, 2))
    assert reference == weights  # no MTP layers: a second copy of exactly the policy's weights
    line = grpo_line(out, "reference policy:")
    assert line.startswith(f"reference policy: {row[7]} GB (fp32 weights") and "--kl-coef 0.001" in line
    # Rollouts and updates take turns: the total is the larger phase over the persistent state.
    assert total == pytest.approx(
        weights + grads + optimizer + reference + max(activations, (kv + logits) / 1e9), abs=0.02
    )


def test_grpo_kv_cache_line_scales_with_group_and_length():
    """Twice the group or twice the tokens (prompt + response) of the previous test's 2.15 GB."""
    for group, seq_length, response in ((32, 8192, 8064), (16, 16384, 16256)):
        line = grpo_line(grpo_report(group, seq_length, response), "rollout KV cache:")
        assert float(line.split()[3]) == round(group * seq_length * 2 * 2048 * 4 / 1e9, 2) == 4.29


@pytest.mark.parametrize(
    "flags, line",
    [(["--kl-coef", "0"], "reference policy: none (--kl-coef 0: no KL term)"),
     (["--lora", "--transformer-impl", "local"], "reference policy: none (--lora: the policy with its adapters off)")],
)  # fmt: skip
def test_grpo_report_without_a_reference(flags, line):
    out = grpo_report(16, 8192, 8064, *flags)
    assert line in out
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["0"])
    assert row[7] == "0.00"  # the reference column


@pytest.mark.parametrize(
    "flags, world_size, message",
    [(["--grpo-group-sise", "4"], 1, "--grpo-group-sise: unknown flag (did you mean --grpo-group-size?)"),
     (["--pipeline-model-parallel-size", "2", "--num-layers", "2"], 2, "does not support pipeline parallelism"),
     (["--prompt-data", "no_such_prompts.jsonl"], 1, "--prompt-data: no_such_prompts.jsonl does not exist"),
     (["--global-batch-size", "4"], 1, "--global-batch-size (4) is --grpo-prompts-per-step x --grpo-group-size")],
)  # fmt: skip
def test_grpo_flags_are_checked_as_grpo_r1_checks_them(flags, world_size, message):
    result = run_tool(GRPO + ["--seq-length", "64", "--max-response-length", "32"] + flags, world_size=world_size)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_grpo_flags_without_grpo_are_refused_naming_it():
    result = run_tool(TINY + ["--vocab-size", "100", "--kl-coef", "0", "--grpo-group-size", "4"])
    assert result.returncode == 2
    assert "--kl-coef, --grpo-group-size: grpo_r1.py's, not pretrain_r1.py's: add --grpo" in result.stderr


def test_hf_config_gives_the_model_that_hf2mcore_would_and_later_flags_override_it(tmp_path):
    """The tiny model's config.json (as export writes it) sizes as the tiny model's own flags do; a
    config.json no model represents is one error naming it."""
    import json

    from megatron_r1.arguments import build_parser
    from megatron_r1.hf.config import export_fields

    flags = [*TINY, "--qk-layernorm", "--vocab-size", "100"]
    args = build_parser("").parse_args(flags)
    args.max_position_embeddings, args.virtual_pipeline_model_parallel_size = args.seq_length, None
    (tmp_path / "config.json").write_text(json.dumps(export_fields(args, 100)))
    run = ["--mock-data", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4"]
    from_config, from_flags = run_tool(["--hf-config", str(tmp_path / "config.json"), *run]), run_tool(flags)
    assert from_config.returncode == 0, from_config.stderr
    assert from_config.stdout == from_flags.stdout
    (tmp_path / "config.json").write_text(json.dumps({**export_fields(args, 100), "hidden_act": "gelu"}))
    refused = run_tool(["--hf-config", str(tmp_path / "config.json"), *run])
    assert refused.returncode != 0 and f"--hf-config: {tmp_path / 'config.json'}: hidden_act 'gelu'" in refused.stderr
