"""Every entry point on a CUDA GPU (one process, NCCL): the quickstart pipeline (pre-training in
bf16 with a resume, LoRA fine-tuning, merging, export with --verify, transformers' and our greedy
generation agreeing, GRPO), GRPO's bf16 rollouts against its training forward, full fine-tuning
with early stopping, distillation from a DeepSeek-V3-shaped teacher, progressive unfreezing, fp32
pre-training, the fused kernels and grouped experts against the plain path, an MoE layer without
host syncs, a resumed run's training and validation losses, sampling, LoRA adapters placed on the
GPU, and bf16 against fp32 logits.

Skipped without CUDA (the CPU suite runs the same paths on CPU); tests/gpu/run_gpu_checks.sh runs
this file and the training benchmark on a GPU machine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def run(command, cwd, env=None, timeout=600) -> str:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATA_PATH", "TOKENIZER_MODEL", "MASTER_ADDR", "EXTRA_ARGS", "DRY_RUN")
    }
    environment.update(env or {})
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def tiny_model_flags() -> list[str]:
    """examples/model_tiny.sh's MODEL_ARGS (the quickstart's model)."""
    printed = run(["bash", "-c", 'source examples/model_tiny.sh; printf "%s\\n" "${MODEL_ARGS[@]}"'], REPO)
    return printed.splitlines()


def losses(output: str, name: str = "lm loss") -> dict[int, float]:
    return {
        int(i): float(v) for i, v in re.findall(rf"^ iteration +(\d+)/ *\d+ \|.*?\| {name}: (\S+) \|", output, re.M)
    }


def validation_losses(output: str) -> dict[int, float]:
    return {
        int(i): float(v) for i, v in re.findall(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", output)
    }


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """examples/quickstart.sh on the GPU, checked as the CPU suite checks it."""
    from test_quickstart import run_and_check_quickstart

    return run_and_check_quickstart(tmp_path_factory.mktemp("gpu"))


def test_the_quickstart_pipeline_runs_on_the_gpu(quickstart):
    assert (quickstart / "hf" / "config.json").exists()


def finetune_sft(quickstart, tmp_path, extra: str, iterations: int = 6) -> str:
    environment = {"PRETRAINED": str(quickstart / "checkpoints"), "TOKENIZER_MODEL": str(quickstart / "tokenizer.model"),
                   "SAVE": str(tmp_path / "sft"), "TRAIN_ITERS": str(iterations), "EVAL_INTERVAL": "2", "LR": "1e-2",
                   "EXTRA_ARGS": extra}  # fmt: skip
    return run(["bash", "examples/finetune_sft.sh"], REPO, environment)


def test_full_fine_tuning_with_early_stopping(quickstart, tmp_path):
    output = finetune_sft(quickstart, tmp_path, "--early-stop-patience 1", iterations=12)  # bf16 on a GPU
    assert losses(output) and validation_losses(output), output[-2000:]
    assert (tmp_path / "sft" / "latest_checkpointed_iteration.txt").exists()


def test_distillation_from_a_deepseek_v3_shaped_teacher(quickstart, tmp_path):
    """The pretrained checkpoint, which has an MTP layer, teaches the model it was fine-tuned into."""
    output = finetune_sft(quickstart, tmp_path, f"--teacher-load {quickstart / 'checkpoints'} --kd-kl-weight 1.0")
    assert " teacher: " in output and len(losses(output)) == 6, output[-2000:]


def test_progressive_unfreezing_in_fp32(quickstart, tmp_path):
    flags = [*tiny_model_flags(), "--pretrained-checkpoint", str(quickstart / "checkpoints"), "--data-path",
             str(REPO / "megatron_r1/assets/tiny_sft.jsonl"), "--tokenizer-model", str(quickstart / "tokenizer.model"),
             "--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
             "--unfreeze-schedule", "0:1", "2:all", "--log-interval", "1"]  # fmt: skip
    output = run([sys.executable, "finetune_r1.py", *flags], REPO)
    assert "the top 1 of 4 layers train" in output and "the top 4 of 4 layers train" in output, output[-2000:]


TINY = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4",
        "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "128",
        "--mtp-num-layers", "1", "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-iters", "2"]  # fmt: skip


@pytest.mark.parametrize("precision", [["--bf16"], []], ids=["bf16", "fp32"])
def test_pre_training_learns(precision, tmp_path):
    output = run([sys.executable, "pretrain_r1.py", *TINY, *precision, "--train-iters", "30"], REPO)
    curve = losses(output)
    assert len(curve) == 30 and curve[30] < curve[1] - 0.5, curve


def test_fused_kernels_and_grouped_experts_train_as_the_plain_path():
    """The quickstart's model (MLA with yarn RoPE, MoE) in bf16: megatron-core's fused SwiGLU,
    bias-dropout-add and MLA RoPE (its Triton kernel), on by default, with its native fused cross
    entropy, and the grouped-GEMM experts (torch's grouped_mm on Hopper and newer) train with the
    plain path's losses, to bf16 precision."""
    flags = [*tiny_model_flags(), "--mock-data", "--vocab-size", "512", "--bf16", "--train-iters", "8",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--eval-iters", "0"]  # fmt: skip
    plain = ["--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion"]
    outputs = {
        name: run([sys.executable, "pretrain_r1.py", *flags, *extra], REPO)
        for name, extra in (
            ("plain", plain),
            ("fused", ["--cross-entropy-loss-fusion"]),
            ("grouped", ["--moe-grouped-gemm"]),
        )
    }
    fused_line = "fused kernels: bias-activation, bias-dropout-add, RoPE, cross entropy"
    assert fused_line in outputs["fused"], outputs["fused"][-2000:]
    assert "fused kernels: none" in outputs["plain"], outputs["plain"][-2000:]
    curves = {name: losses(output) for name, output in outputs.items()}
    print(f"losses: {curves}")
    for name in ("fused", "grouped"):
        # The same weights: the first step differs by rounding only; later ones may route a token
        # elsewhere on a near tie.
        assert abs(curves[name][1] - curves["plain"][1]) <= 0.01 * curves["plain"][1], curves
        assert all(abs(curves[name][i] - loss) <= 0.05 * loss for i, loss in curves["plain"].items()), curves
        assert curves[name][8] < curves[name][1], curves


def test_a_resumed_run_prints_the_straight_runs_training_and_validation_losses(tmp_path):
    common = [*TINY, "--bf16", "--train-iters", "8", "--eval-interval", "2"]
    straight = run([sys.executable, str(REPO / "pretrain_r1.py"), *common], tmp_path)
    run([sys.executable, str(REPO / "pretrain_r1.py"), *common, "--save", "ckpt", "--exit-interval", "4"], tmp_path)
    resumed = run([sys.executable, str(REPO / "pretrain_r1.py"), *common, "--save", "ckpt"], tmp_path)
    assert "resumed from iteration 4 " in resumed
    assert {i: v for i, v in losses(straight).items() if i > 4} == losses(resumed)
    after = validation_losses(resumed)
    assert 8 in after and after == {i: validation_losses(straight)[i] for i in after}


def test_sampling_is_seeded_on_the_gpu(quickstart):
    command = [sys.executable, "tools/generate.py", "--load", str(quickstart / "sft_merged"), "--prompt", "3 + 4",
               "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
               "--ignore-eod"]  # fmt: skip
    ids = [re.search(r"^new token ids: (.+)$", run(command, REPO), re.M)[1] for _ in range(2)]
    assert ids[0] == ids[1] and len(ids[0].split()) == 8


def test_grpo_training_forward_matches_its_bf16_rollouts(quickstart, tmp_path):
    """examples/grpo_tiny.sh (bf16 on a GPU): the training forward's log-probabilities of the sampled
    tokens stay close to the decoding's (the logged gap), and rewards, KL and entropy are finite."""
    environment = {"PRETRAINED": str(quickstart / "sft_merged"), "TOKENIZER_MODEL": str(quickstart / "tokenizer.model"),
                   "SAVE": str(tmp_path / "grpo"), "TRAIN_ITERS": "3", "LR": "1e-4"}  # fmt: skip
    output = run(["bash", "examples/grpo_tiny.sh"], REPO, environment)
    gaps = [float(gap) for gap in re.findall(r"\| rollout log-prob gap: (\S+) \|", output)]
    entropies = [float(value) for value in re.findall(r"\| entropy: (\S+) \|", output)]
    print(f"GRPO on the GPU: rollout log-prob gaps {gaps}, entropies {entropies}")
    assert len(gaps) == 3 and max(gaps) < 0.05 and all(0 < value < 20 for value in entropies), output[-3000:]


@pytest.fixture()
def one_process_world(monkeypatch):
    from megatron_r1.distributed import destroy_distributed, initialize_distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    initialize_distributed()
    yield
    destroy_distributed()


def test_bf16_logits_are_the_fp32_logits_within_bf16_precision(quickstart, one_process_world):
    from megatron_r1 import platform
    from megatron_r1.generation import load_model

    _, model = load_model(str(quickstart / "sft_merged" / "iter_0000002"))
    device = platform.compute_device()
    assert next(model.parameters()).device == device
    tokens = torch.randint(0, 4000, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(64, device=device).expand(2, 64)
    with torch.no_grad():
        fp32 = model(tokens, positions, None).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(tokens, positions, None).float()
    # Routing can send a token to other experts in bf16, so single logits may differ more: the
    # mean error and the top-1 agreement are what bf16's ~3 significant digits bound.
    mean_error, scale = (bf16 - fp32).abs().mean(), fp32.abs().mean()
    agreement = (bf16.argmax(-1) == fp32.argmax(-1)).float().mean()
    print(
        f"bf16 vs fp32 logits: mean |diff| {mean_error:.4f} of mean |logit| {scale:.4f}, top-1 agreement {agreement:.3f}"
    )
    assert mean_error <= 0.05 * scale and agreement >= 0.9, (mean_error, scale, agreement)  # CPU autocast: 2.4%, 0.96


def test_an_moe_layer_with_all_experts_local_never_makes_the_host_wait(one_process_world):
    """A bf16 MoE layer of the quickstart's model with the grouped experts: forward and backward
    (megatron_r1.token_dispatch's permutation, torch's grouped GEMM) make no host sync that CUDA's
    sync debug mode sees; megatron-core's all-gather dispatcher on the same layer makes some and
    computes the same output."""
    from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from megatron_r1.arguments import parse_args
    from megatron_r1.host_syncs import host_syncs_counted
    from megatron_r1.model import build_model

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch's grouped GEMM copies its offsets to the host before Hopper")
    args = parse_args(
        "gpu", [*tiny_model_flags(), "--mock-data", "--vocab-size", "512", "--bf16", "--moe-grouped-gemm"]
    )
    args.padded_vocab_size = 512
    (model,) = build_model(args)
    layer = next(module for module in model.modules() if isinstance(module, MoELayer)).to(torch.bfloat16)
    hidden = torch.randn(128, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def forward_and_backward():
        output, _ = layer(hidden)
        output.float().square().sum().backward()
        return output.detach()

    forward_and_backward()  # compiles megatron-core's fused SwiGLU outside the count
    with host_syncs_counted(torch.device("cuda")) as ours:
        output = forward_and_backward()
    layer.token_dispatcher = MoEAllGatherTokenDispatcher(
        layer.num_local_experts, layer.local_expert_indices, layer.config, get_default_pg_collection()
    )
    with host_syncs_counted(torch.device("cuda")) as peers:
        peer_output = forward_and_backward()
    print(f"host syncs of one MoE layer's forward and backward: megatron_r1 {dict(ours)}, megatron-core {dict(peers)}")
    assert +ours == {} and peers["cuda sync debug"] + peers["cpu"] >= 1, (ours, peers)
    torch.testing.assert_close(output, peer_output, rtol=2e-2, atol=2e-2)


def test_lora_adapters_train_on_the_gpu_and_the_base_stays(quickstart, monkeypatch):
    from sft_task import finetune

    from megatron_r1 import platform
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.finetuning import build_finetuning_data, parse_finetuning_args, setup_finetuning

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_finetuning_args(
        "gpu",
        [
            *tiny_model_flags(),
            "--lora",
            "--pretrained-checkpoint",
            str(quickstart / "checkpoints"),
            "--data-path",
            str(REPO / "megatron_r1/assets/tiny_sft.jsonl"),
            "--tokenizer-model",
            str(quickstart / "tokenizer.model"),
            "--train-iters",
            "3",
            "--lr",
            "1e-2",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--bf16",
        ],
    )
    try:
        state = setup_finetuning(args)
        model = state.model[0].module
        base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert adapters and all(p.device == platform.compute_device() for p in adapters.values())
        before = {name: p.detach().clone() for name, p in adapters.items()}
        finetune(args, state, *build_finetuning_data(args, state))
        assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)
        assert any(not torch.equal(p, before[name]) for name, p in adapters.items())
    finally:
        destroy_distributed()
