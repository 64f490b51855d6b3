"""pretrain_r1.py end to end on CPU: one process and two."""

import json
import math
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
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


# Flags of Megatron-LM's MoE recipes: GPU kernel choices (without CUDA, the plain path stands in),
# switches that change nothing here, and older spellings.
MEGATRON_LM_RECIPE_FLAGS = [
    "--moe-grouped-gemm", "--moe-permute-fusion", "--moe-token-dispatcher-type", "flex", "--use-mcore-models",
    "--use-flash-attn", "--log-throughput", "--num-workers", "6", "--no-create-attention-mask-in-dataloader",
    "--recompute-activations", "--attention-backend", "auto", "--context-parallel-size", "1", "--ckpt-format",
    "torch_dist",
]  # fmt: skip


def test_single_process_deepseek_run(tmp_path):
    """Also: a Megatron-LM MoE recipe's kernel and no-op flags train on CPU, and the logging flags
    reach the iteration line and TensorBoard."""
    result = run_command(
        [
            sys.executable,
            str(PRETRAIN),
            *DEEPSEEK_TINY,
            *MEGATRON_LM_RECIPE_FLAGS,
            "--tensorboard-dir",
            "tb",
            "--tensorboard-queue-size",
            "1",
            "--log-num-zeros-in-grad",
            "--moe-per-layer-logging",
            "--log-memory-to-tensorboard",
            "--logging-level",
            "20",
            "--enable-experimental",
            "--profile",
            "--use-pytorch-profiler",
            "--profile-step-start",
            "1",
            "--profile-step-end",
            "2",
            "--peak-tflops",
            "1e-6",
        ],
        tmp_path,
    )
    assert_complete_log(result.stdout)
    # TFLOP/s per GPU and MFU: megatron_r1.flops' count of a step over the step's time, over the peak.
    from megatron_r1.arguments import parse_args
    from megatron_r1.flops import count_model

    flops = count_model(parse_args("test", [*DEEPSEEK_TINY, *MEGATRON_LM_RECIPE_FLAGS])).flops_per_iteration
    milliseconds, mfu = map(
        float, re.findall(r"per iteration \(ms\): (\S+) .*TFLOP/s/GPU\): \S+ \| MFU: (\S+)%", result.stdout)[-1]
    )
    assert mfu == pytest.approx(100 * flops / (milliseconds / 1000) / 1e12 / 1e-6, rel=0.02), (mfu, milliseconds)
    assert "INFO:megatron.core.datasets" in result.stderr, result.stderr  # --logging-level 20 lets INFO through
    if not torch.cuda.is_available():
        assert (
            "the plain megatron-core path stands in for --moe-permute-fusion, --moe-token-dispatcher-type flex"
            in result.stderr
        ), result.stderr
    assert re.search(r"num zeros: \d+\.\d", result.stdout), result.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = events.Tags()["scalars"]
    memory = "mem-max-allocated-bytes" if torch.cuda.is_available() else "mem-max-rss-bytes"
    assert {"lm loss", "num-zeros", "moe/seq_load_balancing_loss_layer_1", "lm loss validation ppl", memory} <= set(
        tags
    )
    assert events.Scalars(memory)[-1].value > 100e6  # megatron-core and torch alone take more
    trace = json.loads(next((tmp_path / "tb").glob("*.pt.trace.json")).read_text())  # --profile: iteration 2 only
    assert sum(event.get("name") == "Optimizer.step#AdamW.step" for event in trace["traceEvents"]) == 1


def test_two_process_pipeline_with_mtp_on_the_last_stage(tmp_path):
    """The first stage has no MoE or MTP layer yet joins the loss-tracker reductions. With tied
    embeddings, both decoder layers on the first stage and the MTP layer alone with the loss on the
    second (--pipeline-model-parallel-layout): the checkpoint evaluates alike in one process.
    --log-params-norm counts each weight once over the stages (the tied copy on the last not again)."""
    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.hf.storage import McoreCheckpointReader

    tied = [flag for flag in DEEPSEEK_TINY if flag != "--untie-embeddings-and-output-weights"]
    result = run_command(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node=2",
            str(PRETRAIN),
            *tied,
            "--pipeline-model-parallel-size",
            "2",
            "--pipeline-model-parallel-layout",
            "Ett|mL",
            "--save",
            "ckpt",
            "--log-params-norm",
        ],
        tmp_path,
        timeout=300,
    )
    assert_complete_log(result.stdout)
    loaded = run_command([sys.executable, str(PRETRAIN), *tied, "--load", "ckpt", "--skip-train"], tmp_path)
    loss = re.compile(r"validation loss at iteration 3 \| lm loss value: (\S+)")
    assert abs(float(loss.search(loaded.stdout)[1]) - float(loss.search(result.stdout)[1])) <= 1e-5
    initialize_distributed()
    try:
        reader = McoreCheckpointReader(str(tmp_path / "ckpt" / "iter_0000003"))
        weights = [key for key in reader.keys() if key.endswith((".weight", ".bias"))]  # not the router's buffers
        expected = math.sqrt(sum(float(tensor.double().square().sum()) for tensor in reader.load(weights).values()))
    finally:
        destroy_distributed()
    logged = float(re.findall(r"params norm: (\S+) \|", result.stdout)[-1])
    assert logged == pytest.approx(expected, abs=2e-3), (logged, expected)


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


