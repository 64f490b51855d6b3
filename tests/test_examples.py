"""The presets in examples/: the tiny one trains on CPU; the DeepSeek ones launch the published
shapes with flags that pass pretrain_r1.py's validation for their default layouts and fit 80 GB GPUs,
and so do their GRPO presets, whose dry runs count the reference policy and the KV cache;
the fine-tuning and conversion scripts run on the tiny model (pre-train -> SFT -> HF -> back).
The SLURM files run with a stand-in srun (one run per node, in turn) and scontrol on PATH.
examples/quickstart.sh runs in tests/test_quickstart.py."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sft_task import train_task_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun inside a job: runs the command once per node of the allocation (in turn), as task 0 of that
# node, with --output's %n replaced by the node's index.
echo "$*" >> "$FAKE_SLURM_LOG/srun"
output=/dev/stdout
while [[ $1 == --* ]]; do
    [[ $1 == --output=* ]] && output=${1#--output=}
    shift
done
if [[ -n "${FAKE_SRUN_WAITS_FOR_SIGNAL:-}" ]]; then  # a long run: SIGUSR1 ends it with the given status
    trap 'echo USR1 >> "$FAKE_SLURM_LOG/srun_signals"; exit "$FAKE_SRUN_WAITS_FOR_SIGNAL"' USR1
    touch "$FAKE_SLURM_LOG/srun_started"
    while true; do sleep 0.05; done
fi
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" >> "${output//%n/$node}" 2>&1 || exit $?
done
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol"
if [[ "$1 $2" == "show hostnames" ]]; then tr , '\n' <<< "$3"; fi
"""


