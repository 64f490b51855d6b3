"""The CPU runtime: megatron-core on CPU + gloo (the parallel layouts through the entry points:
tests/test_layouts.py)."""

import subprocess
import sys

import pytest
import torch

from megatron_r1 import platform


def test_noop_when_cuda_is_available():
    code = """
import torch
torch.cuda.is_available = lambda: True
originals = (torch.zeros, torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda)
from megatron_r1 import platform
assert platform.use_cpu_if_no_cuda() is False
assert not platform.is_active()
assert originals == (torch.zeros, torch.cuda.current_device, torch.Tensor.type, torch.Tensor.cuda)
assert platform.distributed_backend() == "nccl"
import megatron.core.jit
assert megatron.core.jit.jit_fuser is torch.compile  # megatron-core's fusions compile as usual
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime only")
def test_megatron_core_loads_without_torchdynamo_on_cpu():
    """Compilation is off without CUDA, so megatron-core's torch.compile decorators stay no-ops and
    its import does not load TorchDynamo and Inductor (~3 s of every process's start)."""
    code = """
import sys, types
import megatron_r1.training
from megatron.core.fusions import fused_bias_swiglu
assert type(fused_bias_swiglu.swiglu) is types.FunctionType, type(fused_bias_swiglu.swiglu)
assert "torch._dynamo" not in sys.modules and "torch._inductor" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime only")
def test_meta_device_construction_still_works_on_the_cpu_runtime():
    """In a fresh process (torch caches which factories `with torch.device(...)` redirects): building
    a model on the meta device allocates nothing once the runtime has wrapped the factories."""
    code = """
import torch
from megatron_r1 import platform
platform.use_cpu_if_no_cuda()
with torch.device("meta"):
    assert torch.empty(4).device.type == "meta"
    assert torch.nn.Linear(4, 4).weight.device.type == "meta"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime only")
def test_cpu_stands_in_for_the_cuda_device():
    assert platform.use_cpu_if_no_cuda() is True
    assert platform.distributed_backend() == "gloo"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.cuda.current_device()).device.type == "cpu"
    weight = torch.ones(2)
    assert weight.type() == "torch.cuda.FloatTensor"
    assert weight.type(torch.float64).dtype == torch.float64  # conversions untouched
    assert torch.ones(2, dtype=torch.int64).type() == "torch.LongTensor"
    assert weight.cuda() is weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runtime only")
def test_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import random as mcore_random

    platform.use_cpu_if_no_cuda()
    mcore_random.initialize_rng_tracker(force_reset=True)
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 77)
    torch.manual_seed(5)
    with tracker.fork("model-parallel-rng"):
        forked_first = torch.rand(3)
    after_fork = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        forked_second = torch.rand(3)

    torch.manual_seed(5)
    assert torch.equal(after_fork, torch.rand(3)), "fork must restore the default stream"
    torch.manual_seed(77)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([forked_first, forked_second]), expected)


def test_distributed_timeout_reaches_every_process_group(monkeypatch):
    """--distributed-timeout-minutes bounds the default group's and megatron-core's groups' waits."""
    import datetime

    from megatron.core import parallel_state

    from megatron_r1.arguments import parse_args
    from megatron_r1.distributed import destroy_distributed
    from megatron_r1.training import setup

    monkeypatch.setenv("WORLD_SIZE", "1")
    setup(
        parse_args(
            "test",
            [
                "--mock-data",
                "--vocab-size",
                "64",
                "--num-layers",
                "1",
                "--hidden-size",
                "16",
                "--num-attention-heads",
                "2",
                "--distributed-timeout-minutes",
                "3",
            ],
        )
    )
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        groups = [torch.distributed.distributed_c10d._get_default_group(), parallel_state.get_data_parallel_group()]
        assert [group._get_backend(device).options._timeout for group in groups] == [datetime.timedelta(minutes=3)] * 2
    finally:
        destroy_distributed()


def test_megatron_cores_missing_package_warnings_are_not_repeated_per_module_and_rank():
    """megatron-core warns from six modules that TransformerEngine/Apex are absent; importing the
    training code prints none of them (training.setup says it once on a GPU machine)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import megatron_r1.training"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "not installed" not in result.stderr, result.stderr[-2000:]