def test_reset_attention_mask_keeps_documents_apart(monkeypatch):
    """--reset-attention-mask: the data's document mask reaches attention, so a document's losses do
    not depend on the document before it in the sample (and do without the mask)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import lm_forward_step, setup

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args("test", TINY_MOE + ["--reset-attention-mask", "--reset-position-ids"])
    state = setup(args)
    try:
        eod, generator = 127, torch.Generator().manual_seed(0)
        first, second = (
            torch.randint(0, 127, (6,), generator=generator),
            torch.randint(0, 127, (11,), generator=generator),
        )
        first[-1] = eod
        packed, alone = (
            torch.cat([first, second]),
            torch.cat([second, torch.randint(0, 127, (6,), generator=generator)]),
        )

        def losses(tokens, masked=True):
            mask, _, positions = _get_ltor_masks_and_position_ids(tokens[:-1], eod, True, True, False, True)
            batch = {"tokens": tokens[None, :-1], "labels": tokens[None, 1:], "position_ids": positions[None],
                     "attention_mask": mask[None] if masked else None}  # fmt: skip
            with torch.no_grad():
                return lm_forward_step(iter([batch]), state.model[0])[0][0]

        state.model[0].eval()
        assert torch.allclose(losses(packed)[6:], losses(alone)[:10], atol=1e-5)
        assert not torch.allclose(losses(packed, masked=False)[6:], losses(alone)[:10], atol=1e-3)
    finally:
        destroy_distributed()


class _UnevenlyMaskedSamples:
    """Two samples with 4 and 16 loss tokens."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        tokens = torch.arange(17) * (index + 3) % 128
        mask = torch.ones(16) if index else (torch.arange(16) < 4).float()
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": mask}


def _loss_and_gradients(flags):
    from megatron_r1.arguments import parse_args
    from megatron_r1.data.pretrain import MicroBatches
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import lm_forward_step, run_schedule, setup

    args = parse_args("test", TINY_MOE + ["--global-batch-size", "2", *flags])
    state = setup(args)
    try:
        state.model[0].zero_grad_buffer()
        batches = [MicroBatches(_UnevenlyMaskedSamples(), args.micro_batch_size)]
        loss = run_schedule(args, state.model, lm_forward_step, batches, False)["lm loss"]
        return loss, [param.main_grad.clone() for param in state.model[0].parameters()]
    finally:
        destroy_distributed()


