"""megatron_r1/memory.py and layout.py: per-GPU bytes of weights, gradients and optimizer states
checked by hand on tiny configs, activation bytes against Korthikanti et al.'s 34 sbh (less the
dropout masks and attention scores it leaves out), the 1F1B in-flight counts, and the DeepSeek-V3
preset fitting 80 GB on its documented layout but not with EP 1."""

import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_r1.arguments import build_parser, validate_args
from megatron_r1.flops import count_model
from megatron_r1.layout import ParallelSizes, describe_layout, pipeline_stages
from megatron_r1.memory import GB, estimate_memory, in_flight_microbatches, layer_activation_bytes_per_token

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_MOE = ["--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "64",
            "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
            "--untie-embeddings-and-output-weights", "--num-experts", "4", "--moe-layer-freq", "[0]+[1]*3",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32", "--seq-length", "16",
            "--micro-batch-size", "2"]  # fmt: skip


def parse(flags, world_size=1):
    """Flags validated as pretrain_r1.py validates them for WORLD_SIZE processes."""
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        parser = build_parser("test")
        args = parser.parse_args(flags)

        def error(message):
            raise ValueError(message)

        validate_args(args, error)
        return args
    finally:
        del os.environ["WORLD_SIZE"]


@pytest.mark.parametrize(
    "flags, weight_bytes, gradient_bytes, optimizer_bytes",
    [(["--bf16"], 2, 4, 12),  # bf16 weights; fp32 grad buffers; fp32 master + Adam m, v
     (["--bf16", "--grad-reduce-in-bf16"], 2, 2, 12),  # bf16 grad buffers
     ([], 4, 4, 8),  # fp32 weights are the master copy: Adam m, v
     (["--optimizer", "lion"], 4, 4, 4)],  # Lion: one moment
)  # fmt: skip
def test_single_gpu_bytes_are_params_times_bytes(flags, weight_bytes, gradient_bytes, optimizer_bytes):
    args = parse(TINY_MOE + flags)
    params = count_model(args).total_params
    (stage,) = estimate_memory(args)
    assert stage.dense_params + stage.expert_params == params
    assert stage.weights == params * weight_bytes
    assert stage.gradients == params * gradient_bytes
    assert stage.optimizer == params * optimizer_bytes
    if flags == ["--bf16"]:  # Megatron-LM's 18 bytes per parameter without the distributed optimizer
        assert stage.weights + stage.gradients + stage.optimizer == 18 * params


def test_distributed_optimizer_divides_optimizer_bytes_by_data_parallel_size():
    plain = estimate_memory(parse(TINY_MOE + ["--bf16"], world_size=4))[0]
    sharded = estimate_memory(parse(TINY_MOE + ["--bf16", "--use-distributed-optimizer"], world_size=4))[0]
    params = count_model(parse(TINY_MOE)).total_params
    assert (sharded.weights, sharded.gradients) == (plain.weights, plain.gradients)
    assert plain.optimizer == 12 * params
    assert sharded.optimizer == math.ceil(12 * params / 4)  # 6 + 12 / DP bytes per parameter


def test_experts_split_over_expert_parallel_ranks_and_sharded_over_expert_data_parallel():
    args = parse(
        TINY_MOE + ["--bf16", "--use-distributed-optimizer", "--expert-model-parallel-size", "2"], world_size=4
    )
    count = count_model(args)
    experts = count.components["routed_experts"].total
    (stage,) = estimate_memory(args)
    assert stage.expert_params == experts / 2
    assert stage.dense_params == count.total_params - experts
    # Dense parameters: DP 4 shards; experts: expert-DP = 4 / EP 2 = 2 shards.
    assert stage.optimizer == math.ceil(12 * (count.total_params - experts) / 4) + math.ceil(12 * experts / 2 / 2)


def test_pipeline_stages_split_layers_and_hold_embedding_and_output():
    untied = parse(TINY_MOE + ["--pipeline-model-parallel-size", "2"], world_size=2)
    first, last = estimate_memory(untied)
    assert first.contents.layers == [0, 1] and last.contents.layers == [2, 3]
    assert first.contents.embedding and not first.contents.output_layer and last.contents.output_layer
    assert (
        first.dense_params + last.dense_params + first.expert_params + last.expert_params
        == count_model(untied).total_params
    )
    # Tied embeddings across stages: the last stage keeps its own copy for the output layer.
    tied_flags = [flag for flag in TINY_MOE if flag != "--untie-embeddings-and-output-weights"]
    tied = parse(tied_flags + ["--pipeline-model-parallel-size", "2"], world_size=2)
    held = sum(stage.dense_params + stage.expert_params for stage in estimate_memory(tied))
    assert held == count_model(tied).total_params + 256 * 64


