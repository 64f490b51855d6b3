"""Megatron-LM torch_dist checkpoints -> ours (tools/convert_checkpoint.py --direction mlm2mcore).

The checkpoints are written as Megatron-LM's save_checkpoint writes them (megatron/training/
checkpointing.py, core_v0.16.1): megatron-core's dist_checkpointing.save of {"args": its Namespace,
"checkpoint_version", "iteration", "model": the GPTModel's sharded_state_dict under its save metadata,
"opt_param_scheduler" (in samples), "rng_state" (a ShardedObject), "num_floating_point_operations_so_far"}
into <save>/iter_XXXXXXX with the tracker file beside it. The GQA models are megatron-core's stock
local spec (Megatron-LM's --transformer-impl local); the MLA model, which Megatron-LM 0.16 builds
with TransformerEngine only, is saved under TransformerEngine's names for its fused norms."""

import argparse
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_command
from malicious import CreatesAFile, poison_checkpoint_metadata
from peak_memory import needs_clear_refs, peak_rises_mib

REPO = Path(__file__).resolve().parents[1]
# One model in our flags and in Megatron-LM's args (names and values as its validate_args leaves them).
GQA_MOE = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
           "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--disable-bias-linear", "--qk-layernorm",
           "--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-shared-expert-intermediate-size", "16",
           "--moe-router-topk", "2", "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
           "--mtp-num-layers", "1", "--norm-epsilon", "1e-5", "--rotary-base", "500000", "--seq-length", "16"]  # fmt: skip
MLM_GQA_MOE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, kv_channels=8,
                   group_query_attention=True, num_query_groups=2, swiglu=True, add_bias_linear=False,
                   add_qkv_bias=False, qk_layernorm=True, num_experts=4, moe_ffn_hidden_size=16,
                   moe_shared_expert_intermediate_size=16, moe_router_topk=2, moe_router_score_function="sigmoid",
                   moe_router_enable_expert_bias=True, moe_layer_freq=1, mtp_num_layers=1, layernorm_epsilon=1e-5,
                   rotary_base=500000, position_embedding_type="rope", seq_length=16, max_position_embeddings=16,
                   moe_router_load_balancing_type=["seq_aux_loss"], moe_aux_loss_coeff=[0.01])  # fmt: skip
DENSE_LAYERNORM = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--normalization",
                   "LayerNorm", "--norm-epsilon", "1e-5", "--position-embedding-type", "learned_absolute", "--seq-length", "16"]  # fmt: skip
MLM_DENSE_LAYERNORM = dict(num_layers=2, hidden_size=32, ffn_hidden_size=128, num_attention_heads=4, kv_channels=8,
                           normalization="LayerNorm", add_bias_linear=True, add_qkv_bias=True,
                           position_embedding_type="learned_absolute", seq_length=16, max_position_embeddings=16)  # fmt: skip
MLA_MOE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
           "--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim",
           "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--rope-type", "yarn", "--rotary-scaling-factor",
           "4", "--mscale", "0.707", "--mscale-all-dim", "0.707", "--original-max-position-embeddings", "4096",
           "--num-experts", "4", "--moe-ffn-hidden-size", "16", "--moe-layer-freq", "[0]+[1]",
           "--moe-shared-expert-intermediate-size", "16", "--moe-router-score-function", "sigmoid",
           "--moe-router-enable-expert-bias", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
           "--moe-router-topk-scaling-factor", "2.5", "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-5",
           "--seq-length", "16"]  # fmt: skip
MLM_MLA_MOE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=128, num_attention_heads=4, kv_channels=8, swiglu=True,
                   add_bias_linear=False, multi_latent_attention=True, qk_layernorm=True, q_lora_rank=16,
                   kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8, rope_type=None,
                   rotary_scaling_factor=4.0, mscale=0.707, mscale_all_dim=0.707, num_experts=4,
                   moe_ffn_hidden_size=16, moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=16,
                   moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
                   moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5, untie_embeddings_and_output_weights=True,
                   position_embedding_type="rope", seq_length=16, max_position_embeddings=16,
                   transformer_impl="transformer_engine")  # fmt: skip
