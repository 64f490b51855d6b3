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
        "from megatron_r1.distributed import destroy_distributed, initialize_distributed\n"
        "initialize_distributed()\n"
        "tensors = dist_checkpointing.load_plain_tensors(sys.argv[1])\n"
        "torch.save({k: v for k, v in tensors.items() if torch.is_tensor(v)}, sys.argv[2])\n"
        # Exiting with the process group alive can abort in its threads' teardown (std::terminate).
        "destroy_distributed()\n"
    )
    out = Path(path).parent / f"{Path(path).name}.pt"
    run_command([sys.executable, "-c", code, str(path), str(out)], Path(path).parent)
    return torch.load(out, weights_only=True)


def preset_model_flags(script: str) -> list[str]:
    """The model flags (MODEL_ARGS, MLA_ARGS, MOE_ARGS) of examples/`script`, sourced without launching."""
    source = 'source <(sed "/^source examples\\/launch.sh/,\\$d" "$0"); printf "%s\\n" "${MODEL_ARGS[@]}" "${MLA_ARGS[@]}" "${MOE_ARGS[@]}"'
    repo = Path(__file__).resolve().parents[1]
    return run_command(["bash", "-c", source, f"examples/{script}"], repo).stdout.splitlines()


def assert_round_trip_weights(trained, imported, vocab_size: int) -> None:
    """Checkpoint directory `imported` (hf2mcore of `trained`'s export) holds `trained`'s tensors bit for
    bit, but for the vocabulary's padding rows, which the export drops and the import fills with zeros
    (needs a one-process megatron-core parallel state)."""
    from megatron_r1.hf.storage import McoreCheckpointReader

    first, second = McoreCheckpointReader(str(trained)), McoreCheckpointReader(str(imported))
    assert sorted(first.keys()) == sorted(second.keys())
    first, second = first.load(first.keys()), second.load(second.keys())
    for key in first:
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(first[key][:vocab_size], second[key][:vocab_size]), key
            assert not second[key][vocab_size:].any(), f"{key}: padding rows should be zero"
        else:
            assert torch.equal(first[key], second[key]), key
