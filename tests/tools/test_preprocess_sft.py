"""tools/preprocess_sft.py: JSONL -> indexed SFT dataset equal to the in-process rendering,
malformed lines skipped with file:line (or fatal with --strict), and finetune_r1.py trains on it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_command
from sft_task import TINY_DENSE, task_records, train_task_tokenizer, write_jsonl

from megatron_r1.data.sft import load_samples, read_sft_dataset, write_sft_dataset
from megatron_r1.tokenizer import SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "preprocess_sft.py")]
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy a b"},
                     {"role": "assistant", "content": "a b", "reasoning": "easy"}]}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A clean file (instruction and chat records) and the same records with malformed lines inside."""
    directory = tmp_path_factory.mktemp("sft")
    records = task_records("copy", 40, 0) + [CHAT]
    clean = write_jsonl(directory / "clean.jsonl", records)
    lines = [json.dumps(r) for r in records]
    lines[5:5] = ['{"instruction": "copy"}', "", "not json"]  # lines 6 (no output), 7 (blank), 8
    (directory / "dirty.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "dir": directory,
        "clean": clean,
        "dirty": str(directory / "dirty.jsonl"),
        "tokenizer": train_task_tokenizer(directory),
    }


def test_help():
    assert "--output-prefix" in run_command([*TOOL, "--help"], REPO).stdout


def test_output_equals_in_process_rendering_and_bad_lines_are_skipped_with_file_and_line(inputs, tmp_path):
    prefix = str(tmp_path / "out" / "sft")
    result = run_command(
        [*TOOL, "--input", inputs["dirty"], "--output-prefix", prefix, "--tokenizer-model", inputs["tokenizer"]],
        tmp_path,
    )
    expected = load_samples([inputs["clean"]], SentencePieceTokenizer(inputs["tokenizer"]))
    written = read_sft_dataset(prefix)
    assert len(written) == len(expected) == 41
    for (tokens, mask), (want_tokens, want_mask) in zip(written, expected):
        assert np.array_equal(tokens, want_tokens) and np.array_equal(mask, want_mask)
    tokens = sum(len(t) for t, _ in expected)
    response = sum(int(m.sum()) for _, m in expected)
    assert f"records: 41  tokens: {tokens}  response tokens: {response} " in result.stdout, result.stdout
    assert "skipped lines: 3" in result.stdout
    assert (
        f"missing_key (a text field is missing): 1  e.g. {inputs['dirty']}:6 (instruction-format record lacks 'output')"
        in result.stdout
    )
    assert f"blank_line (blank line): 1  e.g. {inputs['dirty']}:7\n" in result.stdout
    assert f"invalid_json (not a JSON object): 1  e.g. {inputs['dirty']}:8\n" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "sft.bin",
        "sft.idx",
        "sft_loss_mask.bin",
        "sft_loss_mask.idx",
    ]


def test_strict_stops_at_the_first_bad_line_and_keeps_the_previous_output(inputs, tmp_path):
    tokenizer = SentencePieceTokenizer(inputs["tokenizer"])
    previous = load_samples([inputs["clean"]], tokenizer)[:5]
    write_sft_dataset(previous, str(tmp_path / "sft"), tokenizer.vocab_size)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = subprocess.run(
        [
            *TOOL,
            "--input",
            inputs["dirty"],
            "--output-prefix",
            str(tmp_path / "sft"),
            "--strict",
            "--tokenizer-model",
            inputs["tokenizer"],
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        f"error: {inputs['dirty']}:6: missing_key (a text field is missing: instruction-format record lacks 'output'); stopped by --strict"
        in result.stderr
    )
    # Untouched, and no temporary file left behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_finetune_trains_on_the_preprocessed_prefix(inputs, tmp_path):
    prefix = str(tmp_path / "sft")
    run_command(
        [*TOOL, "--input", inputs["clean"], "--output-prefix", prefix, "--tokenizer-model", inputs["tokenizer"]],
        tmp_path,
    )
    result = run_command(
        [
            sys.executable,
            str(REPO / "finetune_r1.py"),
            *TINY_DENSE,
            "--data-path",
            prefix,
            "--tokenizer-model",
            inputs["tokenizer"],
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--split",
            "100,0,0",
        ],
        tmp_path,
    )
    assert "iteration        2/       2" in result.stdout, result.stdout
    losses = [
        float(line.split("lm loss: ")[1].split(" ")[0]) for line in result.stdout.splitlines() if "lm loss: " in line
    ]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
