"""pretrain_r1.py end to end on CPU: one process and two."""

import math
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch

from conftest import run_command

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_r1.py"

DEEPSEEK_TINY = [
    "--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
    "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "32", "--qk-head-dim", "16",
    "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
    "--num-experts", "4", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
    "--moe-shared-expert-intermediate-size", "64", "--moe-router-score-function", "sigmoid",
    "--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "seq_aux_loss",
    "--moe-aux-loss-coeff", "1e-3", "--mtp-num-layers", "1", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "8", "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
    "--lr", "1e-3",
]  # fmt: skip

LOG_FIELDS = ["consumed samples", "elapsed time per iteration (ms)", "throughput (tokens/s)", "learning rate",
              "lm loss", "seq_load_balancing_loss", "mtp_1 loss", "expert load max/mean", "grad norm",
              "number of skipped iterations", "number of nan iterations"]  # fmt: skip


def assert_complete_log(stdout, train_iters=3):
    lines = [line for line in stdout.splitlines() if line.startswith(" iteration")]
    assert len(lines) == train_iters, stdout
    for field in LOG_FIELDS:
        assert f"{field}:" in lines[-1], (field, lines[-1])
    assert re.search(r"validation loss at iteration 3 \| lm loss value: \S+ \| lm loss PPL: \S+", stdout), stdout


def test_single_process_deepseek_run(tmp_path):
    result = run_command([sys.executable, str(PRETRAIN), *DEEPSEEK_TINY, "--tensorboard-dir", "tb"], tmp_path)
    assert_complete_log(result.stdout)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard events written"


def test_two_process_pipeline_with_mtp_on_the_last_stage(tmp_path):
    """The first stage has no MoE or MTP layer yet joins the loss-tracker reductions."""
    result = run_command(
        ["torchrun", "--standalone", "--nproc_per_node=2", str(PRETRAIN), *DEEPSEEK_TINY,
         "--pipeline-model-parallel-size", "2"],
        tmp_path,
        timeout=300,
    )  # fmt: skip
    assert_complete_log(result.stdout)


TINY_MOE = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear", "--num-experts", "4",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--seq-length", "16",
            "--micro-batch-size", "2", "--lr", "1e-3"]  # fmt: skip


def _weights(state):
    return [param.detach().clone() for param in state.model[0].parameters()]


def test_nonfinite_gradients_skip_the_update(monkeypatch):
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args("test", TINY_MOE + ["--train-iters", "3"])
    state = setup(args)
    try:
        train_dataset, valid_dataset = build_data(args, state)
        forward_calls = []

        def poison_second_iteration(module, inputs, output):
            forward_calls.append(1)
            if len(forward_calls) == 2:
                return output[0] * float("nan"), output[1]

        state.model[0].module.output_layer.register_forward_hook(poison_second_iteration)
        args.train_iters = 1
        train(args, state, train_dataset, valid_dataset)
        after_first = _weights(state)
        args.train_iters = 2
        train(args, state, train_dataset, valid_dataset)
        assert (state.nan_iterations, state.skipped_iterations) == (1, 1)
        assert all(torch.equal(a, b) for a, b in zip(after_first, _weights(state))), "poisoned step changed weights"
        args.train_iters = 3
        last = train(args, state, train_dataset, valid_dataset)
        assert state.nan_iterations == 1 and math.isfinite(last["lm loss"])
        assert not all(torch.equal(a, b) for a, b in zip(after_first, _weights(state)))
    finally:
        destroy_distributed()


def test_manual_gc_collects_at_fixed_iterations_only(monkeypatch):
    """--manual-gc: the automatic collector is off during training; collections at the start, every
    --manual-gc-interval iterations and around each evaluation; back on afterwards."""
    import gc

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args("test", TINY_MOE + ["--train-iters", "4", "--manual-gc", "--manual-gc-interval", "2",
                                          "--eval-interval", "4", "--eval-iters", "1"])  # fmt: skip
    state = setup(args)
    collected_after, automatic_during = [], []
    monkeypatch.setattr(gc, "collect", lambda *a: collected_after.append(state.iteration))
    state.on_iteration_start = lambda args, state: automatic_during.append(gc.isenabled())
    try:
        train(args, state, *build_data(args, state))
    finally:
        destroy_distributed()
    assert automatic_during == [False] * 4 and gc.isenabled()
    assert collected_after == [0, 2, 4, 4, 4]  # start; interval; interval, before and after evaluating


