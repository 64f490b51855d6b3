"""Helpers the tests share: running a command, reading a checkpoint's tensors."""

import functools
import subprocess
import sys
from pathlib import Path

import torch


def run_command(cmd, cwd, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stderr[-6000:]}"
    return result


@functools.cache
def plain_tensors(path):
    """Every tensor of a checkpoint (model and optimizer state), read in a one-process world; read
    once per path (the tests compare a checkpoint several times, never after overwriting it)."""
    code = (
        "import sys, torch\n"
        "import megatron_r1\n"
        "from megatron.core import dist_checkpointing\n"
        "from megatron_r1.distributed import initialize_distributed\n"
        "initialize_distributed()\n"
        "tensors = dist_checkpointing.load_plain_tensors(sys.argv[1])\n"
        "torch.save({k: v for k, v in tensors.items() if torch.is_tensor(v)}, sys.argv[2])\n"
    )
    out = Path(path).parent / f"{Path(path).name}.pt"
    run_command([sys.executable, "-c", code, str(path), str(out)], Path(path).parent)
    return torch.load(out, weights_only=True)
