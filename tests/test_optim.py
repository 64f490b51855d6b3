import contextlib
import math

import pytest
import torch

from megatron_r1.optim import Lion, ParamScheduler, step_if_finite


def test_lion_follows_the_published_update_rule():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    reference, momentum = param.detach().clone(), torch.zeros(5)
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    for _ in range(3):
        grad = torch.randn(5)
        param.grad = grad.clone()
        optimizer.step()
        update = torch.sign(0.9 * momentum + 0.1 * grad)
        reference = reference * (1 - 0.1 * 0.5) - 0.1 * update
        momentum = 0.99 * momentum + 0.01 * grad
        assert torch.allclose(param.detach(), reference, atol=1e-6)
    assert torch.allclose(optimizer.state[param]["exp_avg"], momentum, atol=1e-6)


class _StubOptimizer:
    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def test_cosine_warm_restarts_schedule():
    scheduler = ParamScheduler(
        _StubOptimizer(),
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.0,
        lr_warmup_steps=2,
        lr_decay_steps=100,
        lr_decay_style="cosine-warm-restarts",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=100,
        wd_incr_style="constant",
        restart_iters=4,
        restart_mult=2.0,
    )
    lrs = []
    for _ in range(14):
        scheduler.step(increment=1)
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    # warmup 0.5, 1.0; first cycle of 4 steps; restart to max; second cycle of 8 steps.
    cycle = lambda position, length: 0.5 * (1 + math.cos(math.pi * position / length))  # noqa: E731
    expected = [0.5, 1.0, cycle(1, 4), cycle(2, 4), cycle(3, 4), 1.0] + [cycle(i, 8) for i in range(1, 8)] + [1.0]
    assert lrs == pytest.approx(expected)


def test_sample_based_schedule_advances_by_the_global_batch(monkeypatch):
    """Megatron-LM's --train-samples schedule: 100 samples in global batches of 8 are 12 iterations;
    the LR warms up from --lr-warmup-init over 20 samples, then decays (cosine) to --min-lr over 80."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.optim import build_scheduler, schedule_increment

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        "test",
        [
            "--mock-data",
            "--vocab-size",
            "64",
            "--global-batch-size",
            "8",
            "--train-samples",
            "100",
            "--lr",
            "1.0",
            "--min-lr",
            "0.1",
            "--lr-warmup-init",
            "0.2",
            "--lr-warmup-samples",
            "20",
            "--lr-decay-samples",
            "80",
        ],
    )
    assert args.train_iters == 12 and schedule_increment(args) == 8
    scheduler = build_scheduler(args, _StubOptimizer())
    lrs = []
    for _ in range(args.train_iters):
        scheduler.step(increment=schedule_increment(args))
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    warmup = [0.2 + 0.8 * samples / 20 for samples in (8, 16)]
    decay = [0.1 + 0.45 * (1 + math.cos(math.pi * (samples - 20) / 60)) for samples in range(24, 81, 8)]
    assert lrs == pytest.approx(warmup + decay + [0.1] * 2)  # samples 8, 16 | 24 ... 80 | 88, 96


@contextlib.contextmanager
def one_layer_gpt_and_optimizer(monkeypatch, flags):
    """A one-layer GPT in megatron-core's DDP wrapper, the optimizer `build_optimizer` gives it, and
    a function that leaves one fixed batch's gradients in the grad buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_r1.arguments import parse_args, transformer_config_from_args
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_gpt_model
    from megatron_r1.optim import build_optimizer

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        "test",
        [
            "--mock-data",
            "--vocab-size",
            "64",
            "--num-layers",
            "1",
            "--hidden-size",
            "32",
            "--num-attention-heads",
            "4",
            "--lr",
            "0.01",
            "--seq-length",
            "8",
            *flags,
        ],
    )
    initialize_distributed()
    try:
        config = transformer_config_from_args(args)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(), build_gpt_model(config, 64, 8))
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

        def compute_gradients():
            model.zero_grad_buffer()
            model(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).mean().backward()
            model.finish_grad_sync()

        yield args, model, build_optimizer(args, [model]), compute_gradients
    finally:
        destroy_distributed()


def test_lion_replaces_adam_inside_megatron_optimizer_stack(monkeypatch):
    """Lion's first step moves every weight with a gradient by exactly +-lr (sign update, m = 0)."""
    flags = ["--optimizer", "lion", "--weight-decay", "0"]
    with one_layer_gpt_and_optimizer(monkeypatch, flags) as (_, model, optimizer, compute_gradients):
        assert isinstance(optimizer.optimizer, Lion)
        assert all(group["betas"] == (0.9, 0.99) for group in optimizer.optimizer.param_groups)
        before = [param.detach().clone() for param in model.parameters()]
        compute_gradients()
        assert optimizer.step()[0]
        for param, old in zip(model.parameters(), before):
            moved = (param.detach() - old).abs()
            assert torch.allclose(moved[param.main_grad != 0], torch.tensor(0.01), atol=1e-6)