def _grad_buffers_after_one_step(args):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    state = setup(args)
    try:
        fusion = state.model[0].config.gradient_accumulation_fusion
        train(args, state, *build_data(args, state))
        return fusion, [buffer.grad_data.clone() for buffer in state.model[0].buffers]
    finally:
        destroy_distributed()
        get_moe_layer_wise_logging_tracker().clear()


def test_gradient_accumulation_fusion_gives_the_same_gradients(monkeypatch):
    """Weight gradients accumulated in place into the grad buffer (the default; the CPU runtime's
    GEMM stands in for Apex's kernel) equal separate gradients added by DDP's hook, over 2 micro-batches."""
    from megatron_r1.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = TINY_MOE + ["--train-iters", "1", "--global-batch-size", "4"]
    fused, fused_grads = _grad_buffers_after_one_step(parse_args("test", flags))
    plain, plain_grads = _grad_buffers_after_one_step(parse_args("test", flags + ["--no-gradient-accumulation-fusion"]))
    assert (fused, plain) == (True, False)
    assert all(grad.abs().sum() > 0 for grad in fused_grads)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_metrics_endpoint_serves_the_iteration_figures(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *TINY_MOE, "--train-iters", "400", "--metrics-port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for line in process.stdout:  # the first iteration line means figures are published
            if line.startswith(" iteration"):
                break
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        process.kill()
        process.wait()
    assert "# TYPE megatron_r1_lm_loss gauge" in body
    values = dict(line.rsplit(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    assert math.isfinite(float(values["megatron_r1_lm_loss"]))
    assert float(values["megatron_r1_consumed_samples"]) >= 2
    assert float(values['megatron_r1_expert_load_max_mean{layer="1"}']) >= 1.0


def test_recomputation_gives_the_same_losses(tmp_path):
    """Activation recomputation trades compute for memory; the numbers must not change (dropout on):
    full, and selective of every submodule megatron-core recomputes without TransformerEngine."""
    argv = [sys.executable, str(PRETRAIN), *DEEPSEEK_TINY, "--train-iters", "2", "--eval-interval", "0",
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]  # fmt: skip
    runs = [[], ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
            ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mla_up_proj", "mlp", "moe",
             "shared_experts"]]  # fmt: skip
    losses = [re.findall(r"lm loss: (\S+)", run_command(argv + extra, tmp_path).stdout) for extra in runs]
    assert len(losses[0]) == 2 and losses[0] == losses[1] == losses[2], losses


def test_tiny_model_learns_the_bundled_corpus(tmp_path):
    """corpus -> tokenizer -> indexed dataset -> pretrain: the validation loss ends clearly below
    the corpus' unigram entropy (the best loss without context)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    repo = PRETRAIN.parent
    corpus = repo / "megatron_r1" / "assets" / "tiny_corpus.jsonl"
    run_command([sys.executable, str(repo / "tools" / "train_tokenizer.py"), "--input", str(corpus),
                 "--vocab-size", "2000", "--output-prefix", "tok"], tmp_path)  # fmt: skip
    run_command([sys.executable, str(repo / "tools" / "preprocess_data.py"), "--input", str(corpus),
                 "--output-prefix", "corpus", "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", "tok.model", "--append-eod", "--workers", "2"], tmp_path)  # fmt: skip
    dataset = IndexedDataset(str(tmp_path / "corpus_text_document"))
    counts = np.bincount(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
    probabilities = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(probabilities * np.log(probabilities)).sum())

    result = run_command(
        [sys.executable, str(PRETRAIN), "--data-path", "corpus_text_document", "--split", "98,2,0",
         "--tokenizer-model", "tok.model", "--data-cache-path", "cache", "--num-layers", "2", "--hidden-size", "128",
         "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear", "--num-experts", "4",
         "--moe-ffn-hidden-size", "128", "--moe-aux-loss-coeff", "1e-2", "--seq-length", "128",
         "--micro-batch-size", "8", "--train-iters", "150", "--lr", "3e-3", "--lr-warmup-iters", "10",
         "--min-lr", "3e-4", "--eval-interval", "150", "--eval-iters", "4", "--log-interval", "50"],
        tmp_path,
    )  # fmt: skip
    validation_loss = float(re.search(r"validation loss at iteration 150 \| lm loss value: (\S+)", result.stdout)[1])
    assert validation_loss < unigram_entropy - 0.3, (validation_loss, unigram_entropy)
