"""Initial weights that depend on the seed and on each weight's global identity only, never on the
parallel layout.

megatron-core draws a weight where it constructs it, from the RNG stream of the moment: a
tensor-parallel shard is cut from a whole matrix drawn on every rank (use_cpu_initialization), but
under expert or pipeline parallelism each rank constructs other layers and experts in another
order, so the same seed gives another model (one process vs EP=2: iteration-1 losses 1% apart).
Here every weight is drawn again from a generator seeded by (seed, checkpoint key, expert number):
the same key names the same weight in every layout (megatron_r1.sharded_tensors), so each rank
draws whole the weights it holds a piece of, and keeps its piece. Each rank draws only its own
layers and experts; a tensor-parallel rank draws the whole matrix of its shard (as
use_cpu_initialization does), one matrix at a time.

The distribution of each weight is megatron-core's: ``config.init_method`` (normal, std
--init-method-std), ``config.output_layer_init_method`` (std / sqrt(2 x layers)) for the
projections back into the residual stream, ``config.embedding_init_method`` for embeddings, and
LoRA's A as megatron_r1.lora draws it. Biases start at zero, as megatron-core sets them; norm
weights keep the ones their modules start with. megatron-core itself draws nothing
(megatron_r1.model builds with perform_initialization off), so each weight is drawn once, on the CPU
(the same numbers whatever the device), and copied to wherever its chunk lives.
"""

import hashlib

import torch

from megatron_r1.lora import initialize_adapter_a
from megatron_r1.sharded_tensors import flat_sharded_tensors, local_slices

# Key endings of the weights megatron-core initialises with output_layer_init_method.
_RESIDUAL_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def _init_function(key: str, config):
    """How megatron-core draws the weight under checkpoint key `key` (None: a constant)."""
    if key.endswith("lora_a"):
        return initialize_adapter_a
    if key.endswith("lora_b"):
        return None
    if "embeddings" in key and key.endswith(".weight"):
        return config.embedding_init_method
    if key.endswith(_RESIDUAL_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    return config.init_method


def _generator_seed(seed: int, key: str, prepended: tuple) -> int:
    """A stable 63-bit seed for one global weight (Python's hash() differs between processes)."""
    identity = f"{seed}/{key}/{'.'.join(map(str, prepended))}".encode()
    return int.from_bytes(hashlib.sha256(identity).digest()[:8], "little") >> 1


def _draw(init, shape, seed: int) -> torch.Tensor:
    """`init` applied to a new fp32 CPU tensor of `shape` with the CPU generator at `seed`, the
    process' own RNG state left as it was (dropout and routing streams go on unchanged)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        tensor = torch.empty(shape, dtype=torch.float32)
        init(tensor)
    return tensor


def initialize_by_identity(model, config, seed: int) -> int:
    """Draw every randomly initialised weight of `model` (one GPTModel chunk, on any device) by its
    identity and zero its biases; returns how many global tensors were drawn."""
    drawn = 0
    for key, pieces in flat_sharded_tensors(model).items():
        init = _init_function(key, config)
        constant = pieces[0].data.dim() < 2 and not key.endswith("router.bias")  # norms, biases
        if constant and key.endswith("bias"):
            with torch.no_grad():
                for piece in pieces:
                    piece.data.zero_()
        if init is None or constant:
            continue
        prepended = pieces[0].prepend_axis_num
        by_position = {}  # expert number (the prepended axes' position) -> its pieces
        for piece in pieces:
            by_position.setdefault(tuple(piece.global_offset[:prepended]), []).append(piece)
        for position, group in by_position.items():
            whole = _draw(init, tuple(group[0].global_shape[prepended:]), _generator_seed(seed, key, position))
            with torch.no_grad():
                for piece in group:
                    piece.data.copy_(whole[local_slices(piece)])
            drawn += 1
    return drawn