def test_adam_is_torch_fused_adamw_with_megatron_param_groups(monkeypatch):
    """Without Apex/TE the Adam inside megatron-core's stack is torch's fused AdamW, and the
    training step's update (step_if_finite) is AdamW's after torch's clipping to --clip-grad
    (per-group weight decay: none on norms), the gradient norm torch's."""
    flags = ["--weight-decay", "0.1", "--clip-grad", "0.05"]
    with one_layer_gpt_and_optimizer(monkeypatch, flags) as (args, model, optimizer, compute_gradients):
        assert type(optimizer.optimizer) is torch.optim.AdamW
        assert all(group["fused"] for group in optimizer.optimizer.param_groups)
        assert {group["wd_mult"] for group in optimizer.optimizer.param_groups} == {0.0, 1.0}
        params = list(model.parameters())
        reference = [torch.nn.Parameter(param.detach().clone()) for param in params]
        index = {id(param): i for i, param in enumerate(params)}
        reference_optimizer = torch.optim.AdamW(
            [
                {"params": [reference[index[id(p)]] for p in group["params"]], "weight_decay": group["weight_decay"]}
                for group in optimizer.optimizer.param_groups
            ],
            lr=0.01,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            foreach=False,
        )
        for _ in range(2):
            compute_gradients()
            for param, ref in zip(params, reference):
                ref.grad = param.main_grad.clone()
            reference_norm = torch.nn.utils.clip_grad_norm_(reference, 0.05)
            updated, grad_norm, _ = step_if_finite(optimizer)
            assert updated and grad_norm == pytest.approx(reference_norm.item(), rel=1e-5) and grad_norm > 0.05
            reference_optimizer.step()
        for param, ref in zip(params, reference):
            torch.testing.assert_close(param.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_a_nonfinite_gradient_skips_the_update_with_one_host_read(monkeypatch):
    """The gradient norm is also the NaN/Inf check: one NaN gradient element makes step_if_finite
    skip the update (weights and AdamW moments unchanged), and a step reads the host once."""
    with one_layer_gpt_and_optimizer(monkeypatch, []) as (_, model, optimizer, compute_gradients):
        compute_gradients()
        assert step_if_finite(optimizer)[0]
        before = [param.detach().clone() for param in model.parameters()]
        moments = [state["exp_avg_sq"].clone() for state in optimizer.optimizer.state.values()]
        host_reads = []
        for method in ("item", "tolist", "cpu"):
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, lambda t, *a, f=original: host_reads.append(1) or f(t, *a))
        for poison in (float("nan"), float("inf")):
            compute_gradients()
            next(model.parameters()).main_grad.view(-1)[3] = poison
            assert step_if_finite(optimizer) == (False, None, None)
        assert len(host_reads) == 2, host_reads
        assert all(torch.equal(param, old) for param, old in zip(model.parameters(), before))
        assert all(torch.equal(s["exp_avg_sq"], m) for s, m in zip(optimizer.optimizer.state.values(), moments))
        compute_gradients()
        assert step_if_finite(optimizer)[0] and len(host_reads) == 3
        assert not torch.equal(next(model.parameters()), before[0])


def test_decoupled_lr_schedules_the_embedding_and_output_layer_apart(monkeypatch, capsys):
    """--decoupled-lr/--decoupled-min-lr (Megatron-LM's): the input embedding and the output layer
    warm up to and decay between their own bounds; every other weight follows --lr/--min-lr."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.optim import build_scheduler

    flags = ["--decoupled-lr", "0.002", "--decoupled-min-lr", "0.0002", "--min-lr", "0.001", "--train-iters", "10",
             "--lr-warmup-iters", "2", "--untie-embeddings-and-output-weights"]  # fmt: skip
    with one_layer_gpt_and_optimizer(monkeypatch, flags) as (args, model, optimizer, _):
        scheduler = build_scheduler(args, optimizer)
        decoupled = {id(model.module.embedding.word_embeddings.weight), id(model.module.output_layer.weight)}
        groups = optimizer.optimizer.param_groups
        assert {id(p) for g in groups for p in g["params"] if g["max_lr"] == 0.002} == decoupled
        peaks, ends = {}, {}
        for step in range(1, 11):
            scheduler.step(1)
            for group in groups:
                (peaks if step == 2 else ends if step == 10 else {})[group["max_lr"]] = group["lr"]
        assert peaks == pytest.approx({0.002: 0.002, 0.01: 0.01}) and ends == pytest.approx(
            {0.002: 0.0002, 0.01: 0.001}
        )
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        parse_args("test", ["--mock-data", "--vocab-size", "64", "--decoupled-min-lr", "0.1"])
    assert capsys.readouterr().err.strip().endswith("--decoupled-min-lr needs --decoupled-lr")
