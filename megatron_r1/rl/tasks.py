"""Verifiable tasks small enough to train on a CPU: generated problems with their answers, written
as GRPO prompt records (``{"prompt", "answer"}``, megatron_r1/rl/prompts.py) that the accuracy reward
(megatron_r1/rl/rewards.py) checks.

``arithmetic``: "What is 37 + 48?" -> "85", operands of at most ``digits`` digits drawn uniformly,
the operation drawn from ``operations`` (``+``, ``-``, ``*``); a subtraction puts the larger
operand first, so every answer is a non-negative integer. The same seed gives the same problems
(``random.Random(seed)``; tests/rl/test_tasks.py checks that the bundled file still comes out).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator

ARITHMETIC_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
MAX_DIGITS = 9


def arithmetic_problems(count: int, seed: int, digits: int = 2, operations: str = "+-") -> Iterator[dict]:
    """``count`` records ``{"prompt": "What is A op B?", "answer": "C"}``, drawn from ``seed``; the
    arguments are checked at the call (ValueError), the records drawn as they are read."""
    if not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"--digits must be in [1, {MAX_DIGITS}], got {digits}")
    if not operations or set(operations) - set(ARITHMETIC_OPERATIONS):
        raise ValueError(f"--operations must be some of {''.join(ARITHMETIC_OPERATIONS)}, got {operations!r}")
    return _draw_arithmetic(random.Random(seed), count, digits, operations)


def _draw_arithmetic(rng: random.Random, count: int, digits: int, operations: str) -> Iterator[dict]:
    for _ in range(count):
        symbol = rng.choice(operations)
        left, right = rng.randrange(10**digits), rng.randrange(10**digits)
        if symbol == "-" and left < right:
            left, right = right, left
        yield {"prompt": f"What is {left} {symbol} {right}?", "answer": str(ARITHMETIC_OPERATIONS[symbol](left, right))}


TASKS = {"arithmetic": arithmetic_problems}
