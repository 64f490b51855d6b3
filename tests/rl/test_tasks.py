"""megatron_r1.rl.tasks: seeded arithmetic problems whose answers are right and that the reader and
the accuracy reward accept; the bundled tiny_grpo.jsonl is what the tool writes for its documented
arguments."""

import json
from pathlib import Path

import pytest

from megatron_r1.rl.prompts import parse_prompt_record
from megatron_r1.rl.rewards import accuracy_reward
from megatron_r1.rl.tasks import arithmetic_problems

ASSET = Path(__file__).resolve().parents[2] / "megatron_r1" / "assets" / "tiny_grpo.jsonl"


def test_problems_are_seeded_and_their_answers_right():
    problems = list(arithmetic_problems(200, seed=5, digits=2, operations="+-*"))
    assert problems == list(arithmetic_problems(200, seed=5, digits=2, operations="+-*"))
    assert problems != list(arithmetic_problems(200, seed=6, digits=2, operations="+-*"))
    for problem in problems:
        left, symbol, right = problem["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert 0 <= int(left) < 100 and 0 <= int(right) < 100
        assert int(problem["answer"]) == eval(f"{left} {symbol} {right}") >= 0
    assert {p["prompt"].split()[3] for p in problems} == {"+", "-", "*"}


def test_operations_and_digits_are_respected_and_checked():
    problems = list(arithmetic_problems(50, seed=0, digits=1, operations="*"))
    assert all(" * " in p["prompt"] and len(p["prompt"]) == len("What is 3 * 4?") for p in problems)
    with pytest.raises(ValueError, match="--digits"):
        arithmetic_problems(1, 0, digits=0)
    with pytest.raises(ValueError, match="--operations"):
        arithmetic_problems(1, 0, operations="+/")


def test_problems_are_prompt_records_the_accuracy_reward_checks():
    for i, problem in enumerate(arithmetic_problems(20, seed=1)):
        record = parse_prompt_record(json.loads(json.dumps(problem)), f"f:{i + 1}")
        right = f"<think>...</think><answer>{problem['answer']}</answer>"
        assert accuracy_reward(record.prompt, right, record.fields) == 1.0
        assert accuracy_reward(record.prompt, "<answer>-1</answer>", record.fields) == 0.0


def test_the_bundled_file_is_the_tools_output_for_its_documented_arguments():
    lines = ASSET.read_text().splitlines()
    assert [json.loads(line) for line in lines] == list(arithmetic_problems(64, seed=0))
