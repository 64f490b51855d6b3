"""Process groups and seeds: torch.distributed (nccl on GPU, gloo on CPU) and megatron-core's
model-parallel state."""

import contextlib
import datetime
import os
import random
import socket

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_r1 import platform


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: float = 10,
) -> None:
    """Join (or, when launched without torchrun, create a one-process) process group and set up
    megatron-core's tensor/pipeline/expert/data parallel groups and RNG states. A collective that
    waits longer than `timeout_minutes` (--distributed-timeout-minutes) fails the run."""
    platform.use_cpu_if_no_cuda()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / srun
            torch.distributed.init_process_group(backend=platform.distributed_backend(), timeout=timeout)
        else:  # plain `python script.py`: a world of one
            torch.distributed.init_process_group(
                backend=platform.distributed_backend(),
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_random_seed(seed)


def set_random_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank, then megatron-core's model-parallel
    RNG tracker (distinct streams per TP/EP rank for dropout and sharded init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def parameters_gathered(model_chunks):
    """All parameters up to date on every rank for the block: --overlap-param-gather leaves the
    all-gather of the updated parameters to the next forward pass (its pre-hooks, bucket by
    bucket), so evaluation and checkpoints gather them first, as Megatron-LM does."""
    deferred = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in deferred:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in deferred:
            chunk.enable_forward_pre_hook()