def test_per_token_loss_does_not_depend_on_the_micro_batch_cut(monkeypatch):
    """--calculate-per-token-loss: one micro-batch of both samples and two micro-batches of one give
    the same loss and gradients (the mean over all 20 loss tokens); the default means per micro-batch
    first, so there the two cuts differ."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    whole_loss, whole = _loss_and_gradients(["--micro-batch-size", "2", "--calculate-per-token-loss"])
    cut_loss, cut = _loss_and_gradients(["--micro-batch-size", "1", "--calculate-per-token-loss"])
    assert abs(whole_loss - cut_loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, cut))
    default_cut_loss, default_cut = _loss_and_gradients(["--micro-batch-size", "1"])
    assert abs(default_cut_loss - cut_loss) < 1e-6  # the logged loss is over tokens either way
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(default_cut, cut))


def test_manual_gc_collects_at_fixed_iterations_only(monkeypatch):
    """--manual-gc: the automatic collector is off during training; collections at the start, every
    --manual-gc-interval iterations and around each evaluation; back on afterwards."""
    import gc

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import Extension, build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        "test",
        TINY_MOE
        + [
            "--train-iters",
            "4",
            "--manual-gc",
            "--manual-gc-interval",
            "2",
            "--eval-interval",
            "4",
            "--eval-iters",
            "1",
        ],
    )
    state = setup(args)
    collected_after, automatic_during = [], []
    monkeypatch.setattr(gc, "collect", lambda *a: collected_after.append(state.iteration))

    class RecordCollector(Extension):
        def iteration_starts(self, state):
            automatic_during.append(gc.isenabled())

    try:
        train(args, state, *build_data(args, state), extensions=[RecordCollector()])
    finally:
        destroy_distributed()
    assert automatic_during == [False] * 4 and gc.isenabled()
    assert collected_after == [0, 2, 4, 4, 4]  # start; interval; interval, before and after evaluating


def test_empty_unused_memory_level_and_bf16_full_precision_matmul_flags(monkeypatch):
    """--empty-unused-memory-level 2 empties the CUDA cache after every forward-backward pass
    (evaluation's too) and every optimizer step; --disable-bf16-reduced-precision-matmul turns
    torch's reduced-precision bf16 GEMM accumulation off."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", True)
    args = parse_args(
        "test",
        TINY_MOE
        + [
            "--train-iters",
            "2",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--empty-unused-memory-level",
            "2",
            "--disable-bf16-reduced-precision-matmul",
        ],
    )
    state = setup(args)
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is False
    emptied_at = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied_at.append(state.iteration))
    try:
        train(args, state, *build_data(args, state))
    finally:
        destroy_distributed()
    assert emptied_at == [0, 0, 1, 1, 2]  # per step: after forward-backward and after the update; evaluation


