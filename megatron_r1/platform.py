"""Run megatron-core on a machine without CUDA (CPU + gloo).

megatron-core 0.16 assumes a CUDA device throughout: it allocates on ``torch.cuda.current_device()``,
checks tensor type names such as ``'torch.cuda.FloatTensor'``, seeds and forks the CUDA RNG, and
synchronises CUDA streams. On a machine where ``torch.cuda.is_available()`` is False,
:func:`use_cpu_if_no_cuda` redirects those few sources of the device choice to the CPU, so that the
unmodified megatron-core code path (models, schedules, DDP, optimizers, dist_checkpointing) runs on
CPU with the gloo backend. On a CUDA machine it does nothing at all.

Every workaround lives here, each tied to the megatron-core site it serves (see
``shared/notes/megatron-core-on-cpu.md`` in the project for the measured failure list).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import types

import torch
import torch.utils._device

_active = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def use_cpu_if_no_cuda() -> bool:
    """Make megatron-core run on CPU when CUDA is absent; a no-op on a CUDA machine.

    Call before importing/using megatron-core models. Idempotent. Returns True when the CPU runtime
    is active.
    """
    global _active
    if _active:
        return True
    if not cuda_absent():
        return False
    _redirect_cuda_device_queries()
    _redirect_cuda_factory_literals()
    _report_cpu_tensors_as_device_tensors()
    _use_cpu_generator_for_cuda_rng()
    _fix_megatron_sites()
    _active = True
    return True


def is_active() -> bool:
    return _active


def _redirect_cuda_device_queries():
    """megatron-core allocates with ``device=torch.cuda.current_device()`` (~40 sites) and syncs
    with ``torch.cuda.synchronize()``; on CPU the current device is the CPU and there is nothing to
    synchronise. Streams and events map onto torch.cpu's stream (a no-op stream)."""
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.default_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.Stream = _CPUStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Event = _CPUEvent
    torch.cuda.nvtx.range_push = lambda msg: None
    torch.cuda.nvtx.range_pop = lambda: None
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    # Literal `.cuda()` calls (model wrappers, loss-scale buffers) keep tensors where they are.
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self
    torch.nn.Module.cuda = lambda self, device=None: self


_TENSOR_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)  # fmt: skip


def _redirect_cuda_factory_literals():
    """Some sites create tensors with a literal ``device="cuda"`` (schedules.py total_num_tokens,
    clip_grads.py, optimizer.py, transformer/utils.py causal masks). Only the factory functions are
    wrapped, not every op, so compute pays nothing.

    torch caches the set of factories that ``with torch.device(...)`` redirects on first use; it is
    filled here, before wrapping, so that it holds the functions the wrappers call and meta-device
    construction keeps working."""
    torch.utils._device._device_constructors()
    for name in _TENSOR_FACTORIES:
        setattr(torch, name, _with_cuda_device_on_cpu(getattr(torch, name)))


def _with_cuda_device_on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    factory_on_cpu.__wrapped__ = factory
    factory_on_cpu.__doc__ = factory.__doc__
    return factory_on_cpu


class _CPUStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CPUEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CPUEvent:
    """Stand-in for torch.cuda.Event: CPU work is complete when the call returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_CPU_TO_DEVICE_TYPE_NAME = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _report_cpu_tensors_as_device_tensors():
    """The optimizers and grad clipping dispatch on ``param.type() == 'torch.cuda.FloatTensor'``
    (clip_grads.py, optimizer.py, distrib_optimizer.py). With no CUDA the CPU is the training
    device, so a bare ``.type()`` of a CPU float tensor answers with the device type name.
    Conversions (``.type(dtype)``) are untouched."""
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return _CPU_TO_DEVICE_TYPE_NAME.get(name, name)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _use_cpu_generator_for_cuda_rng():
    """Dropout and weight init draw from the CPU generator on CPU, so the model-parallel RNG
    tracker (tensor_parallel/random.py) must save, seed and fork the CPU generator."""
    from megatron.core.tensor_parallel import random as mcore_random

    # (torch.cuda.manual_seed_all stays: torch.manual_seed itself calls it.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # fork() warns whenever the CPU generator moved inside a forked region; on CPU that generator
    # *is* the forked one, so the warning would fire on every dropout.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage()
    )


def _fix_megatron_sites():
    """Individual megatron-core sites that the redirections above do not reach."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The alltoall dispatcher keeps its split sizes as tensors unless they are CUDA tensors
    # (maybe_move_tensor_to_cpu only converts `is_cuda` tensors), and all_to_all_single wants lists.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_tensor_to_cpu

    # With expert tensor parallelism and EP > 1 the alltoall dispatcher gathers (and, backwards,
    # reduce-scatters) a different number of tokens from each expert-TP rank. NCCL's list all_gather
    # and reduce_scatter take uneven sizes, gloo's refuse them; gloo's all_to_all_single takes them.
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        input_ = input_.contiguous()
        output = input_.new_empty((sum(output_split_sizes), *input_.shape[1:]))
        # Every rank sends its whole input to every rank (itself included).
        copies = input_.repeat(group.size(), *[1] * (input_.dim() - 1))
        torch.distributed.all_to_all_single(
            output, copies, output_split_sizes, [input_.shape[0]] * group.size(), group=group
        )
        return output

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        own_size = input_split_sizes[group.rank()]
        # Every rank's rows for this rank, stacked by source rank, then summed.
        received = input_.new_empty((group.size() * own_size, *input_.shape[1:]))
        torch.distributed.all_to_all_single(
            received, input_.contiguous(), [own_size] * group.size(), list(input_split_sizes), group=group
        )
        return received.view(group.size(), own_size, *input_.shape[1:]).sum(dim=0)

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim

    # Gradient-accumulation fusion (Megatron-LM's default): weight gradients accumulate straight into
    # the DDP grad buffer, instead of a fresh gradient per micro-batch that a hook then adds in.
    # Apex's CUDA kernel for it is `main_grad += grad_output^T @ input`, which is one in-place GEMM.
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = _CPUWeightGradientAccumulation
    layers._grad_accum_fusion_available = True

    # megatron's jit_fuser is torch.compile: on CPU a cold compile costs tens of seconds for no
    # fused kernel worth having. TORCH_COMPILE_DISABLE=0 in the environment keeps it on.
    if not _compiling_kept():
        os.environ["TORCH_COMPILE_DISABLE"] = "1"  # read when TorchDynamo loads
        if "torch._dynamo" in sys.modules:
            torch._dynamo.config.disable = True


