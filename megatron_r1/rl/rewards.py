"""Rule-based rewards for GRPO (DeepSeek-R1, arXiv 2501.12948, section 2.2.2: an accuracy reward and
a format reward, no neural reward model), DAPO's overlong shaping (arXiv 2503.14476, eq. 13), user
reward functions named ``module:function``, and :class:`RewardComputer`, which scores a rollout batch.

A reward function is ``fn(prompt, response, fields) -> number``: ``prompt`` is the question (the
prompt record's last user turn), ``response`` the generated text without the end-of-turn or
end-of-document token, ``fields`` the prompt record's other JSON fields (e.g. ``answer``). A number
is an int, a float or a bool (True counts 1); it must be finite. User functions run in the training
process, one call per sample, with no time limit: a function that hangs hangs the run, so make them
pure and fast.

Answers (:func:`extract_answer`): the text between the response's last ``</answer>`` and the
``<answer>`` nearest before it; within it, or in a response without such a pair, the content of the
last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``). Both
searches take linear time in the response's length, whatever it holds.

Equivalence (:func:`answers_match`): two answers that both read as numbers are equal when their values
are exactly equal, otherwise they must be the same text once whitespace runs are one space and the
ends are stripped. Numbers (:func:`parse_number`): integers and decimals with an optional sign
(``+5``, ``-0.5``, ``.5``, ``3.0``, ``85.``), thousands separators in groups of three (``1,234``;
``1,23`` is not a number), fractions ``3/4`` and ``\\frac{3}{4}`` (``\\dfrac``, ``\\tfrac``); a
trailing ``%`` is ignored, so ``50%`` equals ``50`` (not 0.5). No exponents (``1e3`` is text), and
answers over 100 characters are compared as text (no huge integer conversions). Values are compared
exactly (as fractions): ``0.5`` equals ``1/2``, ``0.333`` is not ``1/3``.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

RewardFunction = Callable[[str, str, dict], float]

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = "\\boxed{"
_BRACE_DEPTH = {"{": 1, "}": -1}
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_MAX_NUMBER_CHARS = 100
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
# The numbers of running text, for final_number_reward: no nested quantifiers, linear time.
_NUMBER_IN_TEXT = re.compile(r"[+-]?\d+(?:,\d{3})*(?:\.\d+)?")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_LATEX_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?\d+)\s*\}\{\s*([+-]?\d+)\s*\}")
# <think> ... </think> then <answer> ... </answer>, each part free of its own tags, then only whitespace.
_THINK_BODY = r"(?:(?!</?think>).)*"
_ANSWER_BODY = r"(?:(?!</?answer>).)*"
_FORMAT = re.compile(rf"\s*<think>{_THINK_BODY}</think>\s*<answer>{_ANSWER_BODY}</answer>\s*", re.DOTALL)
_FORMAT_THINK_OPENED = re.compile(rf"{_THINK_BODY}</think>\s*<answer>{_ANSWER_BODY}</answer>\s*", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for position in range(begin, len(text)):
        depth += _BRACE_DEPTH.get(text[position], 0)
        if depth == 0:
            return text[begin:position]
    return None  # unbalanced: the box never closes


def _last_answer_tag(text: str) -> str | None:
    # Searched from the end (linear time, whatever the model wrote): the last closing tag and the
    # nearest opening tag before it.
    end = text.rfind(_ANSWER_CLOSE)
    start = text.rfind(_ANSWER_OPEN, 0, max(end, 0))
    return None if end < 0 or start < 0 else text[start + len(_ANSWER_OPEN) : end]


def extract_answer(response: str) -> str | None:
    """The answer a response gives (see the module docstring), or None when it gives none."""
    tagged = _last_answer_tag(response)
    if tagged is None:
        return _last_boxed(response)
    boxed = _last_boxed(tagged)
    return tagged if boxed is None else boxed


def _fraction_value(text: str) -> Fraction | None:
    match = _FRACTION.fullmatch(text)
    if match is not None:
        sign, (numerator, denominator) = "", match.groups()
    else:
        match = _LATEX_FRACTION.fullmatch(text)
        if match is None:
            return None
        sign, numerator, denominator = match.groups()
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if sign == "-" else value


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number written as the module docstring lists, or None."""
    text = text.strip().removesuffix("%").strip()
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return Fraction(text) if _DECIMAL.fullmatch(text) else _fraction_value(text)


