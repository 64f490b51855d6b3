"""GRPO rollouts: megatron_r1's batched KV-cache generation vs transformers' ``generate`` on the
exported model, and where a GRPO step's time goes.

In one run, on one device (CUDA in bf16 when available, else the CPU in fp32):

1. setup: a SentencePiece tokenizer (the bundled corpus' English documents and GRPO prompts; the
   chat special tokens), a DeepSeek-V3-shaped checkpoint of the preset (its initial weights, as
   pretrain_r1.py draws them, saved by ``megatron_r1.checkpointing.write_weights_checkpoint``),
   exported to Hugging Face in process (``megatron_r1.hf.export.export_to_hf``, what
   ``tools/convert_checkpoint.py --direction mcore2hf`` runs);
2. rollouts: the first ``--prompts`` prompts of ``megatron_r1/assets/tiny_grpo.jsonl`` in the chat
   template (all of one length; ``--varied-lengths N`` gives prompt i i x N more tokens), ``--group-size``
   responses each, exactly ``--max-new-tokens`` new tokens per response,
   sampled at temperature 1 without top-k/top-p, fixed seeds:

   * megatron_r1: ``megatron_r1.rl.rollout.generate_rollouts`` (what grpo_r1.py runs: all prompts decode
     together, whatever their lengths, megatron-core's static KV cache) on the checkpoint's model; its
     stop id is one outside the vocabulary, so no response ends early;
   * transformers, per prompt: ``AutoModelForCausalLM.from_pretrained(export).generate`` with
     ``num_return_sequences=G`` per prompt, ``min_new_tokens =
     max_new_tokens`` (no early stop), its default dynamic KV cache and attention (SDPA);
   * transformers, all prompts: one ``generate`` call over every prompt (left-padded) with
     ``num_return_sequences=G``: N x G rows at once, as a batched trainer would call it.

   Both count only generated tokens (N x G x L per round, checked); prefill time is included.
   Before timing, the prompts' prefill logits of both models are compared (the same model). The
   implementations alternate round by round after warm-up rounds (load from other processes on a
   shared machine hits all alike); tokens/s is the median round's, "best" the fastest round's.
3. step-time split: ``grpo_r1.py`` for ``--grpo-iterations`` iterations from the checkpoint (same
   prompts per step, group size and max response length; the final_number and format rewards; the
   default k3 KL to the checkpoint as reference); its figures "rollout time (s)", "log-prob time
   (s)" (old and reference log-probs; when this grpo.py logs it) and "update time (s)" against the
   iteration time ("other": the rest, within the figures' rounding to 0.01 s), medians over the
   iterations after the first. Its responses stop at the end of the assistant turn, so their mean
   length is printed too.

Run:
  python benchmarks/bench_grpo.py                                   # tiny preset, ~1 minute on 2 CPU cores
  python benchmarks/bench_grpo.py --preset small --prompts 8 --group-size 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "megatron_r1" / "assets" / "tiny_grpo.jsonl"
CORPUS = REPO / "megatron_r1" / "assets" / "tiny_corpus.jsonl"
VOCAB_SIZE = 512  # the tokenizer's, as examples/model_tiny.sh's mock-data vocabulary
# Presets: examples/model_tiny.sh's flags with these values replaced.
PRESETS = {
    "tiny": {},  # 4 layers (1 dense + 3 MoE), hidden 128, 8 experts top-2, MLA
    "small": {  # 8 layers (1 dense + 7 MoE), hidden 512, 16 experts top-2: bench_train.py's 50m shape
        "--num-layers": "8", "--hidden-size": "512", "--ffn-hidden-size": "1536", "--num-attention-heads": "8",
        "--q-lora-rank": "256", "--kv-lora-rank": "128", "--qk-head-dim": "64", "--qk-pos-emb-head-dim": "32",
        "--v-head-dim": "64", "--num-experts": "16", "--moe-layer-freq": "[0]*1+[1]*7", "--moe-ffn-hidden-size": "192",
        "--moe-shared-expert-intermediate-size": "192", "--moe-router-num-groups": "4",
    },
}  # fmt: skip
OURS, PER_PROMPT, ALL_PROMPTS = "megatron_r1", "transformers (per prompt)", "transformers (all prompts)"
STEP_FIGURES = ("rollout time (s)", "log-prob time (s)", "update time (s)")


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(command, cwd, env=None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-4000:]}")
    return result.stdout


# ---------------------------------------------------------------- setup


def model_flags(preset: str, seq_length: int) -> list[str]:
    """examples/model_tiny.sh's MODEL_ARGS with the preset's values and `seq_length` positions."""
    script = 'source examples/model_tiny.sh && printf "%s\\n" "${MODEL_ARGS[@]}"'
    flags = _run(["bash", "-c", script], REPO).splitlines()
    overrides = {**PRESETS[preset], "--seq-length": str(seq_length), "--max-position-embeddings": str(seq_length)}
    for flag, value in overrides.items():
        flags[flags.index(flag) + 1] = value
    # Routing in fp32, as examples/grpo_deepseek_v3.sh and transformers' DeepseekV3 route (a no-op in fp32).
    return flags + ["--moe-router-dtype", "fp32"]


def train_tokenizer(workdir: Path) -> str:
    from megatron_r1.tokenizer import train_sentencepiece

    path = workdir / "tokenizer.model"
    if not path.exists():
        with open(CORPUS) as f:
            texts = [text for text in (json.loads(line)["text"] for line in f) if text.isascii()][:2000]
        texts += [record["prompt"] for record in prompt_records()]
        train_sentencepiece(texts, str(workdir / "tokenizer"), vocab_size=VOCAB_SIZE)
    return str(path)


def prompt_records() -> list[dict]:
    with open(PROMPTS) as f:
        return [json.loads(line) for line in f if line.strip()]


def varied_lengths(prompts: list[list[int]], step: int) -> list[list[int]]:
    """Prompt i with i x `step` more tokens after its first (the prompts' own tokens, repeated): a
    round of as many prompt lengths as prompts, as a real prompt set has."""
    filler = [token for prompt in prompts for token in prompt[1:]] or [prompts[0][0]]
    filler = filler * (1 + len(prompts) * step // len(filler))
    return [prompt[:1] + filler[: i * step] + prompt[1:] for i, prompt in enumerate(prompts)]


def rendered_prompts(tokenizer_model: str) -> list[list[int]]:
    """Every bundled GRPO prompt as grpo_r1.py renders it (chat template up to the assistant turn)."""
    from megatron_r1.rl.prompts import PromptRenderer, read_prompts
    from megatron_r1.tokenizer import build_tokenizer

    renderer = PromptRenderer(build_tokenizer("SentencePieceTokenizer", tokenizer_model), "chat")
    return [renderer.render(record) for record in read_prompts([str(PROMPTS)])]


def make_checkpoint(workdir: Path, flags: list[str], tokenizer_model: str, name: str, seed: int) -> str:
    """The preset's initial weights (drawn as pretrain_r1.py draws them) as a weights-only
    checkpoint ``workdir/name``; its iter_ directory. Needs the one-process parallel state."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.checkpointing import checkpoint_dir, write_weights_checkpoint
    from megatron_r1.model import build_model
    from megatron_r1.tokenizer import vocab_size_with_padding

    if (workdir / name / "latest_checkpointed_iteration.txt").exists():
        return checkpoint_dir(str(workdir / name), 0)
    args = parse_args("bench_grpo", [*flags, "--mock-data", "--tokenizer-type", "SentencePieceTokenizer",
                                     "--tokenizer-model", tokenizer_model, "--micro-batch-size", "1",
                                     "--seed", str(seed)])  # fmt: skip
    args.padded_vocab_size = vocab_size_with_padding(VOCAB_SIZE, args.make_vocab_size_divisible_by, 1)
    (model,) = build_model(args, device=torch.device("cpu"))
    return write_weights_checkpoint(args, model, str(workdir / name))


# ---------------------------------------------------------------- the two implementations


def load_ours(checkpoint: str, dtype):
    """The checkpoint's GPTModel without MTP layers (as tools/generate.py loads it), in `dtype`."""
    from megatron_r1.checkpointing import load_weights
    from megatron_r1.hf.config import checkpoint_args
    from megatron_r1.model import build_model

    args = checkpoint_args(checkpoint)
    args.bf16 = dtype == torch.bfloat16
    (model,) = build_model(args, with_mtp=False, initialize=False)
    load_weights(checkpoint, [model])
    return model.eval()


def load_transformers(hf_dir: str, dtype, device):
    import transformers

    transformers.logging.set_verbosity_error()  # the MTP layer's weights, which DeepseekV3ForCausalLM leaves out
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def prefill_difference(ours, theirs, prompts, device) -> tuple[float, float]:
    """|ours - transformers| of the prompts' logits, relative to the largest |logit|: the largest,
    and the median over positions of each position's largest (in bf16 a near tie of a random
    model's router can pick another expert at a few positions)."""
    differences, largest_logit = [], 0.0
    for prompt in prompts:
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(len(prompt), device=device)[None]
        our_logits = ours(tokens, positions, None)[0, :, :VOCAB_SIZE].float()
        their_logits = theirs(input_ids=tokens).logits[0, :, :VOCAB_SIZE].float()
        differences += (our_logits - their_logits).abs().amax(dim=-1).tolist()
        largest_logit = max(largest_logit, float(their_logits.abs().max()))
    return max(differences) / largest_logit, statistics.median(differences) / largest_logit


def our_rollouts(model, prompts, options):
    """A round of megatron_r1's rollouts; the number of generated tokens."""
    from megatron_r1.rl.rollout import Sampling, generate_rollouts

    def run(round_number: int) -> int:
        rollouts = generate_rollouts(
            model,
            prompts,
            0,
            options.group_size,
            options.max_new_tokens,
            VOCAB_SIZE,
            [VOCAB_SIZE],
            Sampling(1.0, 0, 1.0),
            seed=options.seed,
            iteration=round_number,
        )
        return sum(rollouts.response_lengths)

    return run


def transformers_rollouts(model, prompts, options, device, batched: bool):
    """A round of transformers' generate, per prompt or over all prompts (left-padded); the number
    of generated tokens."""
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "pad_token_id": 0,
                "num_return_sequences": options.group_size, "max_new_tokens": options.max_new_tokens,
                "min_new_tokens": options.max_new_tokens}  # fmt: skip
    batches = [[prompt] for prompt in prompts] if not batched else [prompts]
    inputs = []
    for batch in batches:
        longest = max(map(len, batch))
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch], device=device)
        inputs.append((ids, mask))

    @torch.no_grad()
    def run(round_number: int) -> int:
        torch.manual_seed(options.seed + round_number)
        generated = 0
        for ids, mask in inputs:
            output = model.generate(input_ids=ids, attention_mask=mask, **sampling)
            generated += output.shape[0] * (output.shape[1] - ids.shape[1])
        return generated

    return run


