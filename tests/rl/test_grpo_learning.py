"""Issue 17's learning test: GRPO raises the accuracy of a tiny SFT'd model on held-out prompts of the
bundled arithmetic task by at least 0.3, through the entry points (finetune_r1.py, then grpo_r1.py).

The task is one-digit addition (megatron_r1.rl.tasks.arithmetic_problems, digits 1, operation +): its
100 facts ("What is 3 + 4?" -> "7"), shuffled once with a fixed seed, 70 of them GRPO's prompts and
30 held out. Held out means GRPO never samples, scores or trains on those prompts; the SFT data has
every fact, 4 times: once answered the way the accuracy reward reads ("<answer>7</answer>"), 3
times bare ("7"). The SFT'd model thus knows the sums but, greedily, answers bare (the likelier
form), which the accuracy reward scores 0; at temperature 1 about a quarter of its samples carry the
tags. GRPO (rewards: accuracy; KL coefficient 0) has to find in the reward that the tagged form pays
and move the policy to it on its 70 prompts, and the change must carry over to the 30 others.

Accuracy: the project's greedy generation (megatron_r1.generation: load_model + generate) of each
held-out prompt in the chat template that GRPO renders, scored by the project's accuracy_reward
against the "answer" field; of the SFT checkpoint (before) and of GRPO's (after).

Measured (2 CPU cores shared with other work, one thread per process): before 0.00 and after
0.83-0.93 for seeds 1-7 (this test's seed 1: 0.867, the same in every run), 30-50 s in all (SFT 500
iterations, GRPO 20 iterations of 4 prompts x 8 responses)."""

import argparse
import random
import sys
from pathlib import Path

import torch
from conftest import run_command
from sft_task import write_jsonl

REPO = Path(__file__).resolve().parents[2]
SEED = 1
HELD_OUT = 30
# One thread per process: results do not depend on the machine's cores, and no threads spin against
# the other tests' processes.
ONE_THREAD = ["env", "OMP_NUM_THREADS=1"]
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
        "--seq-length", "64", "--hidden-dropout", "0", "--attention-dropout", "0", "--seed", str(SEED)]  # fmt: skip
SFT = ["--train-iters", "500", "--micro-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "10", "--min-lr", "3e-4",
       "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "100"]  # fmt: skip
GRPO = ["--train-iters", "20", "--grpo-prompts-per-step", "4", "--grpo-group-size", "8", "--micro-batch-size", "32",
        "--max-response-length", "8", "--temperature", "1", "--lr", "3e-4", "--kl-coef", "0", "--reward", "accuracy",
        "--loss-agg-mode", "token-mean", "--log-interval", "5"]  # fmt: skip


def one_digit_sums() -> list[dict]:
    """The 100 facts of one-digit addition, as the task's records, in a fixed shuffled order."""
    from megatron_r1.rl.tasks import arithmetic_problems

    facts = list({r["prompt"]: r for r in arithmetic_problems(1000, seed=0, digits=1, operations="+")}.values())
    assert len(facts) == 100  # 1000 draws hold every one of the 100 sums
    random.Random(0).shuffle(facts)
    return facts


def answer_forms(fact: dict) -> tuple[str, str]:
    """The answer as the accuracy reward reads it, and bare."""
    return f"<answer>{fact['answer']}</answer>", fact["answer"]


def sft_conversations(facts: list[dict]) -> list[dict]:
    """Each fact 4 times: once with the answer in the tags the accuracy reward reads, 3 times bare."""
    records = [{"messages": [{"role": "user", "content": fact["prompt"]},
                             {"role": "assistant", "content": answer_forms(fact)[copy > 0]}]}
               for copy in range(4) for fact in facts]  # fmt: skip
    random.Random(SEED).shuffle(records)
    return records


def task_tokenizer(directory: Path, facts: list[dict]) -> str:
    """A SentencePiece model of the task's text (digits split; the answer tags single tokens)."""
    from megatron_r1.tokenizer import SPECIAL_TOKENS, train_sentencepiece

    sentences = [f["prompt"] for f in facts] + [form for f in facts for form in answer_forms(f)]
    symbols = (*SPECIAL_TOKENS, "<answer>", "</answer>")
    train_sentencepiece(sentences, str(directory / "tok"), vocab_size=310, user_defined_symbols=symbols)
    return str(directory / "tok.model")


def greedy_accuracy(save_dir: Path, tokenizer_model: str, records: list[dict]) -> float:
    """The mean accuracy reward of the greedy answers (at most 8 tokens) of the latest checkpoint in
    `save_dir` to `records`, each rendered as GRPO renders its prompts."""
    from megatron_r1.checkpointing import find_checkpoint
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.generation import generate, load_model
    from megatron_r1.rl.prompts import PromptRenderer, parse_prompt_record
    from megatron_r1.rl.rewards import accuracy_reward
    from megatron_r1.tokenizer import build_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    initialize_distributed()
    try:
        args, model = load_model(find_checkpoint(argparse.Namespace(load=str(save_dir), ckpt_step=None)))
        renderer = PromptRenderer(build_tokenizer(args.tokenizer_type, tokenizer_model), "chat")
        total = 0.0
        for number, record in enumerate(records):
            prompt = parse_prompt_record(record, f"held-out:{number}")
            ids = generate(model, renderer.render(prompt), 8, args.vocab_size, stop_ids=renderer.stop_ids)
            response = renderer.tokenizer.detokenize([i for i in ids if i not in renderer.stop_ids])
            total += accuracy_reward(prompt.prompt, response, prompt.fields)
        return total / len(records)
    finally:
        destroy_distributed()
        torch.set_num_threads(threads)


def test_grpo_raises_held_out_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    facts = one_digit_sums()
    held_out, grpo_prompts = facts[:HELD_OUT], facts[HELD_OUT:]
    tokenizer = task_tokenizer(tmp_path, facts)
    common = [*ONE_THREAD, sys.executable]
    run_command([*common, str(REPO / "finetune_r1.py"), *TINY, *SFT, "--tokenizer-model", tokenizer,
                 "--data-path", write_jsonl(tmp_path / "sft.jsonl", sft_conversations(facts)), "--save", "sft"],
                tmp_path)  # fmt: skip
    before = greedy_accuracy(tmp_path / "sft", tokenizer, held_out)
    run_command([*common, str(REPO / "grpo_r1.py"), *TINY, *GRPO, "--tokenizer-model", tokenizer,
                 "--pretrained-checkpoint", "sft", "--prompt-data", write_jsonl(tmp_path / "prompts.jsonl", grpo_prompts),
                 "--save", "grpo"], tmp_path)  # fmt: skip
    after = greedy_accuracy(tmp_path / "grpo", tokenizer, held_out)
    print(f"held-out accuracy: before GRPO {before:.3f}, after {after:.3f}")
    assert after - before >= 0.3, (before, after)