def _normalize_text(text: str) -> str:
    return " ".join(text.split())


def answers_match(given: str, expected: str) -> bool:
    """Numeric equality when both read as numbers, else equal text up to whitespace."""
    given_value, expected_value = parse_number(given), parse_number(expected)
    if given_value is not None and expected_value is not None:
        return given_value == expected_value
    return _normalize_text(given) == _normalize_text(expected)


def accuracy_reward(prompt: str, response: str, fields: dict) -> float:
    """1.0 when the response's answer matches ``fields["answer"]`` (a string or a JSON number), else 0.0."""
    if "answer" not in fields:
        raise ValueError("the prompt record has no 'answer' field")
    expected = fields["answer"]
    if isinstance(expected, bool) or not isinstance(expected, str | int | float):
        raise ValueError(f"the 'answer' field must be a string or a number, got {type(expected).__name__}")
    given = extract_answer(response)
    return float(given is not None and answers_match(given, str(expected)))


def final_number_reward(prompt: str, response: str, fields: dict) -> float:
    """1.0 when the last number written in the response equals ``fields["answer"]`` (GSM8K-style
    grading of answers without tags, e.g. "5 + 12 = 17."), else 0.0."""
    numbers = _NUMBER_IN_TEXT.findall(response[-10_000:])  # the end of a long response holds its answer
    last = numbers[-1] if numbers else ""
    return accuracy_reward(prompt, f"{_ANSWER_OPEN}{last}{_ANSWER_CLOSE}", fields)


def format_reward(prompt: str, response: str, fields: dict, think_opened_by_prompt: bool = False) -> float:
    """1.0 when the response is ``<think>`` reasoning ``</think>`` then ``<answer>`` answer ``</answer>``
    with only whitespace around and between them (no second block, no text after), else 0.0.

    The response must open ``<think>`` itself: the R1-Zero template and the fine-tuning chat template
    end their prompts without it. For a template that ends the prompt with ``<think>``, bind
    ``think_opened_by_prompt=True`` (``functools.partial``): the response then starts inside the
    reasoning and must not open it again."""
    pattern = _FORMAT_THINK_OPENED if think_opened_by_prompt else _FORMAT
    return float(pattern.fullmatch(response) is not None)


def overlong_penalty(response_length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment (eq. 13) of a response of ``response_length`` tokens: 0 up to
    ``max_length - cache_length``, then falling linearly to -1 at ``max_length``, and -1 beyond."""
    if not 0 <= cache_length <= max_length:
        raise ValueError(f"cache_length must be in [0, max_length={max_length}], got {cache_length}")
    free_length = max_length - cache_length
    if response_length <= free_length:
        return 0.0
    if response_length <= max_length:
        return (free_length - response_length) / cache_length
    return -1.0


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "final_number": final_number_reward,
    "format": format_reward,
}


class RewardSpecError(ValueError):
    """A ``--reward-function module:function`` that names no usable function."""


def load_reward_function(spec: str) -> RewardFunction:
    """The function named by ``spec``, ``package.module:function`` (or ``module:Class.attribute``),
    imported from ``sys.path`` (the entry script's directory and PYTHONPATH: put the module's directory
    on PYTHONPATH). RewardSpecError, naming the spec, when it is malformed, the module does not
    import, the attribute is missing or is not callable."""
    module_name, separator, attribute_path = spec.partition(":")
    if not separator or not module_name.strip() or not attribute_path.strip():
        raise RewardSpecError(f"--reward-function {spec!r}: expected module:function, e.g. my_rewards:length_reward")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # any failure of the user's module (ImportError, SyntaxError, its own code)
        raise RewardSpecError(
            f"--reward-function {spec!r}: cannot import module {module_name!r}: {type(error).__name__}: {error}"
        ) from error
    owner = module_name
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise RewardSpecError(f"--reward-function {spec!r}: {owner} has no attribute {attribute!r}")
        target, owner = getattr(target, attribute), f"{owner}.{attribute}"
    if not callable(target):
        raise RewardSpecError(f"--reward-function {spec!r}: {attribute_path} is not callable ({type(target).__name__})")
    return target


class RewardError(RuntimeError):
    """A reward function that raised or returned something other than a finite number; the message
    names the function, the sample's index in the batch and the cause."""


def _why_not_a_reward(value) -> str | None:
    if not isinstance(value, numbers.Real):
        return f"returned {value!r} ({type(value).__name__}), not a number"
    if not math.isfinite(value):
        return f"returned {value!r}, not a finite number"
    return None


@dataclass
class RewardBatch:
    """A scored batch: ``totals`` (the weighted sum per sample), ``values`` (each reward's unweighted
    value per sample, by name), ``failures`` (per name, the samples that got 0 for an error under
    ``on_error="zero"``) and ``first_errors`` (per name, the first such error's message)."""

    totals: list[float]
    values: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)

    def means(self) -> dict[str, float]:
        """Each reward's mean over the batch (the accuracy and format rates of the 0/1 rewards)."""
        return {name: sum(values) / max(len(values), 1) for name, values in self.values.items()}