def timed_rounds(runs: dict, expected: int, options, device) -> dict[str, list[float]]:
    """Seconds of each run per round, the runs alternating round by round after warm-up rounds;
    each round must generate `expected` tokens."""
    seconds = {name: [] for name in runs}
    for round_number in range(options.warmup + options.rounds):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            generated = run(round_number)
            _synchronize(device)
            if generated != expected:
                raise SystemExit(f"{name} generated {generated} tokens in a round, not {expected}")
            if round_number >= options.warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


# ---------------------------------------------------------------- GRPO step split


def step_split(workdir: Path, flags, tokenizer_model: str, checkpoint: str, options, device) -> dict:
    """grpo_r1.py's per-iteration figures, medians over the iterations after the first."""
    command = [sys.executable, str(REPO / "grpo_r1.py"), *flags, "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", tokenizer_model, "--pretrained-checkpoint", str(Path(checkpoint).parent),
               "--prompt-data", str(PROMPTS), "--grpo-prompts-per-step", str(options.prompts),
               "--grpo-group-size", str(options.group_size), "--max-response-length", str(options.max_new_tokens),
               "--micro-batch-size", str(options.group_size), "--train-iters", str(options.grpo_iterations),
               "--log-interval", "1", "--reward", "final_number", "format", "--seed", str(options.seed)]  # fmt: skip
    # As many threads as the rollouts here had.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    output = _run(command + (["--bf16"] if device.type == "cuda" else []), workdir, env)
    iterations = []
    for line in output.splitlines():
        if re.match(r"\s*iteration\s+\d+/", line):
            iterations.append(
                {name: float(value) for name, value in re.findall(r"\| ([\w ./()-]+?): ([-+0-9.Ee]+) ", line)}
            )
    if len(iterations) != options.grpo_iterations:
        raise SystemExit(f"grpo_r1.py printed {len(iterations)} iteration lines, not {options.grpo_iterations}")
    measured = iterations[1:] or iterations
    names = {name for figures in measured for name in figures}
    return {name: statistics.median(figures[name] for figures in measured) for name in names}


