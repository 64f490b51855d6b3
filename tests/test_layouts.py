"""Every parallel layout computes what one process computes, through the entry points: the same
DeepSeek-shaped model (MLA, a dense then MoE layers with a shared expert, sigmoid routing with
expert bias and group-limited routing, sequence aux loss, MTP) from the same seed, trained by
pretrain_r1.py (and finetune_r1.py: full SFT with distillation, LoRA) for a few steps under each
layout, prints the same lm, MTP and aux losses at every step and saves the same weights and Adam
moments, each tensor to 1e-5 of its own norm."""

import re
import sys
from pathlib import Path

import pytest
from conftest import plain_tensors, run_command
from sft_task import task_records, train_task_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TWO, FOUR = ["torchrun", "--standalone", "--nproc_per_node=2"], ["torchrun", "--standalone", "--nproc_per_node=4"]


def deepseek(num_layers: int) -> list[str]:
    return [
        "--num-layers",
        str(num_layers),
        "--hidden-size",
        "64",
        "--ffn-hidden-size",
        "128",
        "--num-attention-heads",
        "4",
        "--swiglu",
        "--disable-bias-linear",
        "--normalization",
        "RMSNorm",
        "--untie-embeddings-and-output-weights",
        "--multi-latent-attention",
        "--q-lora-rank",
        "32",
        "--kv-lora-rank",
        "32",
        "--qk-head-dim",
        "16",
        "--qk-pos-emb-head-dim",
        "8",
        "--v-head-dim",
        "16",
        "--rope-type",
        "yarn",
        "--rotary-scaling-factor",
        "4",
        "--original-max-position-embeddings",
        "16",
        "--num-experts",
        "4",
        "--moe-layer-freq",
        f"[0]+[1]*{num_layers - 1}",
        "--moe-router-topk",
        "2",
        "--moe-ffn-hidden-size",
        "64",
        "--moe-shared-expert-intermediate-size",
        "64",
        "--moe-router-score-function",
        "sigmoid",
        "--moe-router-enable-expert-bias",
        "--moe-router-num-groups",
        "2",
        "--moe-router-group-topk",
        "1",
        "--moe-router-topk-scaling-factor",
        "2.5",
        "--moe-router-load-balancing-type",
        "seq_aux_loss",
        "--moe-aux-loss-coeff",
        "1e-2",
        "--moe-token-dispatcher-type",
        "alltoall",
        "--mtp-num-layers",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--seq-length",
        "32",
        "--max-position-embeddings",
        "32",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "4",
        "--train-iters",
        "3",
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "1",
        "--log-interval",
        "1",
    ]


