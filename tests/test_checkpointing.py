"""Checkpoints: exact resume after kill -9, interrupted saves, distributed-optimizer state,
resharding between layouts, refusal of a mismatched model shape and of code in a checkpoint's
pickles; leaving a run on a signal or a time limit; rollback after consecutive bad steps."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import plain_tensors, run_command
from malicious import CreatesAFile, poison_checkpoint_metadata
from torch.distributed.checkpoint import FileSystemReader
from transformer_engine_keys import mark_as_transformer_engines, pretrain_saving_transformer_engine_keys

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_r1.py"
TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
        "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid", "--hidden-dropout", "0.1",
        "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "2"]  # fmt: skip
TWO_PROCESSES = ["torchrun", "--standalone", "--nproc_per_node=2"]


def pretrain(cwd, *argv, launcher=(sys.executable,)):
    return run_command([*launcher, str(PRETRAIN), *TINY, *argv], cwd, timeout=300).stdout


def assert_identical(first, second, atol=0.0):
    """Every model and optimizer tensor of two checkpoints equal (bit for bit when atol is 0)."""
    first, second = plain_tensors(first), plain_tensors(second)
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.allclose(first[key], second[key], rtol=0.0, atol=atol)]
    assert not different, different
    assert any("optimizer.state." in key for key in first), "optimizer state missing"  # (chained_N.)optimizer...


def _validation_losses(output) -> dict:
    return {
        int(i): float(loss)
        for i, loss in re.findall(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", output)
    }


KILLED_LAYOUTS = {
    "one_process": ((sys.executable,), []),
    "ep2_distributed_optimizer": (TWO_PROCESSES, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


@pytest.mark.parametrize("layout", KILLED_LAYOUTS)
def test_kill_minus_nine_after_a_save_then_rerun_is_bit_identical(tmp_path, layout):
    """Killed (every process) once a checkpoint is published, then rerun: the final checkpoint
    equals the straight run's bit for bit, and the resumed run evaluates on the validation batches
    the straight run evaluates on at the same iterations."""
    launcher, flags = KILLED_LAYOUTS[layout]
    run = ["--train-iters", "16", "--eval-interval", "5", "--eval-iters", "1", "--global-batch-size", "4", *flags]
    straight = _validation_losses(pretrain(tmp_path, *run, "--save", "straight", launcher=launcher))
    argv = [*launcher, str(PRETRAIN), *TINY, *run, "--save", "killed", "--save-interval", "2"]
    process = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    published = tmp_path / "killed" / "iter_0000004"
    while not published.exists() and process.poll() is None:
        time.sleep(0.01)
    # torchrun's workers are not in its process group: each process of the run is killed.
    for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        victim.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = run_command(argv, tmp_path).stdout
    assert (resumed_from := re.search(r"resumed from iteration (\d+) ", resumed)) and int(resumed_from[1]) < 16, resumed
    assert_identical(tmp_path / "straight" / "iter_0000016", tmp_path / "killed" / "iter_0000016")
    after_resume = _validation_losses(resumed)
    assert 15 in after_resume and after_resume == {i: straight[i] for i in after_resume}, (after_resume, straight)


def test_an_interrupted_save_leaves_the_previous_checkpoint_the_latest(tmp_path):
    pretrain(tmp_path, "--train-iters", "4", "--save", "ckpt", "--exit-interval", "2")
    # What a crash in the middle of writing iteration 4 leaves behind.
    debris = tmp_path / "ckpt" / "iter_0000004.tmp"
    debris.mkdir()
    (debris / "__0_0.distcp").write_bytes(b"half a shard")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    output = pretrain(tmp_path, "--train-iters", "4", "--save", "ckpt")
    assert "resumed from iteration 2 " in output
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        "iter_0000002",
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]


def test_a_run_killed_before_its_first_tracker_write_resumes_from_the_published_checkpoint(tmp_path):
    """The first checkpoint renamed into place, the tracker file not yet written: that checkpoint is
    the latest (a directory under its final name is complete; one being written is not)."""
    import argparse

    from megatron_r1.checkpointing import find_checkpoint

    root = argparse.Namespace(load=str(tmp_path), ckpt_step=None)
    (tmp_path / "iter_0000004.tmp").mkdir()
    assert find_checkpoint(root) is None
    for iteration in (2, 3):
        (tmp_path / f"iter_000000{iteration}").mkdir()
    (tmp_path / "iter_0000002" / "megatron_r1.json").write_text("{}")
    assert find_checkpoint(root) == str(tmp_path / "iter_0000002")  # iter_0000003 has no metadata: not published


def test_distributed_optimizer_state_survives_save_and_load(tmp_path):
    """DP=2, 2 micro-batches per rank, 4 steps straight (saving at 2 and 4), against
    - 2 steps, an (asynchronous) save, a resume and 2 more steps with --overlap-grad-reduce
      --overlap-param-gather, whose last update reaches the checkpoint only through the gather
      before saving: bit-identical;
    - a resume from the straight run's iteration 2 by one process (the optimizer state resharded to
      DP=1): weights and Adam moments equal to summation order."""
    run = ["--use-distributed-optimizer", "--global-batch-size", "8", "--train-iters", "4", "--hidden-dropout", "0.0"]
    two = dict(launcher=TWO_PROCESSES)
    pretrain(tmp_path, *run, "--save", "straight", "--save-interval", "2", **two)
    pretrain(tmp_path, *run, "--save", "resumed", "--exit-interval", "2", "--async-save", **two)
    output = pretrain(tmp_path, *run, "--save", "resumed", "--overlap-grad-reduce", "--overlap-param-gather", **two)
    assert "resumed from iteration 2 " in output
    assert_identical(tmp_path / "straight" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")
    output = pretrain(tmp_path, *run, "--load", "straight", "--ckpt-step", "2", "--save", "dp1")
    assert "resumed from iteration 2 " in output
    assert_identical(tmp_path / "straight" / "iter_0000004", tmp_path / "dp1" / "iter_0000004", atol=1e-6)


def _validation_loss(output):
    return float(re.search(r"lm loss value: (\S+)", output)[1])


def test_checkpoints_reshard_between_layouts(tmp_path):
    """Saved with TP=2 + SP: the same evaluation loss when loaded with TP=2, TP=1, EP=2 (DP=2) and PP=2
    (3 layers, split 2 + 1)."""
    two = dict(launcher=TWO_PROCESSES)
    tp2 = ["--num-layers", "3", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    pretrain(tmp_path, *tp2, "--train-iters", "3", "--save", "ckpt", **two)
    # The same 4 validation samples per batch whatever the data-parallel size.
    evaluate = ["--num-layers", "3", "--load", "ckpt", "--skip-train", "--eval-iters", "2", "--hidden-dropout", "0.0",
                "--global-batch-size", "4"]  # fmt: skip
    reference = _validation_loss(pretrain(tmp_path, *tp2, *evaluate, **two))
    uneven_pp2 = ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"]
    for layout, launcher in [([], (sys.executable,)), (["--expert-model-parallel-size", "2"], TWO_PROCESSES),
                             (uneven_pp2, TWO_PROCESSES)]:  # fmt: skip
        loss = _validation_loss(pretrain(tmp_path, *layout, *evaluate, launcher=launcher))
        assert abs(loss - reference) <= 1e-5, (layout, loss, reference)


@pytest.fixture(scope="module")
def time_limited_run(tmp_path_factory):
    """A run of 100 iterations stopped by --exit-duration-in-mins after its first one: its output
    and its checkpoint directory."""
    workdir = tmp_path_factory.mktemp("time_limited")
    output = pretrain(workdir, "--train-iters", "100", "--save", "ckpt", "--exit-duration-in-mins", "0.001")
    return output, workdir / "ckpt"


def test_exit_duration_in_mins_saves_and_exits(time_limited_run):
    output, checkpoints = time_limited_run
    assert re.search(r"exiting at iteration 1 \(--exit-duration-in-mins 0.001 reached after \S+ min\)", output), output
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text() == "1"


def failed_resume(run, cwd, *argv) -> str:
    """The error output of pretrain_r1.py `argv` on a copy of `run`'s checkpoint (in cwd/ckpt), which
    must fail."""
    shutil.copytree(run[1], cwd / "ckpt")
    command = [sys.executable, str(PRETRAIN), *TINY, "--load", "ckpt", *argv]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr


def test_dist_ckpt_strictness_reaches_the_loader(tmp_path, time_limited_run):
    """raise_all: the optimizer state that --no-load-optim leaves in the checkpoint stops the load."""
    stderr = failed_resume(
        time_limited_run, tmp_path, "--train-iters", "100", "--no-load-optim", "--dist-ckpt-strictness", "raise_all"
    )
    assert "Some keys found in the checkpoint are missing" in stderr, stderr[-2000:]


def test_a_checkpoint_of_another_shape_is_refused_naming_the_flag(tmp_path, time_limited_run):
    stderr = failed_resume(time_limited_run, tmp_path, "--hidden-size", "64", "--train-iters", "3")
    assert "--hidden-size 32 (checkpoint) vs 64 (now)" in stderr, stderr[-2000:]


def test_a_checkpoint_saved_by_transformer_engines_layers_resumes_bit_identically(tmp_path):
    """A checkpoint as a --transformer-impl transformer_engine run saves it (the norm before each MoE
    layer's experts under TransformerEngine's name, in the weights and Adam's moments) generates, and
    resumes under the local layers to the straight run's checkpoint bit for bit."""
    run = ["--train-iters", "4", "--global-batch-size", "4"]
    pretrain(tmp_path, *run, "--save", "straight")
    command = [*pretrain_saving_transformer_engine_keys(PRETRAIN), *TINY, *run, "--save", "te"]
    run_command([*command, "--exit-interval", "2"], tmp_path)
    saved = tmp_path / "te" / "iter_0000002"
    keys = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    renamed = [key for key in keys if "pre_mlp_layernorm." in key]
    assert renamed and any(key.startswith("optimizer.") for key in renamed), sorted(keys)
    assert not [key for key in keys if "linear_fc1.layer_norm_" in key]
    mark_as_transformer_engines(saved)

    generated = run_command(
        [
            sys.executable,
            str(REPO / "tools" / "generate.py"),
            "--load",
            "te",
            "--prompt-ids",
            "1",
            "--max-new-tokens",
            "2",
            "--ignore-eod",
        ],
        tmp_path,
    ).stdout
    assert re.search(r"^new token ids: \d+ \d+$", generated, re.M), generated
    resumed = pretrain(tmp_path, *run, "--save", "te")
    assert "resumed from iteration 2 " in resumed, resumed[-2000:]
    assert_identical(tmp_path / "straight" / "iter_0000004", tmp_path / "te" / "iter_0000004")


def test_a_checkpoint_without_optimizer_state_resumes_only_with_no_load_optim(tmp_path):
    pretrain(
        tmp_path, "--train-iters", "4", "--exit-interval", "3", "--save", "light", "--no-save-optim", "--no-save-rng"
    )
    saved = FileSystemReader(str(tmp_path / "light" / "iter_0000003")).read_metadata().state_dict_metadata
    assert {key.split(".")[0].split("/")[0] for key in saved} == {"decoder", "embedding"}, sorted(saved)
    result = subprocess.run(
        [sys.executable, str(PRETRAIN), *TINY, "--train-iters", "4", "--save", "light"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert (
        "iter_0000003: saved without its optimizer state (--no-save-optim); resume from it with --no-load-optim"
        in result.stderr
    ), result.stderr[-2000:]
    output = pretrain(tmp_path, "--train-iters", "4", "--save", "light", "--no-load-optim")
    assert "resumed from iteration 3 " in output and " iteration        4/       4 |" in output


def test_an_optimizer_of_another_kind_resumes_only_with_no_load_optim(tmp_path, time_limited_run):
    """The distributed optimizer keeps other state than the plain one the run saved: one clear error
    naming the flags, not megatron-core's missing-key dump."""
    stderr = failed_resume(time_limited_run, tmp_path, "--train-iters", "100", "--use-distributed-optimizer")
    message = "its optimizer state is a plain fp32 optimizer's, these flags build a distributed fp32 one"
    assert message in stderr and "KeyError" not in stderr, stderr[-2000:]


def test_code_in_a_checkpoint_pickle_is_refused_before_it_runs(tmp_path, time_limited_run):
    from megatron_r1.checkpointing import CheckpointError, refuse_executable_pickles

    shutil.copytree(time_limited_run[1], tmp_path / "ckpt")
    iteration_dir = tmp_path / "ckpt" / "iter_0000001"
    witness = tmp_path / "code_ran"
    # Point rank 0's RNG-state object (unpickled by torch_dist with weights_only=False) at a
    # payload appended to its shard file.
    metadata_file = iteration_dir / ".metadata"
    genuine_metadata = metadata_file.read_bytes()
    metadata = pickle.loads(genuine_metadata)
    index = next(index for index in metadata.storage_data if index.fqn.startswith("rng_state"))
    storage = metadata.storage_data[index]
    shard_file = iteration_dir / storage.relative_path
    payload_file = tmp_path / "payload.pt"
    torch.save(CreatesAFile(witness), payload_file)
    storage.offset, storage.length = shard_file.stat().st_size, payload_file.stat().st_size
    with open(shard_file, "ab") as f:
        f.write(payload_file.read_bytes())
    metadata_file.write_bytes(pickle.dumps(metadata))
    result = subprocess.run(
        [sys.executable, str(PRETRAIN), *TINY, "--train-iters", "100", "--load", "ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    refusal = f"ckpt/iter_0000001/{storage.relative_path}: object {index.fqn} refused, not plain data: "
    assert refusal + "Unsupported global: GLOBAL io.open" in result.stderr, result.stderr[-2000:]
    assert not witness.exists()
    # The metadata file (plain pickle) and common.pt (torch.save) are checked too.
    metadata_file.write_bytes(genuine_metadata)
    for name, payload in ((".metadata", pickle.dumps(CreatesAFile(witness))), ("common.pt", payload_file.read_bytes())):
        original = (iteration_dir / name).read_bytes()
        (iteration_dir / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=f"{name}: refused, .*io.open"):
            refuse_executable_pickles(str(iteration_dir))
        assert not witness.exists()
        (iteration_dir / name).write_bytes(original)
    refuse_executable_pickles(str(iteration_dir))  # the genuine checkpoint passes


REPO = PRETRAIN.parent


@pytest.mark.parametrize("tracker, metadata, expected", [
    ("²", None, "latest_checkpointed_iteration.txt: expected an iteration number, found '²'"),
    (b"\xff", None, "latest_checkpointed_iteration.txt: expected an iteration number"),
    ("1", "{oops", "megatron_r1.json:1: invalid JSON: "),
    ("1", "[1]", "megatron_r1.json: not a JSON object"),
    ("1", '{"iteration": 2}', "megatron_r1.json: 'consumed_samples' is missing or not an integer"),
    ("1", b'{"a": "\xff"}', "megatron_r1.json: invalid JSON (UnicodeDecodeError: "),
], ids=["digit-like", "binary-tracker", "broken-json", "list", "fields-missing", "binary-json"])  # fmt: skip
def test_a_damaged_tracker_or_metadata_file_is_one_error_naming_it(tmp_path, tracker, metadata, expected):
    import argparse

    from megatron_r1.checkpointing import CheckpointError, saved_model_args

    (tmp_path / "iter_0000001").mkdir()
    for name, content in (("latest_checkpointed_iteration.txt", tracker), ("iter_0000001/megatron_r1.json", metadata)):
        if content is not None:
            (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError) as error:
        saved_model_args(argparse.Namespace(load=str(tmp_path), ckpt_step=None))
    assert expected in str(error.value) and str(tmp_path) in str(error.value)


@pytest.mark.parametrize("reader", ["finetune", "generate", "export", "merge_lora"])
def test_every_tool_that_reads_a_checkpoint_refuses_code_in_it(reader, tmp_path, time_limited_run):
    """Beside resuming (above) and --pretrained-checkpoint/--teacher-load (test_finetuning):
    pretraining's --finetune, generation, export to Hugging Face and merging LoRA adapters read
    checkpoints through the same refusal."""
    shutil.copytree(time_limited_run[1], tmp_path / "ckpt")
    witness = poison_checkpoint_metadata(tmp_path / "ckpt", tmp_path / "code_ran")
    if reader == "merge_lora":  # a LoRA run's directory whose base is the same checkpoint
        lora = {
            "rank": 2,
            "alpha": 4.0,
            "dropout": 0.0,
            "target_modules": ["attention"],
            "pretrained_checkpoint": "ckpt",
        }
        (tmp_path / "ckpt" / "lora.json").write_text(json.dumps(lora))
    if reader == "export":  # (this GQA model is refused by export itself: its reader, directly)
        from megatron_r1.checkpointing import CheckpointError
        from megatron_r1.hf.storage import McoreCheckpointReader

        with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
            McoreCheckpointReader(str(tmp_path / "ckpt" / "iter_0000001"))
        assert not witness.exists()
        return
    command = {
        "finetune": ["pretrain_r1.py", *TINY, "--train-iters", "3", "--load", "ckpt", "--finetune"],
        "generate": ["tools/generate.py", "--load", "ckpt", "--prompt-ids", "1", "2", "--max-new-tokens", "2"],
        "merge_lora": ["tools/merge_lora.py", "--lora-load", "ckpt", "--save", "merged"],
    }[reader]
    result = subprocess.run(
        [sys.executable, str(REPO / command[0]), *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and ".metadata: refused" in result.stderr, result.stderr[-3000:]
    assert not witness.exists()


def test_sigterm_to_one_rank_makes_both_save_and_exit_0(tmp_path):
    """The signal reaches rank 1 only (one node of a job preempted first); rank 0 learns of it
    through the end-of-iteration all-reduce, both save the same iteration and exit 0."""
    argv = [*TWO_PROCESSES, str(PRETRAIN), *TINY, "--train-iters", "1000", "--save", "ckpt", "--exit-signal-handler"]
    process = subprocess.Popen(
        argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        for line in process.stdout:  # printed by rank 1, the logging rank
            if line.startswith(f" iteration {2:8d}/"):
                workers = psutil.Process(process.pid).children()
                next(worker for worker in workers if worker.environ().get("RANK") == "1").send_signal(signal.SIGTERM)
                break
        output = process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]  # torchrun: 0 only when every worker exited 0
    exited = re.search(r"exiting at iteration (\d+) \(SIGTERM received\)", output)
    assert exited, output[-3000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == exited[1]
    assert (tmp_path / "ckpt" / f"iter_{int(exited[1]):07d}").is_dir()


def test_consecutive_bad_steps_roll_back_to_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Checkpoint at 3, a good step 4, NaN at 5 and 6: with --rollback-after-bad-steps 2 the
    weights of iteration 3 come back and training goes on with the next data."""
    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import build_data, setup, train

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        "test",
        TINY
        + [
            "--train-iters",
            "7",
            "--save",
            str(tmp_path / "ckpt"),
            "--save-interval",
            "3",
            "--rollback-after-bad-steps",
            "2",
        ],
    )
    state = setup(args)
    try:
        train_dataset, valid_dataset = build_data(args, state)
        weights_entering = {}  # iteration -> the weights its forward pass saw

        def poison_iterations_5_and_6(module, inputs, output):
            iteration = len(weights_entering) + 1
            weights_entering[iteration] = [param.detach().clone() for param in state.model[0].parameters()]
            if iteration in (5, 6):
                return output[0] * float("nan"), output[1]

        state.model[0].module.output_layer.register_forward_hook(poison_iterations_5_and_6)
        last = train(args, state, train_dataset, valid_dataset)
    finally:
        destroy_distributed()
    assert (
        " rolled back to the checkpoint of iteration 3 after 2 consecutive skipped iterations"
        in capsys.readouterr().out
    )

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(weights_entering[a], weights_entering[b]))

    assert not same(4, 5), "iteration 4 did not update"
    assert same(4, 7), "iteration 7 did not start from the checkpoint of iteration 3"
    assert (state.iteration, state.consumed_samples) == (7, 7 * args.global_batch_size)
    assert (state.nan_iterations, state.skipped_iterations, state.scheduler.num_steps) == (2, 3, 4)
    final = [param.detach() for param in state.model[0].parameters()]
    assert last["grad norm"] is not None and not all(torch.equal(x, y) for x, y in zip(final, weights_entering[7]))
