"""tools/merge_lora.py: the merged checkpoint computes what base + adapters compute."""

import sys
from pathlib import Path

import torch
from conftest import run_command
from sft_task import TINY_DENSE, finetune, task_records, train_task_tokenizer, write_jsonl

from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.data.sft import packed_attention_inputs
from megatron_r1.distributed import destroy_distributed
from megatron_r1.finetuning import build_finetuning_data, parse_finetuning_args, setup_finetuning

REPO = Path(__file__).resolve().parents[2]


def _finetune(argv, monkeypatch, train_first=True):
    """finetune_r1.py's work in this process (as the other fine-tuning tests run it): train with
    `argv`, or only set up; returns the logits of the first training micro-batch afterwards."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_finetuning_args("test", argv)
    state = setup_finetuning(args)
    try:
        train_dataset, valid_dataset = build_finetuning_data(args, state)
        if train_first:
            finetune(args, state, train_dataset, valid_dataset)
        batch = next(MicroBatches(train_dataset, 4))
        attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
        with torch.no_grad():
            return state.model[0].module.eval()(batch["tokens"], position_ids, attention_mask)
    finally:
        destroy_distributed()


def test_merged_checkpoint_matches_base_plus_adapters(tmp_path, monkeypatch):
    common = [*TINY_DENSE, "--data-path", write_jsonl(tmp_path / "copy.jsonl", task_records("copy", 100, 0)),
              "--tokenizer-model", train_task_tokenizer(tmp_path), "--lr", "1e-2"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    base = _finetune([*common, "--train-iters", "1", "--save", "base"], monkeypatch)
    lora = [*common, "--pretrained-checkpoint", "base", "--lora", "--lora-rank", "4", "--train-iters", "3"]
    adapted = _finetune([*lora, "--save", "lora"], monkeypatch)
    result = run_command(
        [sys.executable, str(REPO / "tools" / "merge_lora.py"), "--lora-load", "lora", "--save", "merged"], tmp_path
    )
    assert "merged 8 adapted linears" in result.stdout, result.stdout  # 2 layers x qkv, proj, fc1, fc2

    reloaded = _finetune([*lora, "--load", "lora"], monkeypatch, train_first=False)  # the saved adapters
    merged = _finetune([*common, "--pretrained-checkpoint", "merged"], monkeypatch, train_first=False)
    assert torch.equal(reloaded, adapted)
    assert (adapted - merged).abs().max() <= 1e-5
    assert (adapted - base).abs().max() > 1e-3  # the adapters did change the model
