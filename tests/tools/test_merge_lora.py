"""tools/merge_lora.py: the merged checkpoint computes what base + adapters compute."""

import sys
from pathlib import Path

import torch

from conftest import run_command
from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.data.sft import packed_attention_inputs
from megatron_r1.distributed import destroy_distributed
from megatron_r1.finetuning import build_finetuning_data, parse_finetuning_args, setup_finetuning
from sft_task import TINY_DENSE, task_records, train_task_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _logits(argv, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_finetuning_args("test", argv)
    state = setup_finetuning(args)
    try:
        batch = next(MicroBatches(build_finetuning_data(args, state)[0], 4))
        attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
        with torch.no_grad():
            return state.model[0].module.eval()(batch["tokens"], position_ids, attention_mask)
    finally:
        destroy_distributed()


def test_merged_checkpoint_matches_base_plus_adapters(tmp_path, monkeypatch):
    common = [*TINY_DENSE, "--data-path", write_jsonl(tmp_path / "copy.jsonl", task_records("copy", 100, 0)),
              "--tokenizer-model", train_task_tokenizer(tmp_path), "--lr", "1e-2"]  # fmt: skip
    finetune = [sys.executable, str(REPO / "finetune_r1.py"), *common]
    run_command([*finetune, "--train-iters", "1", "--save", "base"], tmp_path)
    run_command([*finetune, "--train-iters", "3", "--pretrained-checkpoint", "base", "--lora", "--lora-rank", "4",
                 "--save", "lora"], tmp_path)  # fmt: skip
    result = run_command([sys.executable, str(REPO / "tools" / "merge_lora.py"), "--lora-load", "lora", "--save", "merged"], tmp_path)
    assert "merged 8 adapted linears" in result.stdout  # 2 layers x qkv, proj, fc1, fc2, result.stdout

    monkeypatch.chdir(tmp_path)
    adapted = _logits([*common, "--pretrained-checkpoint", "base", "--lora", "--lora-rank", "4", "--load", "lora",
                        "--train-iters", "3"], monkeypatch)
    merged = _logits([*common, "--pretrained-checkpoint", "merged"], monkeypatch)
    base = _logits([*common, "--pretrained-checkpoint", "base"], monkeypatch)
    assert (adapted - merged).abs().max() <= 1e-5
    assert (adapted - base).abs().max() > 1e-3  # the adapters did change the model
