"""A tiny synthetic fine-tuning task (copy or reverse a few letters) with its tokenizer, and the
tiny model flags the fine-tuning tests share."""

import json
import random

from megatron_r1.tokenizer import train_sentencepiece

LETTERS = "abcdefgh"

TINY_DENSE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
              "--disable-bias-linear", "--seq-length", "64", "--micro-batch-size", "4"]  # fmt: skip
TINY_DEEPSEEK = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--swiglu",
                 "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--multi-latent-attention",
                 "--q-lora-rank", "32", "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
                 "--v-head-dim", "16", "--num-experts", "4", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2",
                 "--moe-ffn-hidden-size", "64", "--moe-shared-expert-intermediate-size", "64", "--mtp-num-layers", "1",
                 "--seq-length", "64", "--micro-batch-size", "4"]  # fmt: skip


def task_records(task: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        output = letters if task == "copy" else letters[::-1]
        records.append({"instruction": task, "input": " ".join(letters), "output": " ".join(output)})
    return records


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def train_task_tokenizer(directory) -> str:
    """A SentencePiece model (with the chat special tokens) for the task's text; its path."""
    sentences = [r["input"] for r in task_records("copy", 300, 0)] + ["copy reverse"] * 20
    train_sentencepiece(sentences, str(directory / "tok"), vocab_size=300)
    return str(directory / "tok.model")


def finetune(args, state, train_dataset, valid_dataset, extensions=None, forward_step=None) -> dict:
    """finetune_r1.py's training: the loop with fine-tuning's forward step and extensions (or the
    ones given, which a test composes from fine-tuning's own)."""
    from megatron_r1.finetuning import finetuning_extensions, finetuning_forward_step
    from megatron_r1.training import train

    extensions = finetuning_extensions(args) if extensions is None else extensions
    forward_step = forward_step or finetuning_forward_step(args)
    return train(args, state, train_dataset, valid_dataset, forward_step=forward_step, extensions=extensions)
