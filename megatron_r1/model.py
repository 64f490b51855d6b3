"""Model construction: a megatron-core GPTModel from a TransformerConfig plus layer specs.

The specs are megatron-core's local ones (dense layers first, then MoE layers per
``moe_layer_freq``; MLA or GQA attention; MTP block), with four substitutions where the local
modules do not fit:

- norms: :class:`~megatron_r1.layers.SequenceParallelTorchNorm` (the local torch norm refuses
  sequence parallelism, which MoE with TP requires);
- core attention: :class:`~megatron_r1.layers.SDPACoreAttention` (MLA's q/k and v head dims differ);
- MLA's q/kv down-projections: a TP-duplicated linear. As a ColumnParallelLinear, the gathered
  rotary-key slice of linear_kv_down_proj gets no cross-rank gradient sum in backward, so TP > 1
  trains with silently wrong gradients. Duplicated (with sequence parallelism) the gradients match
  TP = 1;
- the MoE layer: :class:`~megatron_r1.token_dispatch.DevicePermutationMoELayer`, whose token
  permutation needs no host sync where all experts are local, and under expert parallelism none
  but the all-to-all's split sizes.

With ``--moe-grouped-gemm`` the routed experts are :class:`~megatron_r1.experts.GroupedGemmExperts`
(SequentialMLP's modules and checkpoint keys, grouped-GEMM compute) instead of megatron-core's
legacy GroupedMLP, which needs the grouped_gemm package; TransformerEngine's spec keeps TEGroupedMLP.
"""

import copy
import dataclasses

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_decoder_layer_specs,
    get_gpt_mtp_block_spec,
)
from megatron.core.post_training.modelopt.layers import Linear as DuplicatedLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1 import platform
from megatron_r1.arguments import transformer_config_from_args
from megatron_r1.compat import fix_megatron_without_transformer_engine
from megatron_r1.experts import GroupedGemmExperts
from megatron_r1.initialization import initialize_by_identity
from megatron_r1.layers import SDPACoreAttention, SequenceParallelTorchNorm
from megatron_r1.token_dispatch import DevicePermutationMoELayer

_MODULE_SUBSTITUTES = {
    WrappedTorchNorm: SequenceParallelTorchNorm,
    DotProductAttention: SDPACoreAttention,
    MoELayer: DevicePermutationMoELayer,
}


def _substitute(spec, substitutes=_MODULE_SUBSTITUTES):
    """`spec` (ModuleSpec / submodules dataclass / list / class) with our substitutions applied."""
    if isinstance(spec, type):
        return substitutes.get(spec, spec)
    if isinstance(spec, list):
        return [_substitute(item, substitutes) for item in spec]
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(
            spec, module=_substitute(spec.module, substitutes), submodules=_substitute(spec.submodules, substitutes)
        )
    if dataclasses.is_dataclass(spec):
        changes = {f.name: _substitute(getattr(spec, f.name), substitutes) for f in dataclasses.fields(spec) if f.init}
        if isinstance(spec, MLASelfAttentionSubmodules):
            changes.update(linear_q_down_proj=DuplicatedLinear, linear_kv_down_proj=DuplicatedLinear)
        return dataclasses.replace(spec, **changes)
    return spec


def _local_spec_inputs(config: TransformerConfig):
    """The config megatron-core's local spec builders get, and our substitutions. With
    --moe-grouped-gemm they would choose the legacy GroupedMLP (grouped_gemm package): they build
    SequentialMLP's spec instead, whose module becomes GroupedGemmExperts."""
    if not config.moe_grouped_gemm:
        return config, _MODULE_SUBSTITUTES
    sequential = copy.copy(config)
    sequential.moe_grouped_gemm = False
    return sequential, {**_MODULE_SUBSTITUTES, SequentialMLP: GroupedGemmExperts}


def decoder_block_spec(config: TransformerConfig, vp_stage=None, use_transformer_engine=False):
    """TransformerEngine's spec as megatron-core defines it, or the local spec with our substitutions."""
    if use_transformer_engine:
        return get_gpt_decoder_block_spec(config, True, normalization=config.normalization, vp_stage=vp_stage)
    local_config, substitutes = _local_spec_inputs(config)
    spec = get_gpt_decoder_block_spec(local_config, False, normalization=config.normalization, vp_stage=vp_stage)
    return _substitute(spec, substitutes)


def last_decoder_layer_spec(config: TransformerConfig, use_transformer_engine=False):
    """A block spec of the model's last decoder layer alone, wherever it lives."""
    if use_transformer_engine:
        layer = get_gpt_decoder_layer_specs(config, True, normalization=config.normalization)[-1]
        return TransformerBlockSubmodules(layer_specs=[layer])
    local_config, substitutes = _local_spec_inputs(config)
    layer = get_gpt_decoder_layer_specs(local_config, False, normalization=config.normalization)[-1]
    return TransformerBlockSubmodules(layer_specs=[_substitute(layer, substitutes)])


def mtp_block_spec(config: TransformerConfig, block_spec, vp_stage=None, use_transformer_engine=False):
    """The multi-token-prediction block for this pipeline stage (None where it has no MTP layer);
    megatron-core builds MTP layers like the last decoder layer of `block_spec`."""
    if not config.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage)
    return spec if use_transformer_engine else _substitute(spec)


