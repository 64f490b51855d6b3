"""megatron_r1/memory.py and layout.py: per-GPU bytes of weights, gradients and optimizer states
checked by hand on tiny configs, activation bytes against Korthikanti et al.'s 34 sbh (less the
dropout masks and attention scores it leaves out), the 1F1B in-flight counts, the DeepSeek-V3
preset fitting 80 GB on its documented layout but not with EP 1, and GRPO's reference policy, KV
cache and rollout logits by hand."""

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
from megatron_r1.rl.arguments import add_grpo_arguments

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


def parse_grpo(flags, world_size=1):
    """Flags parsed with grpo_r1.py's own on top (validated as pretrain_r1.py's: the sizing reads them)."""
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        parser = build_parser("test")
        add_grpo_arguments(parser)
        args = parser.parse_args(flags)

        def error(message):
            raise ValueError(message)

        validate_args(args, error)
        return args
    finally:
        del os.environ["WORLD_SIZE"]


# TINY_MOE with an MTP layer and a vocabulary large enough that the prefill's logits outweigh a
# layer's prefill activations; one prompt per step, 4 responses to it, 8 of the 16 tokens for the response.
TINY_GRPO = TINY_MOE + ["--vocab-size", "1024", "--mtp-num-layers", "1", "--grpo-group-size", "4",
                        "--max-response-length", "8", "--grpo-prompts-per-step", "1"]  # fmt: skip


def test_grpo_reference_kv_cache_and_logits_by_hand():
    args = parse_grpo(TINY_GRPO)
    count = count_model(args)
    params, mtp = count.total_params, count.components["mtp"].total
    (stage,) = estimate_memory(args)
    rollout = stage.rollout
    # fp32: weights of everything; MTP frozen: grads (4 bytes) and Adam m, v (8) for the rest only.
    assert (stage.weights, stage.gradients, stage.optimizer) == (4 * params, 4 * (params - mtp), 8 * (params - mtp))
    assert rollout.reference == 4 * (params - mtp)  # a model built without MTP layers
    # MHA: 4 heads x 16 channels for K and for V, per token, layer and sequence, 4 fp32 bytes each.
    assert rollout.kv_values_per_token == 2 * 4 * 16
    assert rollout.kv_cache == 4 * 16 * 4 * 128 * 4  # group 4 x (8 prompt + 8 response) x 4 layers
    assert rollout.activations == 2 * 4 * 8 * 1024 * 4  # the 8 prompt positions' logits, twice
    assert rollout.activations_are_logits
    assert stage.total == stage.weights + stage.gradients + stage.optimizer + rollout.reference + max(
        stage.activations, rollout.kv_cache + rollout.activations
    )


@pytest.mark.parametrize("flags", [["--kl-coef", "0"], ["--lora", "--transformer-impl", "local"]])
def test_grpo_without_a_reference_model(flags):
    """--kl-coef 0 builds no reference; --lora's is the policy with its adapters off."""
    with_reference = estimate_memory(parse_grpo(TINY_GRPO))[0]
    (stage,) = estimate_memory(parse_grpo(TINY_GRPO + flags))
    assert with_reference.rollout.reference > 0 and stage.rollout.reference == 0
    assert stage.rollout.kv_cache == with_reference.rollout.kv_cache
    assert stage.total == with_reference.total - with_reference.rollout.reference


def test_grpo_kv_cache_scales_with_group_size_and_response_length():
    for group in (2, 4, 8):
        for response in (8, 24, 56):  # a prompt of up to 8 tokens + the response: --seq-length
            lengths = ["--max-response-length", str(response), "--seq-length", str(8 + response)]
            (stage,) = estimate_memory(parse_grpo(TINY_GRPO + ["--grpo-group-size", str(group)] + lengths))
            assert stage.rollout.kv_cache == group * (8 + response) * 4 * 128 * 4
            assert stage.rollout.activations == 2 * group * 8 * 1024 * 4  # the prompts' logits only
    # A longer response within the same --seq-length leaves less room for the prompt, not more cache.
    longer = estimate_memory(parse_grpo(TINY_GRPO + ["--max-response-length", "12"]))[0].rollout
    assert longer.kv_cache == 4 * 16 * 4 * 128 * 4 and longer.activations == 2 * 4 * 4 * 1024 * 4


@pytest.mark.parametrize(
    "flags, values",
    [(["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "16", "--qk-head-dim", "16",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"], 2 * (16 + 8 + 16)),  # 2 heads per rank: K 24, V 16
     ([], 2 * 2 * 16),  # MHA: 2 of the 4 heads per rank, K and V of 16
     (["--group-query-attention", "--num-query-groups", "2"], 1 * 2 * 16)],  # GQA: 1 of the 2 groups per rank
)  # fmt: skip
def test_kv_cache_width_per_tensor_parallel_rank(flags, values):
    """What megatron-core's static inference cache allocates per token and layer on one of TP 2 ranks:
    for MLA every head's up-projected K and V (it caches the compressed latent only in its dynamic context)."""
    args = parse_grpo(TINY_GRPO + flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    (stage,) = estimate_memory(args)
    assert stage.rollout.kv_values_per_token == values
    assert stage.rollout.kv_cache == 4 * 16 * 4 * values * 4


@pytest.mark.parametrize(
    "world_size, batch_size, prompts",
    [(1, 0, 8), (2, 0, 4),  # 0: a rank's whole share of the step's 8 prompts
     (1, 8, 2), (1, 11, 2), (2, 16, 4),  # whole groups of 4 up to the limit, at most the rank's share
     (1, 2, 1)],  # at least one group
)  # fmt: skip
def test_grpo_rollout_batch_decodes_groups_together(world_size, batch_size, prompts):
    """megatron_r1.rl.rollout decodes the groups of prompts of one length together, up to
    --rollout-batch-size sequences: the cache and the logits hold that many, as if all lengths were equal."""
    args = parse_grpo(
        TINY_GRPO + ["--grpo-prompts-per-step", "8", "--rollout-batch-size", str(batch_size)], world_size=world_size
    )
    (stage,) = estimate_memory(args)
    assert (stage.rollout.prompts, stage.rollout.sequences) == (prompts, 4 * prompts)
    assert stage.rollout.kv_cache == 4 * prompts * 16 * 4 * 128 * 4
    assert stage.rollout.activations == 2 * 4 * prompts * 8 * 1024 * 4
