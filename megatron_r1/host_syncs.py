"""Counting the places where the host would wait for a GPU, on any device (benchmarks, tests).

On CUDA, torch's sync debug mode reports every synchronisation. On CPU nothing waits, so the
calls that would are counted instead: ``Tensor.item/.tolist/.cpu`` on tensors of the device, and
the operators whose output size depends on their input's values (``masked_select``, ``nonzero``,
``unique`` ...), which on a GPU must tell the host that size before it can go on.
"""

import collections
import contextlib
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = ("item", "tolist", "cpu")
_aten = torch.ops.aten
DATA_DEPENDENT_SIZE_OPS = {
    _aten.masked_select.default: "masked_select",
    _aten.nonzero.default: "nonzero",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}


class _DataDependentSizes(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT_SIZE_OPS and kwargs.get("output_size") is None:
            self.counts[DATA_DEPENDENT_SIZE_OPS[func]] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs_counted(device: torch.device):
    """A Counter of the host syncs inside the block, by kind: item/tolist/cpu calls on tensors of
    `device`; on CPU the data-dependent-size operators; on CUDA the syncs torch's sync debug mode
    reports ("cuda sync debug")."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, method):
        def wrapper(tensor, *args, **kwargs):
            counts[name] += tensor.device.type == device.type
            return method(tensor, *args, **kwargs)

        return wrapper

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        with warnings.catch_warnings(record=True) as reported, _sizes_counted(device, counts):
            warnings.simplefilter("always")
            yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    if device.type == "cuda":
        counts["cuda sync debug"] = sum("synchroniz" in str(warning.message) for warning in reported)


@contextlib.contextmanager
def _sizes_counted(device: torch.device, counts: collections.Counter):
    """CUDA: its sync debug mode (which sees these operators' syncs too); elsewhere: the operators."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        with _DataDependentSizes(counts):
            yield
