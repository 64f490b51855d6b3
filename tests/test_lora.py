"""megatron_r1.lora through finetune's setup: only adapters train, and merged weights compute
what base + adapters compute; under TP and EP the adapters compute and learn what they do in one
process."""

import torch
from sft_task import TINY_DEEPSEEK, finetune, task_records, train_task_tokenizer, write_jsonl

from megatron_r1.data.pretrain import MicroBatches
from megatron_r1.data.sft import packed_attention_inputs
from megatron_r1.distributed import destroy_distributed
from megatron_r1.finetuning import build_finetuning_data, parse_finetuning_args, setup_finetuning
from megatron_r1.lora import LoRADuplicatedLinear, adapter_layers, is_adapter_key, merge_adapters


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    data = write_jsonl(tmp_path / "copy.jsonl", task_records("copy", 200, 0))
    args = parse_finetuning_args(
        "test",
        [
            *TINY_DEEPSEEK,
            "--data-path",
            data,
            "--tokenizer-model",
            train_task_tokenizer(tmp_path),
            "--lora",
            "--lora-rank",
            "4",
            "--train-iters",
            "3",
            "--lr",
            "1e-2",
        ],
    )
    state = setup_finetuning(args)
    try:
        model = state.model[0].module
        base = {name: p.detach().clone() for name, p in model.named_parameters() if not is_adapter_key(name)}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        layers = adapter_layers(model)
        names = [name for name, module in model.named_modules() if module in layers]
        for part in ("layers.0.self_attention.linear_kv_down_proj", "layers.0.self_attention.linear_proj",
                     "layers.0.mlp.linear_fc1", "layers.1.mlp.experts.local_experts.3.linear_fc2",
                     "layers.1.mlp.shared_experts.linear_fc1", "mtp.layers.0"):  # fmt: skip
            assert any(part in name for name in names), (part, names)
        assert any(isinstance(layer, LoRADuplicatedLinear) for layer in layers)  # MLA's down-projections
        assert all(is_adapter_key(k) for k in model.sharded_state_dict(metadata={}))  # checkpoints: adapters alone

        train_dataset, valid_dataset = build_finetuning_data(args, state)
        finetune(args, state, train_dataset, valid_dataset)
        for name, param in model.named_parameters():
            if not is_adapter_key(name):
                assert torch.equal(param, base[name]), f"base weight {name} changed"
        assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
        assert all(layer.lora_b.abs().sum() > 0 for layer in layers), "an adapter did not train"

        batch = next(MicroBatches(train_dataset, 4))
        attention_mask, position_ids = packed_attention_inputs(batch["segment_ids"])
        model.eval()
        logits = []  # the output layer's last call: the main head (MTP heads come first)
        model.output_layer.register_forward_hook(lambda module, inputs, output: logits.append(output[0].clone()))
        with torch.no_grad():
            model(batch["tokens"], position_ids, attention_mask, labels=batch["labels"])  # MTP needs labels
            adapted = logits[-1]
            assert merge_adapters(model) == len(layers)
            model(batch["tokens"], position_ids, attention_mask, labels=batch["labels"])
        assert (adapted - logits[-1]).abs().max() <= 1e-5
    finally:
        destroy_distributed()