def test_grad_reduce_in_bf16_keeps_bf16_grad_buffers_and_trains(monkeypatch, capsys):
    """--bf16 --grad-reduce-in-bf16: the DDP grad buffers are bf16 (fp32 without the flag), the
    steps succeed and the loss falls as with fp32 buffers; without --bf16 the flag is refused."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = TINY_MOE + ["--bf16", "--train-iters", "6", "--lr", "3e-3", "--log-interval", "1"]
    losses = {}
    for grads, extra in ((torch.float32, []), (torch.bfloat16, ["--grad-reduce-in-bf16"])):
        args = parse_args("test", flags + extra)
        state = setup(args)
        try:
            assert {buffer.grad_dtype for buffer in state.model[0].buffers} == {grads}
            capsys.readouterr()
            train(args, state, *build_data(args, state))
        finally:
            destroy_distributed()
        assert state.skipped_iterations == 0
        losses[grads] = [float(x) for x in re.findall(r"lm loss: (\S+) \|", capsys.readouterr().out)]
    fp32, bf16 = losses[torch.float32], losses[torch.bfloat16]
    assert len(bf16) == 6 and bf16[-1] < bf16[0] and abs(bf16[-1] - fp32[-1]) < 0.1, (fp32, bf16)
    with pytest.raises(SystemExit):
        parse_args("test", TINY_MOE + ["--grad-reduce-in-bf16"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--grad-reduce-in-bf16 needs --bf16 (fp32 training keeps fp32 gradients)")
    )


def test_padded_vocab_size_sets_the_embedding_rows(monkeypatch, capsys):
    """--padded-vocab-size (Megatron-LM's) instead of the computed padding; refused below the
    vocabulary, and when TP cannot split it."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import setup

    monkeypatch.setenv("WORLD_SIZE", "1")
    for rows, expected in ((None, 128), (320, 320), (100, None)):
        args = parse_args("test", TINY_MOE + ([] if rows is None else ["--padded-vocab-size", str(rows)]))
        try:
            if expected is None:
                with pytest.raises(ValueError, match=r"--padded-vocab-size \(100\) is below the vocabulary of 128 ids"):
                    setup(args)
            else:
                state = setup(args)
                assert state.model[0].module.embedding.word_embeddings.weight.shape[0] == expected
        finally:
            destroy_distributed()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        parse_args(
            "test",
            TINY_MOE + ["--padded-vocab-size", "301", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
        )
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--padded-vocab-size (301) is not divisible by --tensor-model-parallel-size (2)")
    )


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


def test_grouped_gemm_experts_give_sequential_mlps_gradients(monkeypatch):
    """--moe-grouped-gemm without TransformerEngine (megatron_r1.experts: grouped GEMMs, weight
    gradients accumulated straight into the grad buffer) gives SequentialMLP's gradients, in one
    process over 2 micro-batches."""
    from megatron_r1 import experts
    from megatron_r1.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = TINY_MOE + ["--train-iters", "1", "--global-batch-size", "4"]
    _, sequential_grads = _grad_buffers_after_one_step(parse_args("test", flags))
    kernel, calls = experts._GROUPED_MM, []
    monkeypatch.setattr(experts, "_GROUPED_MM", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    for kernel_on_cpu in (False, True):  # the loop (CPU's default), torch's grouped GEMM (CUDA's)
        monkeypatch.setattr(experts, "KERNEL_ON_CPU", kernel_on_cpu)
        fused, grouped_grads = _grad_buffers_after_one_step(parse_args("test", flags + ["--moe-grouped-gemm"]))
        # layers x micro-batches x (2 forward + 4 backward GEMMs)
        assert fused and len(calls) == kernel_on_cpu * 2 * 2 * 6
        for grouped_grad, sequential_grad in zip(grouped_grads, sequential_grads, strict=True):
            torch.testing.assert_close(grouped_grad, sequential_grad, rtol=1e-5, atol=1e-7)


def test_metrics_endpoint_serves_the_iteration_figures(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *TINY_MOE, "--train-iters", "400", "--metrics-port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
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
    run_command(
        [
            sys.executable,
            str(repo / "tools" / "train_tokenizer.py"),
            "--input",
            str(corpus),
            "--vocab-size",
            "2000",
            "--output-prefix",
            "tok",
        ],
        tmp_path,
    )
    run_command(
        [
            sys.executable,
            str(repo / "tools" / "preprocess_data.py"),
            "--input",
            str(corpus),
            "--output-prefix",
            "corpus",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            "tok.model",
            "--append-eod",
            "--workers",
            "2",
        ],
        tmp_path,
    )
    dataset = IndexedDataset(str(tmp_path / "corpus_text_document"))
    counts = np.bincount(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
    probabilities = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(probabilities * np.log(probabilities)).sum())

    result = run_command(
        [
            sys.executable,
            str(PRETRAIN),
            "--data-path",
            "corpus_text_document",
            "--split",
            "98,2,0",
            "--tokenizer-model",
            "tok.model",
            "--data-cache-path",
            "cache",
            "--num-layers",
            "2",
            "--hidden-size",
            "128",
            "--num-attention-heads",
            "4",
            "--swiglu",
            "--disable-bias-linear",
            "--num-experts",
            "4",
            "--moe-ffn-hidden-size",
            "128",
            "--moe-aux-loss-coeff",
            "1e-2",
            "--seq-length",
            "128",
            "--micro-batch-size",
            "8",
            "--train-iters",
            "150",
            "--lr",
            "3e-3",
            "--lr-warmup-iters",
            "10",
            "--min-lr",
            "3e-4",
            "--eval-interval",
            "150",
            "--eval-iters",
            "4",
            "--log-interval",
            "50",
        ],
        tmp_path,
    )
    validation_loss = float(re.search(r"validation loss at iteration 150 \| lm loss value: (\S+)", result.stdout)[1])
    assert validation_loss < unigram_entropy - 0.3, (validation_loss, unigram_entropy)


def test_host_syncs_for_the_logged_figures_happen_on_logged_iterations_only(monkeypatch, capsys):
    """With --log-interval 3 the loss, MoE/MTP losses and expert load are reduced and read on the
    host at iterations 3 and 6 only, and they are those a --log-interval 1 run prints there; the
    other iterations read the host once."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = [*TINY_MOE, "--train-iters", "6", "--mtp-num-layers", "1", "--moe-aux-loss-coeff", "1e-2"]
    lines, syncs = {}, {}
    for interval in (1, 3):
        args = parse_args("test", [*flags, "--log-interval", str(interval)])
        state = setup(args)
        item, calls = torch.Tensor.item, []
        monkeypatch.setattr(torch.Tensor, "item", lambda self, calls=calls, item=item: calls.append(1) or item(self))
        try:
            train(args, state, *build_data(args, state))
        finally:
            monkeypatch.setattr(torch.Tensor, "item", item)
            destroy_distributed()
        output = capsys.readouterr().out
        lines[interval] = {
            int(i): figures
            for i, figures in re.findall(r" iteration +(\d+)/ *6 \|.*?(\| lm loss:.*?)\| grad norm", output)
        }
        syncs[interval] = len(calls)
    assert sorted(lines[3]) == [3, 6] and {i: lines[1][i] for i in (3, 6)} == lines[3], lines
    assert "load_balancing_loss" in lines[3][6] and "mtp_1 loss" in lines[3][6]
    # (24 -> 12) Each of the 4 iterations not logged reads the host once: the gradient norm, which
    # is also the NaN check (a separate check was one more read per iteration).
    assert syncs[3] == 2 * syncs[1] / 6 + 4, syncs