# The vocabulary padded to 128 rows under TP=1 and 2 alike.
PRETRAIN_DATA = ["--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PRETRAIN_LAYOUTS = {
    # MLA + TP catches the rotary-key gradient a column-parallel kv down-projection loses (model.py).
    "tp2_sp": (2, TP2),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "tp2_sp_etp1_ep2": (2, [*TP2, "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"]),
    "pp2_mtp_on_last_stage": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    # 4 processes: each expert split over expert-TP=2 and the experts over EP=2; each expert-TP rank
    # receives a different number of tokens, gathered and reduce-scattered in uneven parts.
    "tp2_sp_etp2_ep2": (4, [*TP2, "--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    # The grouped-GEMM experts (megatron_r1/experts.py) against the one process' SequentialMLP.
    "ep2_grouped_gemm": (2, ["--expert-model-parallel-size", "2", "--moe-grouped-gemm"]),
    "tp2_sp_etp2_grouped_gemm": (2, [*TP2, "--moe-grouped-gemm"]),
}
# 4 layers: the dense layer alone on the first stage; two virtual stages per rank (both pipeline
# neighbours one rank); an interleaved split of 1, 2, 1 and 0 layers (the last chunk MTP and loss).
PIPELINE_LAYOUTS = {
    "pp2_uneven": ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"],
    "pp2_vpp2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "pp2_vpp2_layout": ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tt|t|mL"],
}
LOGGED = ("lm loss", "mtp_1 loss", "seq_load_balancing_loss", "kd loss")


def step_losses(output: str) -> dict:
    """{(iteration, name): value} of every logged loss of every iteration line."""
    losses = {}
    for line in output.splitlines():
        if match := re.match(r" iteration +(\d+)/", line):
            for name, value in re.findall(r"\| ([\w ]+?): (\S+)", line):
                if name in LOGGED:
                    losses[int(match[1]), name] = float(value)
    return losses


def saved_tensors(save_dir: Path) -> dict:
    """The last checkpoint's tensors, the optimizer's keys without the prefix megatron-core gives
    each part of a chained optimizer (dense and expert parameters apart under some layouts), and
    without the distributed optimizer's copy of the weights (compared as the weights)."""
    last = (save_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    tensors = plain_tensors(save_dir / f"iter_{int(last):07d}")
    tensors = {re.sub(r"^chained_\d+\.", "", key): value for key, value in tensors.items()}
    return {key: value for key, value in tensors.items() if not key.startswith("optimizer.state.param.")}


def assert_same_training(run, reference, tolerance=1e-5) -> None:
    (losses, tensors), (expected_losses, expected_tensors) = run, reference
    assert losses.keys() == expected_losses.keys() and len(losses) >= 6, (losses, expected_losses)
    assert losses == pytest.approx(expected_losses, rel=tolerance), (losses, expected_losses)
    assert tensors.keys() == expected_tensors.keys(), set(tensors) ^ set(expected_tensors)
    assert any(key.startswith("optimizer.state.exp_avg.") for key in tensors)
    differences = {
        key: ((tensors[key].double() - value.double()).norm() / value.double().norm().clamp(min=1e-12)).item()
        for key, value in expected_tensors.items()
    }
    worst = max(differences.items(), key=lambda item: item[1])
    assert worst[1] <= tolerance, worst


class EntryPointRuns:
    """Runs an entry point with --save in a fresh directory: (step losses, saved tensors); one
    run per distinct command, shared between the tests that compare against it."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory, self.cache = tmp_path_factory, {}

    def __call__(self, launcher, script, argv) -> tuple[dict, dict]:
        key = (tuple(launcher), script, tuple(argv))
        if key not in self.cache:
            workdir = self.tmp_path_factory.mktemp("run")
            output = run_command([*launcher, str(REPO / script), *argv, "--save", "ckpt"], workdir, timeout=600).stdout
            self.cache[key] = step_losses(output), saved_tensors(workdir / "ckpt")
        return self.cache[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return EntryPointRuns(tmp_path_factory)


@pytest.mark.parametrize("layout", PRETRAIN_LAYOUTS)
def test_pretraining_under_a_layout_equals_one_process(runs, layout):
    processes, flags = PRETRAIN_LAYOUTS[layout]
    reference = runs([sys.executable], "pretrain_r1.py", [*deepseek(2), *PRETRAIN_DATA])
    assert_same_training(
        runs(TWO if processes == 2 else FOUR, "pretrain_r1.py", [*deepseek(2), *PRETRAIN_DATA, *flags]), reference
    )


@pytest.mark.parametrize("layout", PIPELINE_LAYOUTS)
def test_pretraining_under_a_pipeline_split_equals_one_process(runs, layout):
    reference = runs([sys.executable], "pretrain_r1.py", [*deepseek(4), *PRETRAIN_DATA])
    assert_same_training(
        runs(TWO, "pretrain_r1.py", [*deepseek(4), *PRETRAIN_DATA, *PIPELINE_LAYOUTS[layout]]), reference
    )


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft")
    tokenizer = train_task_tokenizer(directory)
    data = write_jsonl(directory / "copy.jsonl", task_records("copy", 64, 0))
    # The same embedding rows under TP=1 and 2, teacher and students.
    return ["--data-path", data, "--tokenizer-model", tokenizer, "--split", "100,0,0", "--padded-vocab-size", "384"]


@pytest.fixture(scope="module")
def teacher(runs, sft_data, tmp_path_factory):
    """A checkpoint of the same shape trained (in one process) on the task: the teacher."""
    workdir = tmp_path_factory.mktemp("teacher")
    run_command(
        [
            sys.executable,
            str(REPO / "finetune_r1.py"),
            *deepseek(2),
            *sft_data,
            "--train-iters",
            "6",
            "--lr",
            "1e-2",
            "--save",
            "teacher",
        ],
        workdir,
    )
    return workdir / "teacher"


@pytest.mark.parametrize("variant", ["sft", "distillation", "lora", "lora_grouped_gemm"])
def test_fine_tuning_under_tensor_and_expert_parallelism_equals_one_process(runs, sft_data, teacher, variant):
    """Full SFT (packed samples) under TP=2 + SP with EP=2; SFT from a teacher (lm and kd losses; the
    teacher in the student's layout) under TP=2 + SP; LoRA adapters on every linear (routed experts
    too, also computed as grouped GEMMs) under TP=2 + SP with EP=2."""
    if variant == "sft":
        flags, layout = [], [*TP2, "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"]
    elif variant == "distillation":
        flags, layout = ["--teacher-load", str(teacher), "--kd-ce-weight", "0.5", "--kd-kl-weight", "0.5"], TP2
    else:
        # Adam's step is ~lr for any gradient well above its eps: on elements whose gradient is
        # ~1e-7, summation-order differences (1e-7 of that) would move the adapters by more than
        # 1e-5 of their norm in 3 steps. A larger eps keeps such elements' steps proportional.
        flags = ["--pretrained-checkpoint", str(teacher), "--lora", "--lora-rank", "4", "--lr", "1e-2",
                 "--adam-eps", "1e-5"]  # fmt: skip
        layout = [*TP2, "--expert-tensor-parallel-size", "1", "--expert-model-parallel-size", "2"]
        layout += ["--moe-grouped-gemm"] if variant == "lora_grouped_gemm" else []
    argv = [*deepseek(2), *sft_data, *flags]
    assert_same_training(runs(TWO, "finetune_r1.py", [*argv, *layout]), runs([sys.executable], "finetune_r1.py", argv))
