"""Train a tiny megatron-core MoE GPT for a few steps under a given parallel layout and write the
per-step losses (and final-step gradients) to JSON. Run as a plain process or under torchrun.

Every layout starts from the same weights: the reference run (no --load-init) saves its initial
weights with dist_checkpointing, and parallel runs load them resharded to their layout."""

import argparse
import json
import os

import megatron_r1  # noqa: F401  before megatron.core: on CPU its import then skips TorchDynamo (platform.py)
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.lora import (
    LoRAConfig,
    adapter_layers,
    add_adapters_to_duplicated_linears,
    freeze_base_model,
    lora_spec_transform,
)
from megatron_r1.model import build_gpt_model

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 32, 4, 1


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--first-stage-layers", type=int, default=None,
                        help="decoder layers on the first pipeline stage (uneven split)")
    parser.add_argument("--layout", default=None, help="--pipeline-model-parallel-layout (with --vpp when it interleaves)")
    parser.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--dispatcher", default="allgather")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument(
        "--deepseek",
        action="store_true",
        help="MLA, first layer dense, sigmoid router with expert bias, group-limited routing, MTP",
    )
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (rank 4) on every linear, base frozen")
    parser.add_argument("--moe-grouped-gemm", action="store_true", help="routed experts as megatron_r1.experts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--init-dir", required=True)
    parser.add_argument("--load-init", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--grads-dir", required=True, help="where to save the full first-step gradients")
    parser.add_argument("--compare-grads-to", help="reference --grads-dir to compare against")
    return parser.parse_args()


def batch_for_step(step):
    """Counting sequences (next token = token + 1) from random starts: learnable in a few steps."""
    generator = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=generator)
    return (starts + torch.arange(SEQ + 1)) % VOCAB


def main():
    args = parse_args()
    initialize_distributed(args.tp, args.pp, args.ep, args.etp, virtual_pipeline_model_parallel_size=args.vpp)
    deepseek = dict(
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rope_type="yarn",
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=SEQ // 2,
        moe_layer_freq=[0] + [1] * (args.num_layers - 1),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=2,
        moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
        moe_router_load_balancing_type="seq_aux_loss",
        mtp_num_layers=1,
    )
    config = (MLATransformerConfig if args.deepseek else TransformerConfig)(
        **(deepseek if args.deepseek else {}),
        num_layers=args.num_layers,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=64,
        moe_aux_loss_coeff=1e-2,
        **({} if args.deepseek else {"moe_router_load_balancing_type": "aux_loss"}),
        moe_token_dispatcher_type=args.dispatcher,
        moe_grouped_gemm=args.moe_grouped_gemm,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        num_layers_in_first_pipeline_stage=args.first_stage_layers,
        pipeline_model_parallel_layout=args.layout,
        # Interleaving as Megatron-LM sets it up: with PP=2 both pipeline neighbours are one rank,
        # and only the unbatched, rank-parity-ordered p2p path matches their messages correctly.
        overlap_p2p_comm=bool(args.vpp),
        batch_p2p_comm=not args.vpp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=args.etp or args.tp,
        sequence_parallel=args.sequence_parallel,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
    )
    lora = LoRAConfig(rank=4, alpha=8.0) if args.lora else None
    # One model chunk per virtual pipeline stage (a single chunk without interleaving).
    chunks = [
        build_gpt_model(
            config,
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
            vp_stage=vp_stage,
            layer_spec_transform=lora_spec_transform(lora, True) if lora else None,
        )
        for vp_stage in (range(args.vpp) if args.vpp else [None])
    ]

    def sharded_state_dict(modules):
        return {f"model{i}": module.sharded_state_dict(metadata={}) for i, module in enumerate(modules)}

    if lora:
        for chunk in chunks:
            add_adapters_to_duplicated_linears(chunk, lora)
            freeze_base_model(chunk)
            if not args.load_init:
                # B starts at zero, which would make A's first gradient zero: start from a random B
                # so that both adapters' gradients are compared.
                generator = torch.Generator().manual_seed(7)
                for layer in adapter_layers(chunk):
                    layer.lora_b.data.normal_(0.0, 0.02, generator=generator)

    if args.load_init:
        loaded = dist_checkpointing.load(sharded_state_dict(chunks), args.init_dir)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
    else:
        os.makedirs(args.init_dir, exist_ok=True)
        dist_checkpointing.save(sharded_state_dict(chunks), args.init_dir)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.distributed_optimizer
    )
    model = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.01,
            clip_grad=1.0,
            use_distributed_optimizer=args.distributed_optimizer,
        ),
        model,
    )

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows_per_rank = GLOBAL_BATCH // dp_size
    num_microbatches = rows_per_rank // MICRO_BATCH
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def forward_backward(step):
        rows = batch_for_step(step)[dp_rank * rows_per_rank : (dp_rank + 1) * rows_per_rank]
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(rows.split(MICRO_BATCH)) for _ in model],
            model=model,
            num_microbatches=num_microbatches,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
        )
        if not parallel_state.is_pipeline_last_stage():
            return None
        loss = torch.stack([item["lm loss"] for item in reduced]).mean()
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return loss.item() / dp_size

    # The distributed optimizer leaves only each rank's shard of the grad buffer reduced, so that
    # layout is compared by losses alone.
    capture_grads = not args.distributed_optimizer
    # Frozen (LoRA base) parameters have no gradient: they keep their (common) initial weights below.
    trainable_params = [param for chunk in model for param in chunk.parameters() if param.requires_grad]
    losses, first_step_grads = [], None
    for step in range(args.steps):
        losses.append(forward_backward(step))
        if step == 0 and capture_grads:
            first_step_grads = [param.main_grad.clone() for param in trainable_params]
        update_successful, _, _ = optimizer.step()
        assert update_successful
    result = {"losses": losses}

    if capture_grads:
        # Full gradients are gathered by saving them in place of the weights: dist_checkpointing
        # knows how every layout shards every parameter.
        for param, grad in zip(trainable_params, first_step_grads):
            param.data.copy_(grad)
        os.makedirs(args.grads_dir, exist_ok=True)
        dist_checkpointing.save(sharded_state_dict([chunk.module for chunk in model]), args.grads_dir)
        if args.compare_grads_to:
            grads = dist_checkpointing.load_plain_tensors(args.grads_dir)
            reference = dist_checkpointing.load_plain_tensors(args.compare_grads_to)
            assert grads.keys() == reference.keys(), grads.keys() ^ reference.keys()
            result["grad_rel_diff"] = {
                key: ((grads[key] - reference[key]).abs().max() / reference[key].abs().max()).item()
                for key in grads
                if not key.endswith("_extra_state")
            }
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main()
