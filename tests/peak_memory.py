"""How far a checkpoint conversion raises the peak memory of the process (Linux: /proc/self/status
and /proc/self/clear_refs), for the tests of conversions in bounded memory."""

import re
import sys
from pathlib import Path

import pytest
from conftest import run_command

needs_clear_refs = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs"
)
# In a fresh process: convert the first model once (imports done, allocator warmed up), then for each
# model: reset the peak RSS (VmHWM) to the current RSS, convert the model, print how far the peak rose.
MEASURE = r"""
import importlib, re, sys

def status(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def main():
    from megatron_r1.hf.storage import unmap_freed_tensors
    unmap_freed_tensors()  # as tools/convert_checkpoint.py
    from megatron_r1.distributed import initialize_distributed
    module, function, output, part_bytes, *models = sys.argv[1:]
    convert = getattr(importlib.import_module(module), function)
    initialize_distributed()
    convert(models[0], output, max_part_bytes=int(part_bytes), progress=False)
    for model in models:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = status("VmRSS")
        convert(model, output, max_part_bytes=int(part_bytes), progress=False)
        print("peak rise KiB", status("VmHWM") - start)

if __name__ == "__main__":
    main()
"""


def peak_rises_mib(tmp_path: Path, converter: str, part_bytes: int, *models: Path) -> list[float]:
    """How far converting each of `models` raises the peak RSS, in MiB, in one fresh process;
    `converter`: "module:function", called as ``function(model, output, max_part_bytes=part_bytes,
    progress=False)``."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    module, function = converter.split(":")
    command = [sys.executable, str(script), module, function, str(tmp_path / "out"), str(part_bytes), *map(str, models)]
    result = run_command(command, tmp_path, timeout=300)
    return [int(kib) / 1024 for kib in re.findall(r"peak rise KiB (\d+)", result.stdout)]