# ---------------------------------------------------------------- report


def print_rollouts(seconds: dict, tokens: int) -> None:
    print(f"{'implementation':<28} {'median s':>9} {'best s':>8} {'tokens/s':>10} {'best tokens/s':>14}")
    rates = {}
    for name, rounds in seconds.items():
        rates[name] = (tokens / statistics.median(rounds), tokens / min(rounds))
        print(
            f"{name:<28} {statistics.median(rounds):>9.3f} {min(rounds):>8.3f} {rates[name][0]:>10.1f} "
            f"{rates[name][1]:>14.1f}"
        )
    for peer in (PER_PROMPT, ALL_PROMPTS):
        if peer in rates:
            print(
                f"ratio megatron_r1 / {peer} tokens/s: {rates[OURS][0] / rates[peer][0]:.2f} "
                f"(best rounds {rates[OURS][1] / rates[peer][1]:.2f})"
            )


def print_step_split(figures: dict, options) -> None:
    step = figures["elapsed time per iteration (ms)"] / 1000
    measured = "median of iterations 2-" if options.grpo_iterations > 1 else "iteration "
    print(
        f"\nGRPO step split (grpo_r1.py, {measured}{options.grpo_iterations}; {options.prompts} prompts x "
        f"{options.group_size} responses, at most {options.max_new_tokens} tokens, response length mean "
        f"{figures.get('response length mean', float('nan')):.1f}):"
    )
    parts = {name: figures[name] for name in STEP_FIGURES if name in figures}
    for name, value in [*parts.items(), ("other (rewards, batching, logging)", step - sum(parts.values()))]:
        value = round(value, 3) + 0.0  # no "-0.000": the figures are logged to 0.01 s
        print(f"  {name:<36} {value:8.3f} s  {100 * value / step:5.1f}%")
    print(f"  {'step (elapsed time per iteration)':<36} {step:8.3f} s")
    if "log-prob time (s)" not in figures:
        print("  log-prob time: not logged by this grpo.py; the old and reference log-probs are in 'other'")
    print(f"  rollout tokens/s (grpo_r1.py's figure): {figures['rollout tokens/s']:.1f}")


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny", help="model size (examples/model_tiny.sh based)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per round (and per GRPO step)")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per response")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per implementation")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--grpo-iterations", type=int, default=3, help="grpo_r1.py iterations (0: no step split)")
    parser.add_argument("--no-batched", action="store_true", help="leave out transformers over all prompts at once")
    parser.add_argument(
        "--varied-lengths",
        type=int,
        default=0,
        help="the rollout comparison's prompt i gets i x N more tokens (0: the bundled prompts, all of one length)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="keep tokenizer, checkpoint and export here (reused)")
    options = parser.parse_args(argv)
    for flag, minimum in (("prompts", 1), ("group_size", 2), ("max_new_tokens", 1), ("warmup", 0), ("rounds", 1),
                          ("grpo_iterations", 0), ("threads", 1), ("varied_lengths", 0)):  # fmt: skip
        value = getattr(options, flag)
        if value is not None and value < minimum:
            parser.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {value}")
    if options.prompts > len(prompt_records()):
        parser.error(f"--prompts: {PROMPTS.name} has {len(prompt_records())} prompts")
    return options


def compare_rollouts(workdir: Path, checkpoint: str, prompts, options, device, dtype) -> None:
    """Export, both models, the prefill check and the alternating timed rounds; prints them."""
    from megatron_r1.hf.export import export_to_hf

    hf_dir = str(workdir / f"{Path(checkpoint).parent.name}_hf")
    export_to_hf(checkpoint, hf_dir, vocab_size=VOCAB_SIZE, progress=False)
    ours, theirs = load_ours(checkpoint, dtype), load_transformers(hf_dir, dtype, device)
    parameters = sum(p.numel() for p in ours.parameters())
    print(
        f"model: {options.preset}, {parameters / 1e6:.2f}M parameters (without MTP), vocabulary {VOCAB_SIZE}; "
        f"export {hf_dir}"
    )
    largest, median = prefill_difference(ours, theirs, prompts, device)
    print(
        f"same model: prefill logits |megatron_r1 - transformers| / max |logit|: largest {largest:.2e}, "
        f"median position {median:.2e}"
    )
    runs = {
        OURS: our_rollouts(ours, prompts, options),
        PER_PROMPT: transformers_rollouts(theirs, prompts, options, device, batched=False),
    }
    if not options.no_batched:
        runs[ALL_PROMPTS] = transformers_rollouts(theirs, prompts, options, device, batched=True)
    tokens = len(prompts) * options.group_size * options.max_new_tokens
    print(
        f"rollouts: {len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x "
        f"{options.group_size} responses x {options.max_new_tokens} new tokens = {tokens} tokens per round, "
        f"temperature 1, no top-k/top-p, no early stop; {options.warmup} warm-up + {options.rounds} rounds, "
        f"alternating",
        flush=True,
    )
    print_rollouts(timed_rounds(runs, tokens, options, device), tokens)


def main(argv=None) -> None:
    options = parse_options(argv)
    import transformers

    from megatron_r1.distributed import destroy_distributed, initialize_distributed

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"device: {machine}, {str(dtype).removeprefix('torch.')}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; transformers {transformers.__version__}",
        flush=True,
    )
    temporary = None if options.workdir else tempfile.TemporaryDirectory(prefix="bench_grpo_")
    workdir = Path(options.workdir or temporary.name)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_model = train_tokenizer(workdir)
    every_prompt = rendered_prompts(tokenizer_model)
    prompts = varied_lengths(every_prompt[: options.prompts], options.varied_lengths)
    seq_length = max(128, -(-(max(map(len, every_prompt + prompts)) + options.max_new_tokens) // 64) * 64)
    flags = model_flags(options.preset, seq_length)
    initialize_distributed(seed=options.seed)
    try:
        checkpoint = make_checkpoint(
            workdir, flags, tokenizer_model, f"ckpt_{options.preset}_{seq_length}_seed{options.seed}", options.seed
        )
        compare_rollouts(workdir, checkpoint, prompts, options, device, dtype)
    finally:
        destroy_distributed()
    if options.grpo_iterations:
        print_step_split(step_split(workdir, flags, tokenizer_model, checkpoint, options, device), options)
    if device.type == "cpu":
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (a shared machine slows every side alike)")
    if temporary is not None:
        temporary.cleanup()


if __name__ == "__main__":
    sys.exit(main())
