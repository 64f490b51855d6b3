"""megatron_r1.rl.rewards: answer extraction and equivalence, the accuracy and format rewards, DAPO's
overlong penalty, loading user functions by spec, and RewardComputer's scoring and error reports."""

import functools
import math
import sys
import time
from fractions import Fraction

import pytest

from megatron_r1.rl.rewards import (
    RewardComputer,
    RewardError,
    RewardSpecError,
    accuracy_reward,
    answers_match,
    extract_answer,
    final_number_reward,
    format_reward,
    load_reward_function,
    overlong_penalty,
    parse_number,
)

GOOD = "<think>48 + 37: 7 + 8 = 15, carry 1</think>\n<answer>85</answer>\n"


@pytest.mark.parametrize(
    "response, answer",
    [
        ("<answer>12</answer> then <answer> 85 </answer>", " 85 "),
        ("so \\boxed{3} no, \\boxed{\\frac{1}{2}} at last", "\\frac{1}{2}"),
        ("<answer>the result is \\boxed{{7}}</answer>", "{7}"),
        ("<answer>x</answer> and later \\boxed{9}", "x"),  # the answer tag wins over a box outside it
        ("<answer>a <answer>b</answer>", "b"),
        ("<answer>a", None),
        ("\\boxed{unclosed {", None),
        ("85", None),
    ],
)
def test_extract_answer_takes_the_last_answer_tag_or_balanced_box(response, answer):
    assert extract_answer(response) == answer


NUMBERS = {
    "1,234": 1234, "+5": 5, "3.0": 3, "-0.50": Fraction(-1, 2), ".5": Fraction(1, 2), "85.": 85,
    "1e3": None, "9" * 101: None,
    "3/4": Fraction(3, 4), "-\\frac{3}{4}": Fraction(-3, 4), "\\dfrac{6}{8}": Fraction(3, 4), "50%": 50,
    "1,234,567.5": Fraction(2469135, 2), "1,23": None, "1/0": None, "x = 5": None, "": None,
}  # fmt: skip


@pytest.mark.parametrize("text", NUMBERS)
def test_parse_number(text):
    assert parse_number(text) == NUMBERS[text]


@pytest.mark.parametrize(
    "given, expected, match",
    [
        ("1,234", "1234", True),
        ("0.5", "1/2", True),
        ("  42 ", "42.0", True),
        ("0.333", "1/3", False),
        ("New   York", " New York ", True),
        ("new york", "New York", False),
        ("7", "8", False),
    ],
)
def test_answers_match(given, expected, match):
    assert answers_match(given, expected) is match


def test_accuracy_reward():
    assert accuracy_reward("q", GOOD, {"answer": "85"}) == 1.0
    assert accuracy_reward("q", GOOD, {"answer": 85}) == 1.0  # a JSON number
    assert accuracy_reward("q", GOOD, {"answer": "86"}) == 0.0
    assert accuracy_reward("q", "85", {"answer": "85"}) == 0.0  # no answer given in a tag or box
    with pytest.raises(ValueError, match="no 'answer' field"):
        accuracy_reward("q", GOOD, {})
    with pytest.raises(ValueError, match="got list"):
        accuracy_reward("q", GOOD, {"answer": [85]})


@pytest.mark.parametrize(
    "response, reward",
    [
        (GOOD, 1.0),
        ("<think>\n</think><answer></answer>", 1.0),
        (GOOD + "trailing text", 0.0),
        ("preamble " + GOOD, 0.0),
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think>a</think> text <answer>1</answer>", 0.0),
        ("<think>a<think>b</think><answer>1</answer>", 0.0),
        ("<answer>1</answer>", 0.0),
        ("reasoning</think><answer>1</answer>", 0.0),
    ],
)
def test_format_reward(response, reward):
    assert format_reward("q", response, {}) == reward


def test_format_reward_when_the_prompt_opens_the_reasoning():
    opened = functools.partial(format_reward, think_opened_by_prompt=True)
    assert opened("q", "reasoning</think> <answer>1</answer>", {}) == 1.0
    assert opened("q", GOOD, {}) == 0.0  # <think> again


def test_overlong_penalty_follows_dapo_eq_13():
    assert overlong_penalty(60, 100, 40) == 0.0
    assert overlong_penalty(70, 100, 40) == pytest.approx(-10 / 40)
    assert overlong_penalty(100, 100, 40) == -1.0
    assert overlong_penalty(101, 100, 40) == -1.0
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(1, 10, 20)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompt, response, fields):\n    return len(response)\n"
        "class Holder:\n    @staticmethod\n    def one(prompt, response, fields):\n        return 1\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_load_reward_function_by_spec(user_module):
    assert load_reward_function("my_rewards:length")("q", "abc", {}) == 3
    assert load_reward_function("my_rewards:Holder.one")("q", "", {}) == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("my_rewards", "expected module:function"),
        ("my_rewards:", "expected module:function"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
        ("broken_rewards:oops", "cannot import module 'broken_rewards': SyntaxError"),
        ("my_rewards:missing", "my_rewards has no attribute 'missing'"),
        ("my_rewards:Holder.two", "my_rewards.Holder has no attribute 'two'"),
        ("my_rewards:NOT_CALLABLE", "NOT_CALLABLE is not callable (int)"),
    ],
)
def test_load_reward_function_errors_name_the_spec(user_module, spec, message):
    with pytest.raises(RewardSpecError) as error:
        load_reward_function(spec)
    assert str(error.value).startswith(f"--reward-function {spec!r}: ") and message in str(error.value)