def megatron_core_import_spec():
    """How to import megatron.core (megatron_r1/__init__.py asks before its first import): as it is
    with CUDA; without, with torch.compile a no-op while its modules load. megatron-core decorates
    its fusions with torch.compile (megatron.core.jit), which loads TorchDynamo and Inductor, ~3 s
    per process; compilation is off on CPU anyway (above), so the functions run as written either
    way. TORCH_COMPILE_DISABLE=0 keeps torch.compile."""
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not cuda_absent() or _compiling_kept():
        return spec
    load = spec.loader.exec_module

    def load_without_compiling(module):
        compile_ = torch.compile
        torch.compile = _compile_nothing
        try:
            load(module)
        finally:
            torch.compile = compile_

    spec.loader.exec_module = load_without_compiling
    return spec


def _compiling_kept() -> bool:
    """TORCH_COMPILE_DISABLE=0: the user keeps torch.compile on CPU."""
    return os.environ.get("TORCH_COMPILE_DISABLE") == "0"


def _compile_nothing(model=None, **options):
    """torch.compile's calling forms (decorator with or without options), compiling nothing."""
    return model if model is not None else (lambda function: function)


def _accumulate_weight_gradient(input, grad_output, main_grad):
    """Apex's fused_weight_gradient_mlp_cuda kernels on CPU: ``main_grad += grad_output^T @ input``
    for 2-D [tokens, in] / [tokens, out] operands, in main_grad's precision (fp32 under --bf16)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), input.to(main_grad.dtype))


_CPUWeightGradientAccumulation = types.SimpleNamespace(
    wgrad_gemm_accum_fp32=_accumulate_weight_gradient, wgrad_gemm_accum_fp16=_accumulate_weight_gradient
)


def gradient_accumulation_fusion_available() -> bool:
    """Whether megatron-core's linear layers can accumulate weight gradients in place: Apex's CUDA
    extension, or the CPU runtime's GEMM."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available


def rope_fusion_available(config) -> bool:
    """Whether megatron-core has a fused RoPE kernel for this model here: for MLA with yarn, its
    Triton kernel (CUDA); for other RoPE, TransformerEngine's."""
    if cuda_absent() or config.rotary_interleaved:
        return False
    if config.multi_latent_attention:
        from megatron.core.transformer import multi_latent_attention

        return config.rope_type == "yarn" and multi_latent_attention.fused_apply_mla_rope_for_q is not None
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def distributed_backend() -> str:
    """The process-group backend for this machine: nccl with CUDA, gloo on CPU."""
    return "gloo" if cuda_absent() else "nccl"


def compute_device() -> torch.device:
    """Where this process computes: its CUDA device (torchrun's LOCAL_RANK, set by
    initialize_distributed), or the CPU without CUDA. Every placement (model chunks, adapters,
    the distillation teacher, batches, sampling generators, tensors handed to collectives) asks
    here, so a test can point it at another device and see what was left behind."""
    if cuda_absent():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def to_device(batch: dict) -> dict:
    """A batch's tensors on the compute device (other values as they are); from pinned memory
    without blocking the host on CUDA (the copy overlaps with the work queued before it)."""
    device = compute_device()

    def place(value):
        if not torch.is_tensor(value) or value.device == device:
            return value
        if device.type != "cuda" or value.device.type != "cpu":
            return value.to(device)
        return value.pin_memory().to(device, non_blocking=True)

    return {key: place(value) for key, value in batch.items()}