class LabelSmoothedGPTModel(GPTModel):
    """megatron-core's GPTModel whose training LM (and MTP) loss uses label smoothing; in eval mode
    the loss is plain cross entropy, so validation perplexity stays comparable."""

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing
        if self.post_process and self.mtp_process and not self.pre_process and self.share_embeddings_and_output_weights:
            # A later pipeline stage with MTP layers holds a copy of the word embeddings, and its
            # output layer computes with that copy (shared_embedding_or_output_weight); megatron-core
            # 0.16 still allocates the output layer a weight of its own, which nothing uses and its
            # sharded_state_dict refuses (saving failed).
            self.output_layer.weight = None

    def compute_language_model_loss(self, labels, logits):
        if not (self.training and self.label_smoothing > 0):
            return super().compute_language_model_loss(labels, logits)
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1).contiguous(), label_smoothing=self.label_smoothing
        )
        return loss.transpose(0, 1).contiguous()


def build_gpt_model(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage=None,
    label_smoothing: float = 0.0,
    use_transformer_engine: bool = False,
    layer_spec_transform=None,
    **gpt_kwargs,
) -> GPTModel:
    """`layer_spec_transform(spec)`, when given, rewrites the decoder block spec (e.g. LoRA
    adapters, megatron_r1.lora); the MTP block follows it."""
    fix_megatron_without_transformer_engine()
    block_spec = decoder_block_spec(config, vp_stage=vp_stage, use_transformer_engine=use_transformer_engine)
    if layer_spec_transform is not None:
        block_spec = layer_spec_transform(block_spec)
    # MTP layers are built like the model's last decoder layer, which is in this chunk unless
    # --pipeline-model-parallel-layout gives the MTP layers a chunk of their own ("...|mL").
    mtp_source = block_spec
    if not block_spec.layer_specs:
        mtp_source = last_decoder_layer_spec(config, use_transformer_engine)
        if layer_spec_transform is not None:
            mtp_source = layer_spec_transform(mtp_source)
    return LabelSmoothedGPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        mtp_block_spec=mtp_block_spec(config, mtp_source, vp_stage, use_transformer_engine),
        vp_stage=vp_stage,
        label_smoothing=label_smoothing,
        **gpt_kwargs,
    )


def _drawn_by_identity(weight):
    """megatron-core's init methods while it builds a model: leave the weight (drawn afterwards)."""
    return weight


def build_model(
    args,
    config: TransformerConfig | None = None,
    *,
    with_mtp: bool = True,
    initialize: bool = True,
    layer_spec_transform=None,
    prepare_chunk=None,
    ddp_config=None,
    device=None,
) -> list:
    """Every model chunk of this rank (one per virtual pipeline stage), the one way every entry
    point builds the model: from `config` (default: the flags'), placed on the compute device
    (megatron_r1.platform), wrapped in megatron-core's DDP when `ddp_config` is given.

    - `initialize`: draw the weights by their identity (megatron_r1.initialization: the same seed
      gives the same model in every layout and on every device); False for a model whose weights
      are all loaded next (generation, conversion, a teacher), which skips drawing altogether.
    - `with_mtp`: False leaves the multi-token-prediction layers out (next-token logits do not use
      them, and megatron-core's forward with MTP layers requires labels).
    - `layer_spec_transform(spec)` rewrites the decoder block spec (LoRA); `prepare_chunk(chunk)`
      adjusts each built chunk (adapters, freezing, dropout) before it is placed and wrapped.
    - `device`: where to place the chunks instead (a conversion that streams through host memory)."""
    config = config or transformer_config_from_args(args)
    placement = device or platform.compute_device()
    construction = dataclasses.replace(
        config,
        # megatron-core sets each weight up (its tensor-parallel attributes, zero biases) but draws
        # nothing: initialize_by_identity draws every random weight once, on the CPU, for any device.
        perform_initialization=True,
        init_method=_drawn_by_identity,
        output_layer_init_method=_drawn_by_identity,
        embedding_init_method=_drawn_by_identity,
        # Allocated where the chunk computes (on a GPU: no copy of the model in host memory); on the
        # CPU for a chunk placed elsewhere (a conversion through host memory; the meta device).
        use_cpu_initialization=placement != platform.compute_device(),
        mtp_num_layers=config.mtp_num_layers if with_mtp else None,
    )
    chunks = []
    vpp = args.virtual_pipeline_model_parallel_size
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_gpt_model(
            construction,
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            rope_scaling=args.use_rope_scaling,
            rope_scaling_factor=args.rope_scaling_factor,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            label_smoothing=args.label_smoothing,
            use_transformer_engine=args.transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
            layer_spec_transform=layer_spec_transform,
        )
        if prepare_chunk is not None:
            prepare_chunk(chunk)
        if initialize:
            initialize_by_identity(chunk, config, args.seed)
        chunk.to(placement)  # what megatron-core builds on the CPU regardless (routers, LoRA adapters)
        if ddp_config is not None:
            # Later chunks' grads are reduced in one piece, as in Megatron-LM.
            chunk = DistributedDataParallel(construction, ddp_config, chunk, disable_bucketing=len(chunks) > 0)
        chunks.append(chunk)
    return chunks
