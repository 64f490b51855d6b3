"""Model construction: megatron-core's GPTModel from our specs, label smoothing, and where
build_model places every chunk (the layouts: tests/test_layouts.py)."""

import json


def test_label_smoothing_applies_to_training_loss_only():
    """Smoothed loss = (1 - eps') * CE + eps' * mean(-log p) over the vocabulary, as megatron's
    vocab_parallel_cross_entropy defines eps' = eps * V / (V - 1)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_gpt_model

    initialize_distributed()
    try:
        config = TransformerConfig(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            use_cpu_initialization=True,
        )
        model = build_gpt_model(config, vocab_size=64, max_sequence_length=16, label_smoothing=0.2)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        labels = torch.roll(tokens, -1, dims=1)
        positions = torch.arange(16).expand(2, 16)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, positions, None)  # [b, s, V]
            plain = model(tokens, positions, None, labels=labels)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        cross_entropy = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(plain, cross_entropy, atol=1e-5)
        model.train()
        with torch.no_grad():
            smoothed = model(tokens, positions, None, labels=labels)
        eps = 0.2 * 64 / 63
        expected = (1 - eps) * cross_entropy + eps * (-log_probs.mean(-1))
        assert torch.allclose(smoothed, expected, atol=1e-5)
    finally:
        destroy_distributed()


def test_everything_a_step_touches_is_placed_on_the_platforms_compute_device(monkeypatch, tmp_path):
    """Pointed at another device (meta stands in for a GPU), the platform's compute device is where
    build_model puts every chunk (LoRA adapters included), the distillation teacher lands, and the
    pre-training and fine-tuning forward steps send their batches: nothing stays on the CPU."""
    import torch

    from megatron_r1 import finetuning, platform, training
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.finetuning import distillation
    from megatron_r1.lora import LoRAConfig, add_adapters_to_duplicated_linears, lora_spec_transform
    from megatron_r1.model import build_model

    fake_gpu = torch.device("meta")
    monkeypatch.setattr(platform, "compute_device", lambda: fake_gpu)
    args = parse_args(
        "test",
        [
            "--mock-data",
            "--vocab-size",
            "64",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--swiglu",
            "--disable-bias-linear",
            "--multi-latent-attention",
            "--q-lora-rank",
            "16",
            "--kv-lora-rank",
            "16",
            "--qk-head-dim",
            "8",
            "--qk-pos-emb-head-dim",
            "8",
            "--v-head-dim",
            "8",
            "--num-experts",
            "2",
            "--moe-ffn-hidden-size",
            "16",
            "--mtp-num-layers",
            "1",
            "--seq-length",
            "8",
        ],
    )
    args.padded_vocab_size = 64
    lora = LoRAConfig(rank=2)
    initialize_distributed()
    try:
        (model,) = build_model(
            args,
            layer_spec_transform=lora_spec_transform(lora, True),
            prepare_chunk=lambda chunk: add_adapters_to_duplicated_linears(chunk, lora),
        )
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert any(".lora_a" in name for name in tensors) and any("mtp." in name for name in tensors)
        left_behind = [name for name, tensor in tensors.items() if tensor.device != fake_gpu]
        assert not left_behind, left_behind

        monkeypatch.setattr(distillation, "load_weights", lambda path, modules, keep=None: None)
        (tmp_path / "teacher" / "iter_0000001").mkdir(parents=True)
        (tmp_path / "teacher" / "latest_checkpointed_iteration.txt").write_text("1")
        metadata = {"iteration": 1, "consumed_samples": 0, "skipped_iterations": 0, "nan_iterations": 0, "layout": {},
                    "model_args": {"num_layers": 1, "mtp_num_layers": 1}}  # fmt: skip
        (tmp_path / "teacher" / "iter_0000001" / "megatron_r1.json").write_text(json.dumps(metadata))
        args.teacher_load = str(tmp_path / "teacher")
        teacher = finetuning.build_teacher(args)
        assert {p.device for p in teacher.parameters()} == {fake_gpu}
        assert teacher.mtp_process is False  # a teacher runs without labels: no MTP layers

        batch = {"tokens": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long),
                 "loss_mask": torch.ones(1, 8), "position_ids": torch.arange(8)[None],
                 "segment_ids": torch.zeros(1, 8, dtype=torch.long)}  # fmt: skip
        seen = []

        def model_recording_devices(*inputs, **kwargs):
            seen.extend(t.device for t in [*inputs, *kwargs.values()] if torch.is_tensor(t))
            return torch.zeros(1, 8, device=fake_gpu)

        monkeypatch.setattr(finetuning.data, "packed_attention_inputs", lambda segment_ids: (None, segment_ids))
        for forward_step in (training.lm_forward_step, finetuning.sft_forward_step):
            seen.clear()
            forward_step(iter([dict(batch)]), model_recording_devices)
            assert seen and set(seen) == {fake_gpu}, (forward_step.__name__, seen)
    finally:
        destroy_distributed()


def test_megatron_cores_fused_activation_and_bias_dropout_add_compute_the_unfused_results(monkeypatch):
    """Megatron-LM's defaults turn megatron-core's SwiGLU (weighted by the routing probabilities in
    the experts) and bias-dropout-add fusions on; --no-bias-swiglu-fusion --no-bias-dropout-fusion
    turn them off. On CPU the fused functions run uncompiled: the same loss and gradients, through
    other code (counted)."""
    import torch
    from megatron.core.transformer import mlp

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_model

    calls = []
    for name in ("bias_swiglu_impl", "weighted_bias_swiglu_impl"):
        original = getattr(mlp, name)
        monkeypatch.setattr(mlp, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    flags = ["--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
             "4", "--swiglu", "--disable-bias-linear", "--multi-latent-attention", "--kv-lora-rank", "16",
             "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "4",
             "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "16", "--moe-layer-freq",
             "[0,1]", "--moe-router-topk", "2", "--hidden-dropout", "0.1", "--seq-length", "8"]  # fmt: skip
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = {}
    initialize_distributed()
    try:
        for fused, extra in ((True, []), (False, ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion"])):
            args = parse_args("test", flags + extra)
            args.padded_vocab_size = 64
            (model,) = build_model(args)
            assert (model.config.bias_activation_fusion, model.config.bias_dropout_fusion) == (fused, fused)
            calls.clear()
            torch.manual_seed(1)  # the same dropout masks
            loss = model(tokens, torch.arange(8).expand(2, 8), None, labels=torch.roll(tokens, -1, 1)).mean()
            loss.backward()
            assert sorted(set(calls)) == (["bias_swiglu_impl", "weighted_bias_swiglu_impl"] if fused else [])
            results[fused] = loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        destroy_distributed()
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results[True], results[False]
    assert abs(fused_loss - plain_loss) <= 1e-6 * abs(plain_loss)
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_build_model_draws_each_weight_once_and_keeps_megatron_cores_parallel_attributes(monkeypatch):
    """megatron-core builds the chunk and draws nothing; initialize_by_identity then draws each random
    weight once (normal_ runs once per drawn weight). With or without drawing, the tensor-parallel
    weights carry megatron-core's attributes (its grad-norm and optimizer code skip a weight without
    them as a duplicate on TP ranks other than 0) and the biases start at zero."""
    import itertools

    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_r1 import model as model_module
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed

    drawn, normal_calls, normal_ = [], [], torch.Tensor.normal_
    initialize_by_identity = model_module.initialize_by_identity
    monkeypatch.setattr(model_module, "initialize_by_identity", lambda *a: drawn.append(initialize_by_identity(*a)))
    monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: normal_calls.append(1) or normal_(self, *a, **k))
    common = ["--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
              "4", "--swiglu", "--mtp-num-layers", "1", "--seq-length", "8"]  # fmt: skip
    dense_with_biases = ["--group-query-attention", "--num-query-groups", "2"]
    moe = ["--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-layer-freq", "[0,1]",
           "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "16"]  # fmt: skip
    initialize_distributed()
    try:
        for variant, initialize in itertools.product((dense_with_biases, moe), (True, False)):
            args = parse_args("test", common + variant)
            args.padded_vocab_size = 64
            drawn.clear(), normal_calls.clear()
            (model,) = model_module.build_model(args, initialize=initialize)
            assert len(normal_calls) == sum(drawn) and (sum(drawn) > 10) == initialize, (normal_calls, drawn)
            linears = (ColumnParallelLinear, RowParallelLinear)  # (a tied output layer has no weight of its own)
            layers = [(name, m) for name, m in model.named_modules() if isinstance(m, linears) and m.weight is not None]
            assert len(layers) >= 8
            for name, module in layers:
                axis = 0 if isinstance(module, ColumnParallelLinear) else 1
                assert module.weight.tensor_model_parallel and module.weight.partition_dim == axis, name
                if initialize and module.bias is not None:
                    assert not module.bias.any(), name
    finally:
        destroy_distributed()


def test_megatron_cores_fused_cross_entropy_computes_the_plain_loss_and_gradients_in_bf16(monkeypatch):
    """--cross-entropy-loss-fusion (megatron-core's native kernel, run uncompiled on CPU) on a bf16
    model: the loss and every gradient of the plain cross entropy (the logits' gradient is bf16 on
    both paths; fp32 runs are refused the flag: tests/test_arguments.py)."""
    import torch
    from megatron.core.models.common.language_module import language_module

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_model

    calls, fused = [], language_module.fused_vocab_parallel_cross_entropy
    monkeypatch.setattr(language_module, "fused_vocab_parallel_cross_entropy", lambda *a: calls.append(1) or fused(*a))
    flags = ["--mock-data", "--vocab-size", "64", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads",
             "4", "--seq-length", "8", "--bf16", "--untie-embeddings-and-output-weights"]  # fmt: skip
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    results = {}
    initialize_distributed()
    try:
        for fusion in (True, False):
            args = parse_args("test", flags + ["--cross-entropy-loss-fusion"] * fusion)
            args.padded_vocab_size = 64
            (model,) = build_model(args)
            loss = model(tokens, torch.arange(8).expand(2, 8), None, labels=torch.roll(tokens, -1, 1)).float().mean()
            loss.backward()
            results[fusion] = loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}
    finally:
        destroy_distributed()
    assert len(calls) == 1
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results[True], results[False]
    assert abs(fused_loss - plain_loss) <= 1e-6 * abs(plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-6, atol=0, msg=name)