class RewardComputer:
    """Scores (prompt, response, fields) samples with named, weighted reward functions, and DAPO's
    overlong penalty (named ``overlong``, weight 1) when ``overlong`` = (max_length, cache_length).

    A function that raises or returns no finite number raises :class:`RewardError`; with
    ``on_error="zero"`` that sample gets 0 for that reward instead and the failure is counted."""

    def __init__(
        self,
        rewards: Sequence[tuple[str, RewardFunction, float]],
        on_error: str = "raise",
        overlong: tuple[int, int] | None = None,
    ):
        names = [name for name, _, _ in rewards] + (["overlong"] if overlong else [])
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {', '.join(names)}")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        for name, function, weight in rewards:
            if not callable(function) or not math.isfinite(weight):
                raise ValueError(f"reward {name!r} needs a function and a finite weight, got {function!r}, {weight!r}")
        if overlong is not None:
            overlong_penalty(0, *overlong)  # checks the lengths now, not at the first batch
        self.rewards, self.on_error, self.overlong = list(rewards), on_error, overlong

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        fields: Sequence[dict],
        response_lengths: Sequence[int] | None = None,
    ) -> RewardBatch:
        """Every reward of every sample; ``response_lengths`` (tokens) are needed for the overlong penalty."""
        if not len(prompts) == len(responses) == len(fields):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(fields)} fields differ")
        batch = RewardBatch(totals=[0.0] * len(responses), values={})
        for name, function, weight in self.rewards:
            values = [
                self._call(name, function, i, sample, batch) for i, sample in enumerate(zip(prompts, responses, fields))
            ]
            batch.values[name] = values
            batch.totals = [total + weight * value for total, value in zip(batch.totals, values)]
        if self.overlong is not None:
            if response_lengths is None or len(response_lengths) != len(responses):
                raise ValueError("the overlong penalty needs one response length per response")
            penalties = [overlong_penalty(length, *self.overlong) for length in response_lengths]
            batch.values["overlong"] = penalties
            batch.totals = [total + penalty for total, penalty in zip(batch.totals, penalties)]
        return batch

    def _call(self, name: str, function: RewardFunction, index: int, sample: tuple, batch: RewardBatch) -> float:
        try:
            value = function(*sample)
        except Exception as error:  # any exception of the function becomes a RewardError or a counted 0
            return self._failed(name, index, f"raised {type(error).__name__}: {error}", batch, error)
        cause = _why_not_a_reward(value)
        return float(value) if cause is None else self._failed(name, index, cause, batch)

    def _failed(self, name: str, index: int, cause: str, batch: RewardBatch, error: Exception | None = None) -> float:
        message = f"reward function {name!r} on sample {index}: {cause}"
        if self.on_error == "raise":
            raise RewardError(message) from error
        batch.failures[name] = batch.failures.get(name, 0) + 1
        batch.first_errors.setdefault(name, message)
        return 0.0