def run_preset(script, tmp_path, timeout=120, **env):
    # One thread per process: CPU tests share the machine.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for name in (
        "DATA_PATH",
        "TOKENIZER_MODEL",
        "MASTER_ADDR",
        "EXTRA_ARGS",
        "DRY_RUN",
        "PRETRAINED",
        "SFT_DATA",
        "VALID_DATA",
        "SAVE",
        "MERGED",
        "LOAD",
        "DIRECTION",
        "TP",
        "PP",
        "EP",
        "ETP",
        "PROMPT_DATA",
        "GROUP_SIZE",
        "KL_COEF",
        "GPU_MEMORY_GB",
        "PROMPTS_PER_STEP",
        "ROLLOUT_BATCH_SIZE",
    ):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        ["bash", str(EXAMPLES / script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout
    )


def dry_run_flags(result, entry="pretrain_r1.py"):
    command = shlex.split(result.stdout.splitlines()[0])
    return command, command[command.index(entry) + 1 :]


def test_tiny_preset_trains_in_two_tensor_parallel_processes(tmp_path):
    result = run_preset(
        "pretrain_tiny.sh",
        tmp_path,
        GPUS_PER_NODE="2",
        TP="2",
        TRAIN_ITERS="2",
        EVAL_INTERVAL="2",
        TENSORBOARD_DIR=str(tmp_path / "tb"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    iterations = re.findall(r"^ iteration +(\d+)/ +2 \|.*lm loss: (\S+) \|.*mtp_1 loss", result.stdout, re.M)
    assert [number for number, _ in iterations] == ["1", "2"], result.stdout
    assert float(iterations[1][1]) < float(iterations[0][1])
    assert "validation loss at iteration 2" in result.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tiny_preset_environment_becomes_flags(tmp_path):
    result = run_preset(
        "pretrain_tiny.sh", tmp_path, DRY_RUN="1", GPUS_PER_NODE="4", EP="2", PP="2", EXTRA_ARGS="--lr 1e-3"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "4"]
    joined = " ".join(flags)
    assert "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2" in joined
    # Data parallel 2: the optimizer is sharded; TP 1: no sequence parallelism; mock data by default.
    assert "--use-distributed-optimizer" in flags and "--sequence-parallel" not in flags
    assert "--mock-data" in flags and flags[-2:] == ["--lr", "1e-3"]
    assert result.stdout.strip().splitlines()[-1].startswith("total 1.9M params (MTP 417.5K), active 950.5K per token")


def test_data_path_without_tokenizer_is_refused(tmp_path):
    result = run_preset("pretrain_tiny.sh", tmp_path, DATA_PATH="data/corpus_text_document")
    assert result.returncode == 2
    assert "DATA_PATH needs TOKENIZER_MODEL" in result.stderr


def test_deepseek_v2_lite_preset(tmp_path):
    result = run_preset("pretrain_deepseek_v2_lite.sh", tmp_path, DRY_RUN="1")
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    assert (
        "--expert-model-parallel-size 8 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather"
        in " ".join(flags)
    )
    assert "--bf16" in flags and "--q-lora-rank" not in flags
    assert result.stdout.strip().splitlines()[-1].startswith("total 15.7B params, active 2.5B per token")


def test_deepseek_v3_preset_on_128_nodes(tmp_path):
    result = run_preset("pretrain_deepseek_v3.sh", tmp_path, DRY_RUN="1", MASTER_ADDR="node0", NODE_RANK="5")
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:10] == [
        "torchrun",
        "--nnodes",
        "128",
        "--node-rank",
        "5",
        "--master-addr",
        "node0",
        "--master-port",
        "29500",
        "--nproc-per-node",
    ]
    joined = " ".join(flags)
    assert (
        "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --expert-model-parallel-size 64 "
        "--expert-tensor-parallel-size 2 --sequence-parallel --use-distributed-optimizer" in joined
    )
    # 671B + the MTP module; 36.6B active in the main model + 0.7B in MTP.
    assert result.stdout.strip().splitlines()[-1].startswith("total 682.6B params (MTP 11.6B), active 37.3B per token")
    # The documented layout: 128 nodes, experts over 64 x 2 GPUs, within the 80 GB of a GPU.
    assert "parallel layout: 1024 processes (128 nodes x 8)" in result.stdout
    assert "experts: ETP 2 x EP 64 x expert-DP 8 x PP 1" in result.stdout
    assert re.search(r"^peak \d+\.\d GB on pipeline stage 0: fits in 80 GB per GPU$", result.stdout, re.M)


def test_deepseek_v3_preset_in_deepseeks_uneven_pipeline_layout(tmp_path):
    """PP 16 x EP 64 without TP: 61 layers as 3 (the dense ones) + 14 x 4 + 2 (with the output layer and MTP)."""
    result = run_preset(
        "pretrain_deepseek_v3.sh",
        tmp_path,
        DRY_RUN="1",
        MASTER_ADDR="node0",
        TP="1",
        PP="16",
        ETP="1",
        EXTRA_ARGS="--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "pipeline stage 0 (ranks 0-63): layers 0-2 (3 dense, 0 MoE), embedding\n" in result.stdout
    assert "pipeline stage 1 (ranks 64-127): layers 3-6 (0 dense, 4 MoE)\n" in result.stdout
    assert (
        "pipeline stage 15 (ranks 960-1023): layers 59-60 (0 dense, 2 MoE), output layer, 1 MTP layer" in result.stdout
    )
    assert re.search(r"^peak \d+\.\d GB on pipeline stage 15: fits in 80 GB per GPU$", result.stdout, re.M)


def launch_flags(script, tmp_path, entry, **env):
    """The flags `script` launches `entry` with: its dry run's torchrun line (a stand-in `python` on
    PATH skips model_size.py's report)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    result = run_preset(script, tmp_path, DRY_RUN="1", PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", **env)
    assert result.returncode == 0, result.stderr[-4000:]
    return dry_run_flags(result, entry)[1]


def flag_values(flags, first, last):
    """{flag: value or None} of flags[first:last] (from the first occurrence of each bound)."""
    flags = flags[flags.index(first) : flags.index(last)]
    return {
        flag: None if value.startswith("--") else value
        for flag, value in zip(flags, flags[1:] + ["--"])
        if flag.startswith("--")
    }


# The MoE flags that RL sets differently from pre-training: no balance loss or expert-bias updates.
RL_MOE_FLAGS = {"--moe-router-bias-update-rate", "--moe-router-load-balancing-type", "--moe-aux-loss-coeff",
                "--mtp-loss-scaling-factor"}  # fmt: skip


@pytest.mark.parametrize(
    "script, pretrain_script, env, layout",
    [("grpo_deepseek_v3.sh", "pretrain_deepseek_v3.sh", {"MASTER_ADDR": "node0"},
      "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --expert-model-parallel-size 256 "
      "--expert-tensor-parallel-size 4 --sequence-parallel --use-distributed-optimizer"),
     ("grpo_deepseek_v2_lite.sh", "pretrain_deepseek_v2_lite.sh", {},
      "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 8 "
      "--use-distributed-optimizer")],
)  # fmt: skip
def test_grpo_deepseek_presets_dry_run(tmp_path, script, pretrain_script, env, layout):
    """The pre-training presets' model, PP 1, and a report that counts the reference policy and the KV
    cache within 80 GB."""
    result = run_preset(script, tmp_path, DRY_RUN="1", PRETRAINED="runs/sft", **env)
    assert result.returncode == 0, result.stderr[-4000:]
    _, flags = dry_run_flags(result, "grpo_r1.py")
    pretrain_flags = launch_flags(pretrain_script, tmp_path, "pretrain_r1.py", **env)
    model = ("--num-layers", "--num-experts")
    assert flag_values(flags, *model) == flag_values(pretrain_flags, *model)  # the model and its MLA
    moe = ("--num-experts", "--bf16")
    rl_moe, pretrain_moe = flag_values(flags, *moe), flag_values(pretrain_flags, *moe)
    assert {flag: value for flag, value in rl_moe.items() if flag not in RL_MOE_FLAGS} == {
        flag: value for flag, value in pretrain_moe.items() if flag not in RL_MOE_FLAGS
    }
    assert rl_moe["--moe-aux-loss-coeff"] == "0.0" and rl_moe.get("--moe-router-bias-update-rate", "0.0") == "0.0"
    assert layout in " ".join(flags)
    assert "--pretrained-checkpoint runs/sft --prompt-data megatron_r1/assets/tiny_grpo.jsonl" in " ".join(flags)
    # model_size.py --grpo took grpo_r1.py's flags and counted what GRPO adds to training.
    out = result.stdout
    assert re.search(r"^  reference policy: \d+\.\d\d GB \(bf16 weights sharded as the policy's", out, re.M)
    # One prompt per data-parallel rank: a rank's rollout batch is one group whatever --rollout-batch-size says.
    assert re.search(
        r"^  rollout KV cache: \d+\.\d\d GB \(\d+ sequences \(1 prompt\(s\) x group \d+\) x 4096 tokens", out, re.M
    )
    assert "(K 192 + V 128)" in out  # MLA's per-head K and V, as megatron-core's static cache holds them
    assert re.search(r"^peak \d+\.\d GB on pipeline stage 0: fits in 80 GB per GPU$", out, re.M)


def test_grpo_deepseek_v3_with_deepseek_r1s_group_does_not_fit_80gb(tmp_path):
    """DeepSeek-R1's group of 16 doubles the rollout's KV cache and logits: 87 GB in the default layout."""
    result = run_preset(
        "grpo_deepseek_v3.sh", tmp_path, DRY_RUN="1", MASTER_ADDR="node0", PRETRAINED="runs/sft", GROUP_SIZE="16"
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "rollout KV cache: 40.94 GB (16 sequences (1 prompt(s) x group 16) x 4096 tokens" in result.stdout
    assert "peak 87.0 GB on pipeline stage 0: does NOT fit in 80 GB per GPU (raise EP/ETP/TP" in result.stdout


def test_grpo_v2_lite_sizes_the_rollout_batch_and_no_reference(tmp_path):
    """ROLLOUT_BATCH_SIZE=0 decodes a rank's 4 prompts' groups together: 4 times the KV cache, more than
    80 GB even without the reference policy (KL_COEF=0)."""
    result = run_preset(
        "grpo_deepseek_v2_lite.sh", tmp_path, DRY_RUN="1", PRETRAINED="runs/sft", KL_COEF="0", ROLLOUT_BATCH_SIZE="0"
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "  reference policy: none (--kl-coef 0: no KL term)" in result.stdout
    assert "  rollout KV cache: 72.48 GB (64 sequences (4 prompt(s) x group 16) x 4096 tokens" in result.stdout
    assert "does NOT fit in 80 GB per GPU (raise EP/ETP/TP (GRPO refuses PP), shrink the KV cache" in result.stdout


def test_grpo_tiny_dry_run_checks_grpo_flags(tmp_path):
    """The tiny preset's dry run takes grpo_r1.py's flags too: they are checked for 2 processes (TP 2)
    and sized (the MTP layer frozen, the rollout's KV cache)."""
    result = run_preset("grpo_tiny.sh", tmp_path, DRY_RUN="1", GPUS_PER_NODE="2", TP="2", PRETRAINED="runs/sft")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "parallel layout: 2 processes (1 node x 2)" in result.stdout
    assert "  GRPO: MTP layers frozen (no grads or optimizer states)" in result.stdout
    assert "  rollout KV cache: " in result.stdout and " x group 4) x 128 tokens of prompt + response" in result.stdout
    result = run_preset("grpo_tiny.sh", tmp_path, DRY_RUN="1", PRETRAINED="runs/sft", EXTRA_ARGS="--grpo-group-size 1")
    assert result.returncode == 2 and "--grpo-group-size (1) must be at least 2" in result.stderr


def test_multi_node_launch_needs_master_addr(tmp_path):
    result = run_preset("pretrain_deepseek_v3.sh", tmp_path, DRY_RUN="1")
    assert result.returncode != 0
    assert "a multi-node run needs MASTER_ADDR" in result.stderr


def test_scripts_parse():
    scripts = sorted(EXAMPLES.glob("*.sh")) + sorted((EXAMPLES / "slurm").iterdir())
    assert len(scripts) >= 12
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def slurm_environment(tmp_path, nodes, **env):
    """A job's environment with the stand-ins first on PATH; submitted from the repository root."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "slurm").mkdir()
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATA_PATH", "TOKENIZER_MODEL", "MASTER_ADDR", "EXTRA_ARGS", "DRY_RUN", "PRESET")
    }
    environment.update(
        {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
            "FAKE_SLURM_LOG": str(tmp_path / "slurm"),
            "SLURM_SUBMIT_DIR": str(REPO_ROOT),
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "r1",
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": ",".join(f"gpu-{i:02d}" for i in range(7, 7 + nodes)),
            "SLURM_GPUS_ON_NODE": "8",
            "RUN_DIR": str(tmp_path / "run"),
            **env,
        }
    )
    return environment


def node_command(tmp_path, node):
    """The torchrun command and flags a node logged in its dry run."""
    log = (tmp_path / "run" / "logs" / f"node{node}.log").read_text()
    command = shlex.split(log.splitlines()[0])
    return command, command[command.index("pretrain_r1.py") + 1 :], log


def test_multinode_sbatch_launches_torchrun_on_every_node(tmp_path):
    environment = slurm_environment(tmp_path, nodes=2, DRY_RUN="1", PRESET="examples/pretrain_deepseek_v2_lite.sh")
    result = subprocess.run(
        ["bash", str(EXAMPLES / "slurm" / "pretrain_multinode.sbatch")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rendezvous gpu-07:29500" in result.stdout
    assert (tmp_path / "slurm" / "scontrol").read_text() == "show hostnames gpu-07,gpu-08\n"
    assert "--ntasks-per-node=1" in (tmp_path / "slurm" / "srun").read_text()
    for node in (0, 1):
        command, flags, log = node_command(tmp_path, node)
        # Both nodes meet at the first node's c10d rendezvous, named by the job id; torchrun assigns
        # the node ranks (it ignores --node-rank unless the rendezvous is static).
        assert command[:10] == [
            "torchrun",
            "--nnodes",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-id",
            "4242",
            "--rdzv-endpoint",
            "gpu-07:29500",
            "--nproc-per-node",
        ]
        assert command[10] == "8" and "--node-rank" not in command
        joined = " ".join(flags)
        assert (
            f"--save {tmp_path}/run/checkpoints --save-interval 1000 --exit-signal-handler --exit-signal SIGUSR1"
            in joined
        )
        assert f"--tensorboard-dir {tmp_path}/run/tensorboard" in joined
        # The dry run validated the flags for 16 processes and fitted them in 80 GB.
        assert "parallel layout: 16 processes (2 nodes x 8)" in log and "fits in 80 GB per GPU" in log
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_single_node_sbatch_runs_standalone(tmp_path):
    # Half a node's GPUs: the default preset (DeepSeek-V2-Lite) needs more than 80 GB each, so 141 GB ones.
    environment = slurm_environment(tmp_path, nodes=1, DRY_RUN="1", SLURM_GPUS_ON_NODE="4", EP="4", GPU_MEMORY_GB="141")
    result = subprocess.run(
        ["bash", str(EXAMPLES / "slurm" / "pretrain_single_node.sbatch")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    command, flags, log = node_command(tmp_path, 0)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "4"]
    assert "--num-experts 64" in " ".join(flags)  # the default preset: DeepSeek-V2-Lite
    assert "parallel layout: 4 processes (1 node x 4)" in log and "fits in 141 GB per GPU" in log


@pytest.mark.parametrize("exit_status, requeued", [(0, True), (1, False)])
def test_time_limit_signal_saves_then_requeues(tmp_path, exit_status, requeued):
    environment = slurm_environment(tmp_path, nodes=2, FAKE_SRUN_WAITS_FOR_SIGNAL=str(exit_status))
    job = subprocess.Popen(
        ["bash", str(EXAMPLES / "slurm" / "pretrain_multinode.sbatch")],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "slurm" / "srun_started").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@180` sends the batch shell
    stdout, stderr = job.communicate(timeout=30)
    assert (tmp_path / "slurm" / "srun_signals").read_text() == "USR1\n"  # passed on to srun
    assert job.returncode == exit_status, stdout + stderr
    calls = (tmp_path / "slurm" / "scontrol").read_text().splitlines()
    assert ("requeue 4242" in calls) == requeued
    if not requeued:
        assert "exited with status 1 after SIGUSR1: not requeued" in stderr


@pytest.mark.parametrize("script", ["finetune_sft.sh", "finetune_lora.sh"])
def test_finetuning_presets_dry_run(tmp_path, script):
    result = run_preset(
        script,
        tmp_path,
        DRY_RUN="1",
        GPUS_PER_NODE="2",
        TP="2",
        PRETRAINED="runs/base",
        SAVE="runs/ft",
        EXTRA_ARGS="--lr 1e-5",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result, "finetune_r1.py")
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    # The pretrained model's flags (the tiny preset's), the layout, then fine-tuning's own flags.
    _, pretrain_flags = dry_run_flags(run_preset("pretrain_tiny.sh", tmp_path, DRY_RUN="1"))
    model_flags = pretrain_flags[: pretrain_flags.index("--micro-batch-size")]
    assert flags[: len(model_flags)] == model_flags and "--qk-layernorm" in model_flags
    joined = " ".join(flags)
    assert (
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1 "
        "--sequence-parallel" in joined
    )
    assert "--pretrained-checkpoint runs/base --data-path megatron_r1/assets/tiny_sft.jsonl" in joined
    assert "--save runs/ft" in joined and "--mock-data" not in flags and flags[-2:] == ["--lr", "1e-5"]
    assert ("--lora" in flags) == (script == "finetune_lora.sh")
    if script == "finetune_lora.sh":
        assert "--transformer-impl local" in joined and "--lora-rank 8 --lora-alpha 16" in joined
        assert "merged" not in result.stdout  # a dry run merges nothing
    # model_size.py validated the shared flags for 2 processes and sized the model.
    assert "parallel layout: 2 processes (1 node x 2)" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("total 1.9M params (MTP 417.5K), active 950.5K per token")


@pytest.mark.parametrize("script", ["finetune_sft.sh", "finetune_lora.sh"])
def test_finetuning_presets_need_a_checkpoint_and_a_tokenizer(tmp_path, script):
    result = run_preset(script, tmp_path)
    assert result.returncode != 0 and "set PRETRAINED to the checkpoint to fine-tune" in result.stderr
    result = run_preset(script, tmp_path, PRETRAINED="runs/base")
    assert result.returncode == 2 and "set TOKENIZER_MODEL" in result.stderr


def test_export_needs_a_direction_it_knows(tmp_path):
    result = run_preset("export_hf.sh", tmp_path, LOAD="ckpt", DIRECTION="hf2hf")
    assert result.returncode == 2 and "DIRECTION=hf2hf: use mcore2hf or hf2mcore" in result.stderr


def test_pretrain_finetune_and_convert_both_ways(tmp_path):
    """The tiny preset pre-trains (1 iteration, with a tokenizer), finetune_sft.sh fine-tunes every
    weight from it on the bundled instruction set, export_hf.sh converts the result to Hugging Face
    and back, each conversion verified."""
    tokenizer = train_task_tokenizer(tmp_path)
    base, sft = tmp_path / "base", tmp_path / "sft"
    result = run_preset(
        "pretrain_tiny.sh",
        tmp_path,
        TRAIN_ITERS="1",
        EVAL_INTERVAL="1",
        TOKENIZER_MODEL=tokenizer,
        EXTRA_ARGS=f"--save {base} --save-interval 1",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    result = run_preset(
        "finetune_sft.sh",
        tmp_path,
        PRETRAINED=str(base),
        TOKENIZER_MODEL=tokenizer,
        SAVE=str(sft),
        TRAIN_ITERS="2",
        EVAL_INTERVAL="1",
        MICRO_BATCH_SIZE="2",
        GLOBAL_BATCH_SIZE="2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"starting weights: {base}/iter_0000001" in result.stdout
    assert re.findall(r"^ iteration +(\d+)/ +2 \|", result.stdout, re.M) == ["1", "2"]
    assert "LoRA" not in result.stdout and (sft / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    result = run_preset("export_hf.sh", tmp_path, LOAD=str(sft), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert '"top1_agreement": 1.0' in result.stdout
    assert (tmp_path / "sft-hf" / "config.json").is_file() and (tmp_path / "sft-hf" / "tokenizer.json").is_file()

    result = run_preset(
        "export_hf.sh", tmp_path, DIRECTION="hf2mcore", LOAD=str(tmp_path / "sft-hf"), TP="2", timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert '"top1_agreement": 1.0' in result.stdout
    assert "--qk-layernorm" in result.stdout.split("--finetune: ", 1)[1]  # the model flags to train it with
    assert (tmp_path / "sft-hf-mcore" / "latest_checkpointed_iteration.txt").is_file()
