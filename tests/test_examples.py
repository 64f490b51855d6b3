"""The presets in examples/: the tiny one trains on CPU; the DeepSeek ones launch the published
shapes with flags that pass pretrain_r1.py's validation for their default layouts."""

import os
import re
import shlex
import subprocess
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_preset(script, tmp_path, timeout=120, **env):
    # One thread per process: CPU tests share the machine.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    for name in ("DATA_PATH", "TOKENIZER_MODEL", "MASTER_ADDR", "EXTRA_ARGS", "DRY_RUN"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(["bash", str(EXAMPLES / script)], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def dry_run_flags(result):
    command = shlex.split(result.stdout.splitlines()[0])
    return command, command[command.index("pretrain_r1.py") + 1 :]


def test_tiny_preset_trains_in_two_tensor_parallel_processes(tmp_path):
    result = run_preset("pretrain_tiny.sh", tmp_path, GPUS_PER_NODE="2", TP="2", TRAIN_ITERS="2", EVAL_INTERVAL="2",
                        TENSORBOARD_DIR=str(tmp_path / "tb"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    iterations = re.findall(r"^ iteration +(\d+)/ +2 \|.*lm loss: (\S+) \|.*mtp_1 loss", result.stdout, re.M)
    assert [number for number, _ in iterations] == ["1", "2"], result.stdout
    assert float(iterations[1][1]) < float(iterations[0][1])
    assert "validation loss at iteration 2" in result.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tiny_preset_environment_becomes_flags(tmp_path):
    result = run_preset("pretrain_tiny.sh", tmp_path, DRY_RUN="1", GPUS_PER_NODE="4", EP="2", PP="2",
                        EXTRA_ARGS="--lr 1e-3")  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "4"]
    joined = " ".join(flags)
    assert "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2" in joined
    # Data parallel 2: the optimizer is sharded; TP 1: no sequence parallelism; mock data by default.
    assert "--use-distributed-optimizer" in flags and "--sequence-parallel" not in flags
    assert "--mock-data" in flags and flags[-2:] == ["--lr", "1e-3"]
    assert result.stdout.strip().splitlines()[-1].startswith("total 1.9M params (MTP 417.4K), active 950.0K per token")


def test_data_path_without_tokenizer_is_refused(tmp_path):
    result = run_preset("pretrain_tiny.sh", tmp_path, DATA_PATH="data/corpus_text_document")
    assert result.returncode == 2
    assert "DATA_PATH needs TOKENIZER_MODEL" in result.stderr


def test_deepseek_v2_lite_preset(tmp_path):
    result = run_preset("pretrain_deepseek_v2_lite.sh", tmp_path, DRY_RUN="1")
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    assert "--expert-model-parallel-size 8 --use-distributed-optimizer" in " ".join(flags)
    assert "--bf16" in flags and "--q-lora-rank" not in flags
    assert result.stdout.strip().splitlines()[-1].startswith("total 15.7B params, active 2.5B per token")


def test_deepseek_v3_preset_on_128_nodes(tmp_path):
    result = run_preset("pretrain_deepseek_v3.sh", tmp_path, DRY_RUN="1", MASTER_ADDR="node0", NODE_RANK="5")
    assert result.returncode == 0, result.stderr[-4000:]
    command, flags = dry_run_flags(result)
    assert command[:10] == ["torchrun", "--nnodes", "128", "--node-rank", "5", "--master-addr", "node0",
                            "--master-port", "29500", "--nproc-per-node"]  # fmt: skip
    joined = " ".join(flags)
    assert "--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1 --expert-model-parallel-size 64 " \
           "--expert-tensor-parallel-size 2 --sequence-parallel --use-distributed-optimizer" in joined
    # 671B + the MTP module; 36.6B active in the main model + 0.7B in MTP.
    assert result.stdout.strip().splitlines()[-1].startswith("total 682.6B params (MTP 11.6B), active 37.3B per token")


def test_multi_node_launch_needs_master_addr(tmp_path):
    result = run_preset("pretrain_deepseek_v3.sh", tmp_path, DRY_RUN="1")
    assert result.returncode != 0
    assert "a multi-node run needs MASTER_ADDR" in result.stderr