# TransformerEngine's names for the norms it fuses into the next linear layer (MLA layers: the q/kv
# norms; the dense layer: the norm before its MLP), as megatron-core's TransformerEngine spec names them.
TRANSFORMER_ENGINE_NAMES = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    "decoder.layers.0.pre_mlp_layernorm.": "decoder.layers.0.mlp.linear_fc1.layer_norm_",
}
# A dense model (without --num-layers) whose layers hold 16 MiB in fp32 each: the weights, not
# Python's objects, make the memory that grows.
WIDE_DENSE = ["--hidden-size", "512", "--ffn-hidden-size", "2048", "--num-attention-heads", "8", "--swiglu",
              "--disable-bias-linear", "--position-embedding-type", "rope", "--seq-length", "16"]  # fmt: skip
MLM_WIDE_DENSE = dict(hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8, kv_channels=64, swiglu=True,
                      add_bias_linear=False, position_embedding_type="rope", seq_length=16, max_position_embeddings=16)  # fmt: skip
VOCAB = 99  # Megatron-LM's NullTokenizer: --vocab-size 99 and its end-of-document id, 100 ids
GLOBAL_BATCH, ITERATION, TRAIN_ITERS = 4, 3, 5
# pretrain_r1.py's training flags for the schedule of megatron_lm_args (besides the model's).
TRAINING = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH), "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--train-iters", str(TRAIN_ITERS)]  # fmt: skip


def megatron_lm_args(**model) -> argparse.Namespace:
    """Megatron-LM's args as common.pt holds them: the model's, and a few of the others it saves
    (torch dtypes and megatron-core enums among them)."""
    from megatron.core.transformer.enums import AttnBackend

    values = dict(
        normalization="RMSNorm", layernorm_epsilon=1e-5, add_bias_linear=True, add_qkv_bias=False, swiglu=False,
        squared_relu=False, position_embedding_type="learned_absolute", rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, rotary_seq_len_interpolation_factor=None, use_rope_scaling=False,
        untie_embeddings_and_output_weights=False, layernorm_zero_centered_gamma=False, qk_layernorm=False,
        group_query_attention=False, num_query_groups=1, multi_latent_attention=False, num_experts=None,
        moe_layer_freq=1, moe_router_topk=2, moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=False, mtp_num_layers=None, init_method_std=0.02, hidden_dropout=0.0,
        attention_dropout=0.0, make_vocab_size_divisible_by=128, padded_vocab_size=128, tokenizer_type="NullTokenizer",
        vocab_size=VOCAB, transformer_impl="local", spec=None, use_legacy_models=False, params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, bf16=False, fp16=False, ckpt_format="torch_dist",
        train_iters=TRAIN_ITERS, train_samples=None, global_batch_size=GLOBAL_BATCH, micro_batch_size=2, lr=1e-3,
        min_lr=0.0, lr_warmup_iters=2, lr_decay_style="cosine", start_weight_decay=0.01, end_weight_decay=0.01,
        rampup_batch_size=None, consumed_train_samples=ITERATION * GLOBAL_BATCH,
    )  # fmt: skip
    values.update(model)
    return argparse.Namespace(**values)


def our_args(flags):
    from megatron_r1.arguments import build_parser, validate_args

    args = build_parser("").parse_args([*flags, "--mock-data", "--vocab-size", str(VOCAB + 1)])
    validate_args(args, pytest.fail)
    args.padded_vocab_size = 128
    return args


def stock_local_gpt_model(args, config):
    """The GPTModel Megatron-LM's gpt_builder makes with --transformer-impl local: megatron-core's
    local spec as it is (ours substitutes modules, not keys)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization)
        last = get_gpt_decoder_layer_specs(config, use_transformer_engine=False, normalization=args.normalization)[-1]
    else:
        spec = last = get_gpt_layer_local_spec(None, False, args.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        mtp_block_spec=get_gpt_mtp_block_spec(config, last, use_transformer_engine=False)
        if args.mtp_num_layers
        else None,
    )


def megatron_lm_scheduler(steps: int):
    """The LR schedule Megatron-LM's get_optimizer_param_scheduler builds for these args (counted in
    samples), after `steps` iterations of a global batch."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2 * GLOBAL_BATCH,
        lr_decay_steps=TRAIN_ITERS * GLOBAL_BATCH, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=TRAIN_ITERS * GLOBAL_BATCH, wd_incr_style="constant",
    )  # fmt: skip
    for _ in range(steps):
        scheduler.step(increment=GLOBAL_BATCH)
    return scheduler