def test_interleaved_stages_hold_every_pp_th_chunk():
    args = parse(
        TINY_MOE
        + [
            "--num-layers",
            "8",
            "--moe-layer-freq",
            "[0]+[1]*7",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "2",
            "--global-batch-size",
            "8",
        ],
        world_size=2,
    )
    first, last = pipeline_stages(args, ParallelSizes.from_args(args))
    assert first.layers == [0, 1, 4, 5] and last.layers == [2, 3, 6, 7]
    assert first.ranks == [0] and last.ranks == [1]


def test_a_pipeline_layout_places_the_layers_it_names():
    """--pipeline-model-parallel-layout, DeepSeek-V3's style on PP=2 x 2 virtual stages: chunks of 2, 3,
    2 and 1 decoder layers in layer order, the MTP layer with the loss."""
    args = parse(
        TINY_MOE
        + [
            "--num-layers",
            "8",
            "--moe-layer-freq",
            "[0]*2+[1]*6",
            "--mtp-num-layers",
            "1",
            "--pipeline-model-parallel-size",
            "2",
            "--pipeline-model-parallel-layout",
            "Ett|ttt|tt|tmL",
            "--global-batch-size",
            "8",
        ],
        world_size=2,
    )
    assert args.virtual_pipeline_model_parallel_size == 2
    first, last = pipeline_stages(args, ParallelSizes.from_args(args))
    assert first.layers == [0, 1, 5, 6] and last.layers == [2, 3, 4, 7]
    assert (first.moe_layers, last.moe_layers, first.mtp_layers, last.mtp_layers) == (2, 4, 0, 1)


def test_in_flight_microbatches_follow_the_1f1b_schedule():
    sizes = ParallelSizes(world=4, tp=1, pp=4, dp=1, ep=1, etp=1, expert_dp=1, vpp=1)
    assert [in_flight_microbatches(sizes, stage, 8) for stage in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(sizes, 0, 2) == 2  # fewer micro-batches than stages
    interleaved = ParallelSizes(world=2, tp=1, pp=2, dp=1, ep=1, etp=1, expert_dp=1, vpp=2)
    # megatron-core's warm-up: 2 (PP - p - 1) + (VPP - 1) PP forwards, then one more.
    assert [in_flight_microbatches(interleaved, stage, 8) for stage in range(2)] == [5, 3]


def test_dense_layer_activations_match_korthikanti():
    # A GPT layer keeps 34 sbh bytes in 16-bit, of which 2 sbh are dropout masks (no dropout here):
    # 32 sbh = 16 elements per hidden unit; fp32 doubles the bytes; TP + sequence parallelism divide by TP.
    flags = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--ffn-hidden-size", "256"]  # fmt: skip
    for bf16, element in ((["--bf16"], 2), ([], 4)):
        args = parse(flags + bf16)
        assert layer_activation_bytes_per_token(args, False, ParallelSizes.from_args(args)) == 16 * element * 64
    args = parse(flags + ["--bf16", "--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    assert layer_activation_bytes_per_token(args, False, ParallelSizes.from_args(args)) == 16 * 2 * 64 / 2


def test_full_recomputation_keeps_layer_inputs_and_one_layer():
    flags = [
        "--mock-data",
        "--vocab-size",
        "128",
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--ffn-hidden-size",
        "256",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
    ]
    plain = parse(flags)
    recomputed = parse(
        flags + ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    )
    layer = layer_activation_bytes_per_token(plain, False, ParallelSizes.from_args(plain))
    head = estimate_memory(plain)[0].activations - 4 * layer * 64
    assert estimate_memory(recomputed)[0].activations == pytest.approx(4 * 64 * 4 * 64 + layer * 64 + head)


def deepseek_v3_flags(tmp_path, **env):
    """The flags examples/pretrain_deepseek_v3.sh launches with (its dry run's torchrun line; a stand-in
    `python` skips the report)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "DRY_RUN": "1",
                   "MASTER_ADDR": "node0", **env}  # fmt: skip
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / "pretrain_deepseek_v3.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    command = shlex.split(result.stdout.splitlines()[0])
    return command[command.index("pretrain_r1.py") + 1 :]


def test_deepseek_v3_fits_80gb_on_its_documented_layout_but_not_with_ep_1(tmp_path):
    args = parse(deepseek_v3_flags(tmp_path), world_size=128 * 8)
    (stage,) = estimate_memory(args)
    # TP 8 x EP 64 x ETP 2: 5.2B expert parameters (665B / 128) and ~3.1B dense ones per GPU.
    assert stage.expert_params == pytest.approx(665.4e9 / 128, rel=1e-3)
    assert 45 * GB < stage.total < 70 * GB
    assert "experts: ETP 2 x EP 64 x expert-DP 8 x PP 1" in describe_layout(args, gpus_per_node=8)

    one_expert_rank = parse(deepseek_v3_flags(tmp_path, EP="1"), world_size=128 * 8)
    (stage,) = estimate_memory(one_expert_rank)
    assert stage.expert_params == pytest.approx(665.4e9 / 2, rel=1e-3)
    assert stage.total > 1000 * GB
