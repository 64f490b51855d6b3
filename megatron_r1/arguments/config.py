"""megatron-core's TransformerConfig from the parsed flags.

Model flags are named after TransformerConfig's fields (Megatron-LM's convention), so every flag
whose name is a config field passes straight through; the few flags Megatron-LM names differently
are mapped in ``_CONFIG_RENAMES``."""

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

# Megatron-LM flag dest -> megatron-core TransformerConfig field.
_CONFIG_RENAMES = {
    "num_experts": "num_moe_experts",
    "norm_epsilon": "layernorm_epsilon",
    "decoder_first_pipeline_num_layers": "num_layers_in_first_pipeline_stage",
    "decoder_last_pipeline_num_layers": "num_layers_in_last_pipeline_stage",
}


def transformer_config_from_args(args, padded_vocab_size: int | None = None) -> TransformerConfig:
    """A TransformerConfig (MLATransformerConfig with --multi-latent-attention) from the flags:
    every flag that names a config field passes through."""
    config_cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = {}
    for name, value in vars(args).items():
        field = _CONFIG_RENAMES.get(name, name)
        if field in fields and value is not None:
            kwargs[field] = value
    kwargs.update(
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        bf16=args.bf16,
        window_size=tuple(args.window_size) if args.window_size else None,
        fp8=args.fp8_format,
        attention_backend=AttnBackend[args.attention_backend],
        # Interleaving as Megatron-LM sets it up: with PP=2 both pipeline neighbours are one rank,
        # and only the unbatched, rank-parity-ordered p2p path matches their messages correctly.
        overlap_p2p_comm=bool(args.virtual_pipeline_model_parallel_size),
        batch_p2p_comm=not args.virtual_pipeline_model_parallel_size,
        # Initialise full weights on CPU and then shard them, so that every parallel layout starts
        # from the same model for the same seed (megatron-core's use_cpu_initialization).
        use_cpu_initialization=True,
        perform_initialization=True,
        # It needs the grad buffers of megatron-core's DDP wrapper: training.setup turns it on.
        gradient_accumulation_fusion=False,
        # megatron-core fuses the activation for SwiGLU, and for GELU only with biases (and
        # without routing weights: an MoE's experts take them).
        bias_activation_fusion=args.bias_swiglu_fusion
        if args.swiglu
        else args.bias_gelu_fusion and not args.disable_bias_linear and args.num_experts is None,
        # Its fused RoPE kernels train but do not decode: training.setup turns it on.
        apply_rope_fusion=False,
    )
    if not args.multi_latent_attention:
        for mla_field in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            kwargs.pop(mla_field, None)
    else:
        # None means "no q compression" (DeepSeek-V2-Lite); dropped with the other None flags above,
        # MLATransformerConfig would fall back to its default rank of 512.
        kwargs["q_lora_rank"] = args.q_lora_rank
        if args.original_max_position_embeddings is None:
            kwargs["original_max_position_embeddings"] = args.max_position_embeddings
    if args.num_experts is None:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("moe_")}
    if not args.mtp_num_layers:  # megatron-core runs MTP for any value but None, 0 included
        kwargs.pop("mtp_num_layers", None)
    return config_cls(**kwargs)