def test_adversarial_responses_are_scored_in_linear_time():
    responses = ["<think>" + "<answer>" * 20000 + "</think><answer>" * 20000, "1" * 200000 + "x", "\\boxed{" * 50000]
    started = time.perf_counter()
    for response in responses:
        accuracy_reward("q", response, {"answer": "1" * 1000 + "x"})
        format_reward("q", response, {})
        parse_number(response)
    assert time.perf_counter() - started < 2  # quadratic searches took minutes


def _batch(responses):
    return ["q"] * len(responses), responses, [{"answer": "85"}] * len(responses)


def test_reward_computer_weights_rewards_and_reports_each_one():
    computer = RewardComputer([("accuracy", accuracy_reward, 1.0), ("format", format_reward, 0.5)])
    batch = computer.score(*_batch([GOOD, "<answer>85</answer>", "<think></think><answer>7</answer>", "no"]))
    assert batch.totals == [1.5, 1.0, 0.5, 0.0]
    assert batch.values == {"accuracy": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert batch.means() == {"accuracy": 0.5, "format": 0.5}
    assert batch.failures == {}


def test_reward_computer_adds_the_overlong_penalty():
    computer = RewardComputer([("accuracy", accuracy_reward, 1.0)], overlong=(100, 40))
    batch = computer.score(*_batch([GOOD, GOOD]), response_lengths=[10, 80])
    assert batch.totals == [1.0, 0.5] and batch.values["overlong"] == [0.0, -0.5]
    with pytest.raises(ValueError, match="one response length per response"):
        computer.score(*_batch([GOOD]))


def _raises(prompt, response, fields):
    raise KeyError("score")


@pytest.mark.parametrize(
    "function, cause",
    [
        (_raises, "raised KeyError: 'score'"),
        (lambda p, r, f: "1.0", "returned '1.0' (str), not a number"),
        (lambda p, r, f: None, "returned None (NoneType), not a number"),
        (lambda p, r, f: math.nan, "returned nan, not a finite number"),
        (lambda p, r, f: -math.inf, "returned -inf, not a finite number"),
    ],
)
def test_a_bad_reward_function_is_an_error_naming_it_and_the_sample(function, cause):
    computer = RewardComputer([("accuracy", accuracy_reward, 1.0), ("mine", function, 1.0)])
    with pytest.raises(RewardError) as error:
        computer.score(*_batch([GOOD, GOOD]))
    assert str(error.value) == f"reward function 'mine' on sample 0: {cause}"


def test_on_error_zero_counts_the_failures_and_gives_zero():
    flaky = lambda prompt, response, fields: 1 / 0 if response == "bad" else True  # a bool counts as 1
    computer = RewardComputer([("flaky", flaky, 2.0)], on_error="zero")
    batch = computer.score(*_batch(["ok", "bad", "bad"]))
    assert batch.totals == [2.0, 0.0, 0.0] and batch.values["flaky"] == [1.0, 0.0, 0.0]
    assert batch.failures == {"flaky": 2}
    assert batch.first_errors == {
        "flaky": "reward function 'flaky' on sample 1: raised ZeroDivisionError: division by zero"
    }


def test_reward_computer_refuses_bad_configurations():
    with pytest.raises(ValueError, match="unique"):
        RewardComputer([("a", accuracy_reward, 1.0), ("a", format_reward, 1.0)])
    with pytest.raises(ValueError, match="on_error"):
        RewardComputer([], on_error="ignore")
    with pytest.raises(ValueError, match="finite weight"):
        RewardComputer([("a", accuracy_reward, math.nan)])
    with pytest.raises(ValueError, match="cache_length"):
        RewardComputer([], overlong=(10, 20))


@pytest.mark.parametrize(
    ("response", "reward"),
    [("5 + 12 = 17.", 1.0), ("17 is it, not 18", 0.0), ("1,234 then 17", 1.0), ("seventeen", 0.0),
     ("<answer>16</answer> 17.0", 1.0), ("", 0.0)],
)  # fmt: skip
def test_final_number_reward_grades_the_last_number(response, reward):
    assert final_number_reward("q", response, {"answer": "17"}) == reward
