"""Initial weights depend on the seed and each weight's identity, not on the layout: pretrain_r1.py
prints the same first losses (before any update: the same model) in one process and under EP=2,
PP=2 and TP=2 with sequence parallelism."""

import re
import sys
from pathlib import Path

import pytest
from conftest import run_command

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_r1.py"
# MoE with an MTP layer and untied embeddings: experts, stages and the MTP block are all drawn;
# the vocabulary padded alike under TP=1 and 2 (128 rows).
TINY = ["--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
        "--moe-router-score-function", "sigmoid", "--mtp-num-layers", "1", "--untie-embeddings-and-output-weights",
        "--hidden-dropout", "0.0", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "1e-3", "--lr-warmup-iters", "1", "--train-iters", "2"]  # fmt: skip
LAYOUTS = {
    "EP=2": ["--expert-model-parallel-size", "2"],
    "PP=2": ["--pipeline-model-parallel-size", "2"],
    "TP=2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


def first_losses(output: str) -> list[float]:
    """lm and MTP losses of iterations 1 and 2."""
    lines = [line for line in output.splitlines() if re.match(r" iteration +[12]/", line)]
    return [float(value) for line in lines for value in re.findall(r"(?:lm|mtp_1) loss: (\S+)", line)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return first_losses(run_command([sys.executable, str(PRETRAIN), *TINY], tmp_path_factory.mktemp("one")).stdout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_starts_from_the_same_model(layout, one_process, tmp_path):
    launcher = ["torchrun", "--standalone", "--nproc_per_node=2"]
    losses = first_losses(run_command([*launcher, str(PRETRAIN), *TINY, *LAYOUTS[layout]], tmp_path).stdout)
    assert len(losses) == len(one_process) == 4
    assert losses == pytest.approx(one_process, rel=2e-6), (layout, losses, one_process)


def test_another_seed_draws_another_model(one_process, tmp_path):
    losses = first_losses(run_command([sys.executable, str(PRETRAIN), *TINY, "--seed", "7"], tmp_path).stdout)
    assert losses[0] != pytest.approx(one_process[0], rel=1e-4)


def test_a_shard_gets_its_part_of_the_whole_weight_drawing_only_the_blocks_it_holds(monkeypatch):
    """Blocks of 3 rows (of a 10 x 8 weight: 4 blocks, edges inside the shards): the two halves of a
    column-parallel split (rows) and of a row-parallel one (columns) put together are the weight one
    process draws; a column-parallel half draws only the blocks its rows are in (rows 0-4: 2 of the 4,
    rows 5-9: 3), each once."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.utils import init_method_normal

    from megatron_r1 import initialization

    monkeypatch.setattr(initialization, "BLOCK_NUMBERS", 24)
    key, std = "decoder.layers.0.self_attention.linear_qkv.weight", init_method_normal(0.02)
    config = type("Config", (), {"init_method": std, "output_layer_init_method": std, "embedding_init_method": std})

    def drawn(shapes_and_axis):
        """The pieces (shape, (axis, rank, world)) of this rank, drawn; and how many blocks were."""
        pieces = [ShardedTensor.from_rank_offsets(key, torch.zeros(shape), *split) for shape, split in shapes_and_axis]
        monkeypatch.setattr(initialization, "flat_sharded_tensors", lambda model: {key: pieces})
        calls, normal_ = [], torch.Tensor.normal_
        monkeypatch.setattr(torch.Tensor, "normal_", lambda self, *a, **k: calls.append(1) or normal_(self, *a, **k))
        assert initialization.initialize_by_identity(None, config, seed=5) == 1
        monkeypatch.setattr(torch.Tensor, "normal_", normal_)
        return [piece.data for piece in pieces], len(calls)

    (whole,), blocks = drawn([((10, 8), ())])
    assert blocks == 4 and whole.std() > 0.01
    for axis, shape in ((0, (5, 8)), (1, (10, 4))):
        halves = [drawn([(shape, ((axis, rank, 2),))]) for rank in range(2)]
        assert torch.equal(torch.cat([half for (half,), _ in halves], dim=axis), whole), axis
        assert [count for _, count in halves] == ([2, 3] if axis == 0 else [4, 4]), (axis, halves)