def save_like_megatron_lm(model, ckpt_args, root: Path, rename=None, optimizer=None, sharding_type=None) -> Path:
    """Megatron-LM's save_checkpoint of `model` (and `optimizer`'s state: with --use-distributed-optimizer
    in its `sharding_type`) at ITERATION under --save `root` (one rank)."""
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # Its _build_sharded_state_dict_metadata; content_metadata: the same without the process group.
    content = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if sharding_type is not None:
        content["distrib_optim_sharding_type"] = sharding_type
    metadata = {**content, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sharded = model.sharded_state_dict(metadata=metadata)
    for item in nested_values(sharded):
        for local, fused in (rename or {}).items():
            item.key = item.key.replace(local, fused)
    rng = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # (torch.cuda.get_rng_state() on a GPU)
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    state = {
        "args": ckpt_args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": sharded,
        "opt_param_scheduler": megatron_lm_scheduler(ITERATION).state_dict(), "num_floating_point_operations_so_far": 1.5e9,
        "rng_state": ShardedObject("rng_state", [rng], (1, 1), (0, 0), replica_id=0),
    }  # fmt: skip
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    directory = root / f"iter_{ITERATION:07d}"
    directory.mkdir(parents=True)
    dist_checkpointing.save(state, str(directory), content_metadata=content)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return directory


def write_megatron_lm_checkpoint(flags, ckpt_args, root: Path, stock_local=True, bf16=False, rename=None):
    """Our model of `flags` (drawn from the seed; weights rounded to bf16 with `bf16`) and the same
    weights saved as Megatron-LM saves them; returns our model."""
    from megatron_r1.arguments import transformer_config_from_args
    from megatron_r1.model import build_model

    args = our_args(flags)
    (ours,) = build_model(args, device=torch.device("cpu"))
    if bf16:
        for tensor in ours.state_dict().values():
            if isinstance(tensor, torch.Tensor) and torch.is_floating_point(tensor):
                tensor.copy_(tensor.bfloat16())
    theirs = ours
    if stock_local:
        theirs = stock_local_gpt_model(args, transformer_config_from_args(args))
        theirs.load_state_dict(ours.state_dict(), strict=True)  # the local spec's keys are ours
    save_like_megatron_lm(theirs.to(torch.bfloat16) if bf16 else theirs, ckpt_args, root, rename)
    return ours.float(), args


def logits(model, args) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(16).expand(2, 16), None)


def assert_converted_model_is_ours(converted_dir: Path, ours, args):
    """Every weight of the converted checkpoint equals ours, and the model its saved flags build
    (tools' way: megatron_r1.hf.config.checkpoint_args) gives our model's logits."""
    from megatron_r1.checkpointing import load_weights
    from megatron_r1.hf.config import checkpoint_args
    from megatron_r1.model import build_model

    saved_args = checkpoint_args(str(converted_dir))
    (loaded,) = build_model(saved_args, initialize=False, device=torch.device("cpu"))
    load_weights(str(converted_dir), [loaded])
    expected = {key: value for key, value in ours.state_dict().items() if "_extra_state" not in key}
    actual = loaded.state_dict()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []
    (without_mtp,) = build_model(saved_args, with_mtp=False, initialize=False, device=torch.device("cpu"))
    load_weights(str(converted_dir), [without_mtp], keep=lambda key: not key.startswith("mtp."))
    (reference,) = build_model(args, with_mtp=False, initialize=False, device=torch.device("cpu"))
    reference.load_state_dict(ours.state_dict(), strict=False)
    assert torch.equal(logits(without_mtp, saved_args), logits(reference, args))


@pytest.fixture
def one_process():
    from megatron_r1.distributed import destroy_distributed, initialize_distributed

    initialize_distributed()
    yield
    destroy_distributed()


