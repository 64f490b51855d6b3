"""tools/make_grpo_prompts.py: --help, a real run whose file the prompt reader takes whole, the same
file for the same seed, and arguments refused before anything is written."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import run_command

from megatron_r1.data.jsonl import SkipCounter
from megatron_r1.rl.prompts import read_prompts

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "make_grpo_prompts.py")]


def test_help():
    output = run_command([*TOOL, "--help"], REPO).stdout
    assert "--num-prompts" in output and "--task" in output and "arithmetic" in output


def test_writes_prompts_the_reader_takes_whole_and_the_same_file_for_the_same_seed(tmp_path):
    output = tmp_path / "out" / "prompts.jsonl"
    arguments = ["--output", str(output), "--num-prompts", "300", "--seed", "7", "--digits", "1", "--operations", "*"]
    result = run_command([*TOOL, *arguments], tmp_path)
    assert "prompts: 300  task: arithmetic  digits: 1  operations: *  seed: 7  time: " in result.stdout
    assert result.stdout.rstrip().endswith(f"wrote {output}")
    assert "300/300" in result.stderr  # the progress bar
    skipped = SkipCounter()
    records = read_prompts([str(output)], skipped)
    assert len(records) == 300 and skipped.total == 0
    assert all(" * " in r.prompt and set(r.fields) == {"answer"} for r in records)
    first = output.read_bytes()
    run_command([*TOOL, *arguments], tmp_path)
    assert output.read_bytes() == first
    assert json.loads(first.splitlines()[0])["answer"] == str(eval(records[0].prompt[8:-1]))


def test_bad_arguments_are_refused_and_nothing_is_written(tmp_path):
    output = tmp_path / "prompts.jsonl"
    for arguments, message in [
        (["--digits", "10"], "--digits must be in [1, 9], got 10"),
        (["--operations", "+/"], "--operations must be some of +-*, got '+/'"),
        (["--num-prompts", "0"], "must be >= 1, got 0"),
    ]:
        command = [*TOOL, "--output", str(output), "--num-prompts", "5", *arguments]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not output.exists()
