"""Initial weights that depend on the seed and on each weight's global identity only, never on the
parallel layout or the device.

megatron-core draws a weight where it constructs it, from the RNG stream of the moment: a
tensor-parallel shard is cut from a whole matrix drawn on every rank (use_cpu_initialization), but
under expert or pipeline parallelism each rank constructs other layers and experts in another
order, so the same seed gives another model (one process vs EP=2: iteration-1 losses 1% apart).
Here every weight is drawn from generators seeded by (seed, checkpoint key, expert number, block):
the same key names the same weight in every layout (megatron_r1.sharded_tensors). A block is a run
of whole rows of about BLOCK_NUMBERS numbers, fixed by the weight's global shape, with a generator
of its own: each rank draws only its own layers and experts and, of those, the blocks holding its
pieces' rows (a column-parallel shard draws its rows only; a row-parallel one, all rows), the blocks
in parallel (one thread per torch thread), on the CPU, so the numbers are the same whatever the
device, and copies each piece to wherever its chunk lives.

The distribution of each weight is megatron-core's: ``config.init_method`` (normal, std
--init-method-std), ``config.output_layer_init_method`` (std / sqrt(2 x layers)) for the
projections back into the residual stream, ``config.embedding_init_method`` for embeddings, and
LoRA's A as megatron_r1.lora draws it (each an init function that takes a ``generator``). Biases
start at zero, as megatron-core sets them; norm weights keep the ones their modules start with.
megatron-core itself draws nothing (megatron_r1.model builds with no-op init methods).
"""

import concurrent.futures
import functools
import hashlib
import math

import torch

from megatron_r1.lora import initialize_adapter_a
from megatron_r1.sharded_tensors import flat_sharded_tensors, local_slices

# Numbers per block of a weight (whole rows): each block has a generator of its own, so a rank draws
# only the rows its pieces hold, and the blocks are drawn in parallel.
BLOCK_NUMBERS = 1 << 20

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


def _generator_seed(seed: int, key: str, prepended: tuple, block: int) -> int:
    """A stable 63-bit seed for one block of one global weight (Python's hash() differs between
    processes)."""
    identity = f"{seed}/{key}/{'.'.join(map(str, prepended))}/{block}".encode()
    return int.from_bytes(hashlib.sha256(identity).digest()[:8], "little") >> 1


def _rows_per_block(shape: tuple) -> int:
    """Rows per block of a weight of `shape` (the elements of a vector): whole rows, so that an
    init that reads the fan-in (LoRA's A) sees the weight's own; set by the global shape alone."""
    return max(1, BLOCK_NUMBERS // math.prod(shape[1:]))


def _row_ranges(pieces) -> list[range]:
    return [range(piece_slices[0].start, piece_slices[0].stop) for piece_slices in map(local_slices, pieces)]


def _draw_blocks(init, shape: tuple, rows: list[range], seed_of_block, pool) -> dict[int, torch.Tensor]:
    """The blocks of the weight of global `shape` that hold any of `rows`, each drawn once by `init`
    from a CPU generator of its own (the process' RNG streams untouched), in parallel: fp32 CPU
    tensors by block number."""
    per_block = _rows_per_block(shape)
    blocks = sorted({b for r in rows for b in range(r.start // per_block, (r.stop - 1) // per_block + 1)})

    def draw(block: int) -> torch.Tensor:
        values = torch.empty((min(per_block, shape[0] - block * per_block), *shape[1:]), dtype=torch.float32)
        init(values, generator=torch.Generator().manual_seed(seed_of_block(block)))
        return values

    return dict(zip(blocks, pool.map(draw, blocks)))


def _copy_drawn_rows(blocks: dict[int, torch.Tensor], per_block: int, piece) -> None:
    """Copy `piece`'s part of a weight into it from the weight's drawn blocks, block by block."""
    where = local_slices(piece)
    with torch.no_grad():
        for block in range(where[0].start // per_block, (where[0].stop - 1) // per_block + 1):
            start = block * per_block
            first, last = max(where[0].start, start), min(where[0].stop, start + per_block)
            values = blocks[block][(slice(first - start, last - start), *where[1:])]
            piece.data[first - where[0].start : last - where[0].start].copy_(values)


def initialize_by_identity(model, config, seed: int) -> int:
    """Draw every randomly initialised weight of `model` (one GPTModel chunk, on any device) by its
    identity and zero its biases; returns how many global tensors were drawn."""
    drawn = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
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
                shape = tuple(group[0].global_shape[prepended:])
                seed_of_block = functools.partial(_generator_seed, seed, key, position)
                blocks = _draw_blocks(init, shape, _row_ranges(group), seed_of_block, pool)
                for piece in group:
                    _copy_drawn_rows(blocks, _rows_per_block(shape), piece)
                drawn += 1
    return drawn