def test_gqa_moe_checkpoint_converts_with_its_weights_and_schedule_and_training_continues(tmp_path, one_process):
    """Megatron-LM's --transformer-impl local, uniform layers (saved stacked), MTP: the tool's
    conversion holds the same weights and logits, Megatron-LM's iteration, samples and schedule
    (in iterations), and pretrain_r1.py continues from it with the flags the tool prints."""
    from megatron_r1.checkpointing import read_metadata

    ours, args = write_megatron_lm_checkpoint(GQA_MOE, megatron_lm_args(**MLM_GQA_MOE), tmp_path / "mlm")
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--direction", "mlm2mcore"]
    output = run_command([*tool, "--load", "mlm", "--save", "ours", "--no-progress"], tmp_path).stdout
    assert '"key_style": "stacked"' in output and '"lr_schedule": "carried (samples -> iterations)"' in output
    converted = tmp_path / "ours" / f"iter_{ITERATION:07d}"
    assert_converted_model_is_ours(converted, ours, args)
    metadata = read_metadata(str(converted))
    assert (metadata["iteration"], metadata["consumed_samples"]) == (ITERATION, ITERATION * GLOBAL_BATCH)
    assert {key: metadata["scheduler"][key] for key in ("num_steps", "lr_warmup_steps", "lr_decay_steps")} == {
        "num_steps": ITERATION, "lr_warmup_steps": 2, "lr_decay_steps": TRAIN_ITERS}  # fmt: skip
    flags = shlex.split(re.search(r"--no-load-optim \(to continue\) or --finetune: (.*)", output)[1])
    assert "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 0.01" in shlex.join(flags)
    command = [sys.executable, str(REPO / "pretrain_r1.py"), *flags, *TRAINING, "--save", "continued", "--load", "ours",
               "--no-load-optim"]  # fmt: skip
    continued = run_command(command, tmp_path).stdout
    assert f"resumed from iteration {ITERATION} ({ITERATION * GLOBAL_BATCH} samples consumed)" in continued
    # The learning rate of the next iteration is the one Megatron-LM would have used.
    next_lr = megatron_lm_scheduler(ITERATION + 1).optimizer.param_groups[0]["lr"]
    assert re.search(rf"iteration +{ITERATION + 1}/ .* learning rate: {next_lr:E} ", continued), continued
    assert read_metadata(str(tmp_path / "continued" / f"iter_{TRAIN_ITERS:07d}"))["iteration"] == TRAIN_ITERS


