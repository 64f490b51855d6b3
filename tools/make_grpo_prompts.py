"""Write a GRPO prompt file of a generated verifiable task: one JSON object per line,
{"prompt": ..., "answer": ...}, the input of grpo_r1.py --prompt-data (megatron_r1/rl/prompts.py)
whose answers the accuracy reward checks (megatron_r1/rl/rewards.py).

Tasks (megatron_r1/rl/tasks.py): arithmetic, "What is 37 + 48?" -> "85", operands of at most
--digits digits, operations from --operations. The same --seed gives the same file. The output
appears only when complete (written under a temporary name, then renamed).

Example (the bundled megatron_r1/assets/tiny_grpo.jsonl):
  python tools/make_grpo_prompts.py --output megatron_r1/assets/tiny_grpo.jsonl --num-prompts 64 --seed 0
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from tqdm import tqdm

from megatron_r1.corpus.jsonl import atomic_output, dump_line
from megatron_r1.rl.tasks import ARITHMETIC_OPERATIONS, MAX_DIGITS, TASKS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="The JSONL file to write.")
    parser.add_argument("--num-prompts", type=_positive, required=True, help="How many prompts to write.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generator (default 0).")
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic", help="The task (default arithmetic).")
    parser.add_argument(
        "--digits", type=int, default=2, help=f"arithmetic: most digits of an operand, 1 to {MAX_DIGITS} (default 2)."
    )
    parser.add_argument(
        "--operations",
        default="+-",
        help=f"arithmetic: the operations to draw from, some of {''.join(ARITHMETIC_OPERATIONS)} (default +-).",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        problems = TASKS[args.task](args.num_prompts, args.seed, digits=args.digits, operations=args.operations)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    written = 0
    try:
        with atomic_output(args.output) as output, tqdm(total=args.num_prompts, unit="prompt", desc=args.task) as bar:
            for problem in problems:
                output.write(dump_line(problem))
                written += 1
                bar.update()
    except (KeyboardInterrupt, OSError) as error:  # atomic_output has removed the partial file
        interrupted = isinstance(error, KeyboardInterrupt)
        print("interrupted: no output written" if interrupted else f"error: {error}", file=sys.stderr)
        return 130 if interrupted else 1
    seconds = max(time.perf_counter() - start, 1e-9)
    print(
        f"prompts: {written}  task: {args.task}  digits: {args.digits}  operations: {args.operations}  "
        f"seed: {args.seed}  time: {seconds:.2f} s"
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    # A plain kill (SIGTERM) cleans up like Ctrl-C: the temporary output is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