# Megatron-LM's args of a run with Adam (ours' defaults, which the straight run below trains with).
MLM_ADAM = dict(optimizer="adam", adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """``(directory, model flags)``: pretrain_r1.py's run of TRAIN_ITERS iterations of the GQA-MoE model
    with the flags the conversion prints for it, saved at ITERATION (the state Megatron-LM's checkpoints
    below hold) and at the end (what continuing from that state gives)."""
    from megatron_r1.megatron_lm_checkpoint import model_flags

    flags = [*model_flags(megatron_lm_args(**MLM_GQA_MOE), 128), "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB + 1)]  # fmt: skip
    directory = tmp_path_factory.mktemp("straight_run")
    command = [sys.executable, str(REPO / "pretrain_r1.py"), *flags, *TRAINING, "--save", "straight"]
    output = run_command([*command, "--save-interval", str(ITERATION)], directory).stdout
    (directory / "straight.log").write_text(output)
    return directory, flags


def megatron_lm_optimizer(model, distributed: bool):
    """megatron-core's optimizer as Megatron-LM's get_megatron_optimizer builds it for MLM_ADAM's args
    (--use-distributed-optimizer: `distributed`), on `model` wrapped in its DDP; (optimizer, wrapped model)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed)
    wrapped = DistributedDataParallel(model.config, ddp_config, model)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0, weight_decay=0.01, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, use_distributed_optimizer=distributed)  # fmt: skip
    return get_megatron_optimizer(config, [wrapped]), wrapped


def write_megatron_lm_checkpoints_with_optimizer(run: Path, roots: dict) -> None:
    """The straight run's state at ITERATION (weights, Adam moments and step) in megatron-core's optimizers
    on the model built as Megatron-LM builds it, saved as Megatron-LM saves it under each of `roots`
    (optimizer format -> --save root): "plain" without --use-distributed-optimizer, else the distributed
    optimizer's sharding type. The plain optimizer loads the state as our loader does; the distributed
    one gets each parameter's moments from it."""
    from megatron_r1.arguments import transformer_config_from_args
    from megatron_r1.checkpointing import optimizer_sharded_state_dict, read_checkpoint
    from megatron_r1.sharded_tensors import model_sharded_state_dict

    args = our_args(GQA_MOE)
    plain = stock_local_gpt_model(args, transformer_config_from_args(args))
    optimizer, _ = megatron_lm_optimizer(plain, distributed=False)
    request = {"model": model_sharded_state_dict(plain)}
    request["optimizer"] = optimizer_sharded_state_dict(optimizer, request, is_loading=True)
    loaded = read_checkpoint(str(run / "straight" / f"iter_{ITERATION:07d}"), request)
    plain.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    (adam,) = [wrapper.optimizer for wrapper in optimizer.chained_optimizers]
    for sharding_type in {form for form in roots if form != "plain"}:
        distributed = stock_local_gpt_model(args, transformer_config_from_args(args))
        distributed.load_state_dict(plain.state_dict())
        dist_optimizer, _ = megatron_lm_optimizer(distributed, distributed=True)
        (wrapper,) = dist_optimizer.chained_optimizers
        wrapper.init_state_fn(wrapper.optimizer, wrapper.config)
        for group, loaded_group in zip(wrapper.optimizer.param_groups, adam.param_groups, strict=True):
            group.update({key: value for key, value in loaded_group.items() if key != "params"})
        plain_params = dict(plain.named_parameters())
        for name, param in distributed.named_parameters():
            source = plain_params[name]
            tensors = {"param": source.detach(), **{k: adam.state[source][k] for k in ("exp_avg", "exp_avg_sq")}}
            # (One process: each shard is the whole parameter.)
            with torch.no_grad():
                wrapper._set_main_param_and_optimizer_states(param, {k: v.view(-1) for k, v in tensors.items()})
        for state in wrapper.optimizer.state.values():
            state["step"] = torch.tensor(float(ITERATION))
        ckpt_args = megatron_lm_args(**MLM_GQA_MOE, **MLM_ADAM, use_distributed_optimizer=True)
        save_like_megatron_lm(distributed, ckpt_args, roots[sharding_type], None, dist_optimizer, sharding_type)
    if "plain" in roots:
        save_like_megatron_lm(plain, megatron_lm_args(**MLM_GQA_MOE, **MLM_ADAM), roots["plain"], None, optimizer)


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor (weights, optimizer state) of checkpoint `path`, read in this (one-process) world."""
    from megatron.core import dist_checkpointing

    return {
        key: value for key, value in dist_checkpointing.load_plain_tensors(str(path)).items() if torch.is_tensor(value)
    }


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_adam_moments_convert_bit_for_bit_and_the_run_continues_as_with_megatron_lms_optimizer(
    tmp_path, one_process, straight_run
):
    """Megatron-LM's plain optimizer and its --dist-ckpt-optim-fully-reshardable distributed one: the
    conversion holds the state of the run that saved it (weights, moments: every tensor bit for bit, and
    the same param groups and step), pretrain_r1.py continues from it with the printed flags (no
    --no-load-optim) to the very checkpoint the run itself reached, where fresh moments lead elsewhere."""
    from megatron_r1.checkpointing import read_common_state, read_metadata
    from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

    run, flags = straight_run
    roots = {"plain": tmp_path / "mlm_plain", "fully_reshardable": tmp_path / "mlm_fully_reshardable"}
    write_megatron_lm_checkpoints_with_optimizer(run, roots)
    summary = convert_megatron_lm_checkpoint(str(roots["fully_reshardable"]), str(tmp_path / "ours_fr"), progress=False)
    assert summary["optimizer"] == (
        "carried (fully_reshardable: Adam's moments and step 3, the weights from its fp32 main weights)"
    )
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--direction", "mlm2mcore", "--no-progress"]
    output = run_command([*tool, "--load", str(roots["plain"]), "--save", "ours"], tmp_path).stdout
    assert '"optimizer": "carried (plain optimizer: Adam\'s moments and step 3)"' in output, output
    printed = shlex.split(
        re.search(r"\(to continue, with Megatron-LM's optimizer state\) or --finetune: (.*)", output)[1]
    )
    assert printed == flags
    state = run / "straight" / f"iter_{ITERATION:07d}"
    expected = checkpoint_tensors(state)
    assert any(key.startswith("optimizer.state.exp_avg_sq.") for key in expected)
    # The param groups (Megatron-LM's Adam settings) and step the resumed optimizer takes.
    param_groups_and_step = repr(read_common_state(str(state))["optimizer"])
    for converted in (tmp_path / "ours" / state.name, tmp_path / "ours_fr" / state.name):
        assert_same_tensors(expected, checkpoint_tensors(converted))
        assert repr(read_common_state(str(converted))["optimizer"]) == param_groups_and_step
        assert read_metadata(str(converted))["optimizer_parts"] == 1
    pretrain = [sys.executable, str(REPO / "pretrain_r1.py"), *printed, *TRAINING, "--load", "ours"]
    continued = run_command([*pretrain, "--save", "continued"], tmp_path).stdout
    assert f"resumed from iteration {ITERATION} " in continued
    final = f"iter_{TRAIN_ITERS:07d}"
    assert_same_tensors(
        checkpoint_tensors(run / "straight" / final), checkpoint_tensors(tmp_path / "continued" / final)
    )
    # Fresh moments take another step: the next iteration's loss differs from the run's.
    fresh = run_command([*pretrain, "--save", "fresh_moments", "--no-load-optim"], tmp_path).stdout
    last_loss = rf"iteration +{TRAIN_ITERS}/ .*?\| lm loss: (\S+)"
    assert re.search(last_loss, continued)[1] == re.search(last_loss, run.joinpath("straight.log").read_text())[1]
    assert re.search(last_loss, fresh)[1] != re.search(last_loss, continued)[1]


def test_dp_reshardable_moments_are_not_carried_and_the_summary_says_why(tmp_path, one_process, straight_run):
    """Megatron-LM's default distributed-optimizer format (dp_reshardable: its DP ranks' buffers): the
    weights are converted, the summary says the moments are not and names the flag that makes them
    convertible, and the checkpoint holds no optimizer state (pretrain_r1.py asks for --no-load-optim)."""
    from megatron_r1.checkpointing import read_metadata
    from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

    run, _ = straight_run
    write_megatron_lm_checkpoints_with_optimizer(run, {"dp_reshardable": tmp_path / "mlm"})
    summary = convert_megatron_lm_checkpoint(str(tmp_path / "mlm"), str(tmp_path / "ours"), progress=False)
    assert summary["optimizer"].startswith(
        "not carried: Megatron-LM's distributed optimizer saved them as dp_reshardable"
    )
    assert "--dist-ckpt-optim-fully-reshardable" in summary["optimizer"]
    converted = tmp_path / "ours" / f"iter_{ITERATION:07d}"
    assert read_metadata(str(converted))["optimizer_parts"] == 0
    straight = checkpoint_tensors(run / "straight" / f"iter_{ITERATION:07d}")
    assert_same_tensors({key: value for key, value in straight.items() if not key.startswith("optimizer.")},
                        checkpoint_tensors(converted))  # fmt: skip


@pytest.mark.parametrize("model", ["mla_moe_transformer_engine_bf16", "dense_layernorm_local"])
def test_checkpoint_converts_to_our_weights_and_logits(tmp_path, one_process, model):
    """MLA with MoE and dense layers (per-layer keys), TransformerEngine's names, bf16 weights, YaRN at
    MLATransformerConfig's defaults; and a dense LayerNorm model with biases and learned positions."""
    from megatron_r1.checkpointing import CheckpointError, read_metadata
    from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

    if model == "dense_layernorm_local":
        ours, args = write_megatron_lm_checkpoint(DENSE_LAYERNORM, megatron_lm_args(**MLM_DENSE_LAYERNORM), tmp_path)
    else:
        ckpt_args = megatron_lm_args(**MLM_MLA_MOE, params_dtype=torch.bfloat16, bf16=True)
        ours, args = write_megatron_lm_checkpoint(
            MLA_MOE, ckpt_args, tmp_path, stock_local=False, bf16=True, rename=TRANSFORMER_ENGINE_NAMES
        )
    with pytest.raises(CheckpointError, match="a Megatron-LM checkpoint. Convert it first"):
        read_metadata(str(tmp_path / f"iter_{ITERATION:07d}"))  # what pretrain_r1.py --load says
    summary = convert_megatron_lm_checkpoint(str(tmp_path), str(tmp_path / "ours"), progress=False)
    assert summary["key_style"] == ("stacked" if model == "dense_layernorm_local" else "per-layer")
    assert summary["transformer_engine_names"] == (0 if model == "dense_layernorm_local" else 5)
    assert_converted_model_is_ours(tmp_path / "ours" / f"iter_{ITERATION:07d}", ours, args)


def test_settings_we_cannot_represent_are_refused_by_flag_before_anything_is_written(tmp_path, one_process):
    """Every Megatron-LM setting of the model that ours cannot represent, in one error naming its flag."""
    from megatron_r1.checkpointing import CheckpointError
    from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

    ckpt_args = megatron_lm_args(
        **MLM_DENSE_LAYERNORM, rotary_percent=0.5, squared_relu=True, softmax_type="learnable",
        moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
    )  # fmt: skip
    write_megatron_lm_checkpoint(DENSE_LAYERNORM, ckpt_args, tmp_path)
    with pytest.raises(CheckpointError) as refused:
        convert_megatron_lm_checkpoint(str(tmp_path), str(tmp_path / "ours"), progress=False)
    for flag in ("--rotary-percent 0.5: partial RoPE", "--squared-relu:", "--softmax-type learnable:",
                 "--moe-router-load-balancing-type [aux_loss, seq_aux_loss]:"):  # fmt: skip
        assert flag in str(refused.value)
    assert not (tmp_path / "ours").exists() and not (tmp_path / "ours.tmp").exists()


@pytest.mark.parametrize("poisoned", ["common.pt", ".metadata"])
def test_a_poisoned_checkpoint_is_refused_before_any_of_it_runs(tmp_path, one_process, poisoned):
    """A common.pt or .metadata that runs code when unpickled without restriction is refused, naming
    the file, and nothing of it runs."""
    from megatron_r1.checkpointing import CheckpointError
    from megatron_r1.megatron_lm_checkpoint import convert_megatron_lm_checkpoint

    write_megatron_lm_checkpoint(DENSE_LAYERNORM, megatron_lm_args(**MLM_DENSE_LAYERNORM), tmp_path / "mlm")
    witness = tmp_path / "code_ran"
    if poisoned == "common.pt":
        torch.save(
            {"args": CreatesAFile(witness), "iteration": ITERATION}, tmp_path / "mlm" / "iter_0000003" / "common.pt"
        )
    else:
        poison_checkpoint_metadata(tmp_path / "mlm", witness)
    with pytest.raises(CheckpointError, match=rf"{re.escape(poisoned)}: refused"):
        convert_megatron_lm_checkpoint(str(tmp_path / "mlm"), str(tmp_path / "ours"), progress=False)
    assert not witness.exists() and not (tmp_path / "ours").exists()


@needs_clear_refs
def test_four_times_the_layers_raise_the_peak_memory_less_than_one_and_a_half_times(tmp_path, one_process):
    """Bounded memory: converting Megatron-LM's stacked checkpoint of a model with 4x the layers raises
    the process' peak memory by less than 1.5x what converting the model does (parts of half a layer),
    where holding the model raised it 4x."""
    for layers in (2, 8):
        flags = ["--num-layers", str(layers), *WIDE_DENSE]
        ckpt_args = megatron_lm_args(**MLM_WIDE_DENSE, num_layers=layers)
        # Saved from our model itself (a dense model's keys are the local spec's), which is quicker.
        write_megatron_lm_checkpoint(flags, ckpt_args, tmp_path / f"mlm_{layers}", stock_local=False)
    converter = "megatron_r1.megatron_lm_checkpoint:convert_megatron_lm_checkpoint"
    small, large = peak_rises_mib(tmp_path, converter, 8 * 2**20, tmp_path / "mlm_2", tmp_path / "mlm_8")
    # Holding the model raised the peak by its fp32 size or more: 4x (64 -> 257 MiB; now ~12 -> 13 MiB).
    assert large < 1.5 * small, (small, large)
    assert large < 8 * 16 / 4, large  # a quarter of the large model's fp32 MiB


@pytest.mark.parametrize("layout", ["empty", "torch_format"])
def test_what_is_no_megatron_lm_torch_dist_checkpoint_fails_with_a_message_and_writes_nothing(tmp_path, layout):
    """The tool on a directory without common.pt, or on Megatron-LM's --ckpt-format torch checkpoint."""
    (tmp_path / "mlm" / "iter_0000001").mkdir(parents=True)
    if layout == "torch_format":  # Megatron-LM's --ckpt-format torch
        (tmp_path / "mlm" / "latest_checkpointed_iteration.txt").write_text("1")
        (tmp_path / "mlm" / "iter_0000001" / "mp_rank_00").mkdir()
    command = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--direction", "mlm2mcore"]
    result = subprocess.run([*command, "--load", "mlm", "--save", "out"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert ("--ckpt-format torch" if layout == "torch_format" else "no common.pt") in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
