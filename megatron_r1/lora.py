"""LoRA (Hu et al. 2021): ``y = W x + (alpha / rank) * B A x`` with ``W`` frozen and only the
low-rank ``A`` [rank, in] and ``B`` [out, rank] trained; ``B`` starts at zero, so training starts
from the base model exactly.

The adapters are linear layers of the layer spec (:func:`apply_lora_to_spec` substitutes them for
megatron-core's linears), sharded as their base layer under tensor parallelism:

- column-parallel (output split): ``A`` replicated, ``B`` split on its output rows, like ``W``;
- row-parallel (input split): ``A`` split on its input columns, like ``W``; ``B`` replicated;
- duplicated (MLA's down-projections): both replicated, like ``W``.

So ``B @ A`` on every rank is that rank's shard of the full update, merging is local, and
checkpoints reshard like the base weights. Expert linears are built per local expert, so their
adapters live with their expert under expert parallelism (and are reduced over the expert
data-parallel group like the expert weights).

Targets (``--lora-target-modules``) name components -- ``attention``, ``mlp`` (dense MLP),
``shared_experts``, ``experts`` (routed) -- or linears (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``, MLA's ``linear_q_proj``, ``linear_q_down_proj``, ...), or both as
``experts.linear_fc1``.
"""

import contextlib
import dataclasses
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.post_training.modelopt.layers import Linear as DuplicatedLinear
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

ADAPTER_PARAMS = ("lora_a", "lora_b")
COMPONENTS = ("attention", "mlp", "shared_experts", "experts")
# The spec field under which each component's linears sit.
_COMPONENT_FIELDS = {
    "self_attention": "attention",
    "mlp": "mlp",
    "shared_experts": "shared_experts",
    "experts": "experts",
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple = COMPONENTS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets(self, component: str, linear: str) -> bool:
        return any(t in (component, linear, f"{component}.{linear}") for t in self.target_modules)


def initialize_adapter_a(tensor, generator=None):
    """As torch.nn.Linear (and PEFT) initialise A: U(-1/sqrt(in), 1/sqrt(in))."""
    torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


class _Adapter:
    """What the three LoRA linears share: parameters, the adapter path, merging, sharding."""

    def _add_adapters(
        self, lora: LoRAConfig, in_features: int, out_features: int, split: str | None, tp_size: int, tp_rank: int
    ):
        """``split``: "a_input" (row-parallel), "b_output" (column-parallel) or None; the sizes are the
        full (unsplit) ones, and both matrices are drawn whole then sliced, so every TP layout
        starts from the same adapters for the same seed."""
        self.lora = lora
        self.lora_split = split
        dtype = self.weight.dtype
        a_in = in_features // tp_size if split == "a_input" else in_features
        b_out = out_features // tp_size if split == "b_output" else out_features
        self.lora_a = torch.nn.Parameter(torch.empty(lora.rank, a_in, dtype=dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(b_out, lora.rank, dtype=dtype))
        _initialize_affine_weight_cpu(
            self.lora_a,
            lora.rank,
            in_features,
            a_in,
            1,
            initialize_adapter_a,
            params_dtype=dtype,
            rank=tp_rank if split == "a_input" else 0,
            world_size=tp_size if split == "a_input" else 1,
            skip_set_tensor_parallel_attributes=True,
        )
        # An expert's adapters (expert-TP 1) exist on one expert-parallel rank, which may be any
        # tensor-parallel rank: megatron-core counts a parameter not marked tensor-parallel in the
        # gradient norm on tensor-parallel rank 0 only, which would leave the others' out.
        expert = getattr(self.weight, "allreduce", True) is False
        if split == "a_input" or expert:
            set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)
        if split == "b_output" or expert:
            set_tensor_model_parallel_attributes(self.lora_b, True, 0, 1)
        for attribute in ("allreduce", "sequence_parallel"):  # expert-parallel / SP-duplicated, as the base
            if hasattr(self.weight, attribute):
                for param in (self.lora_a, self.lora_b):
                    setattr(param, attribute, getattr(self.weight, attribute))
        self.lora_dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else torch.nn.Identity()
        for param in self._base_params():
            param.requires_grad = False

    def _base_params(self):
        return [p for name, p in self.named_parameters(recurse=False) if name not in ADAPTER_PARAMS]

    def _dropout(self, x, input_sharded: bool):
        """Inputs that differ across TP ranks (sharded) draw their masks from the model-parallel
        RNG stream, identical inputs from the shared one (megatron's convention)."""
        if isinstance(self.lora_dropout, torch.nn.Identity) or not self.training:
            return x
        if input_sharded:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)

    @torch.no_grad()
    def merge_adapter(self):
        """Fold ``scale * B @ A`` into this rank's base weight shard and zero ``B``."""
        self.weight.add_((self.lora_b.float() @ self.lora_a.float() * self.lora.scale).to(self.weight.dtype))
        self.lora_b.zero_()

    def _sharded_adapters(self, prefix, sharded_offsets, metadata, base_axes: dict, glu_output: bool):
        axes = dict(base_axes)
        if self.lora_split == "a_input":
            axes["lora_a"] = 1
        elif self.lora_split == "b_output":
            axes["lora_b"] = 0
        sharded = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            axes,
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
        if glu_output:
            # fc1 of a gated MLP holds [gate; up] per rank: B's rows follow W's (swiglu) layout.
            key = f"{prefix}lora_b"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


def _check_expert_tp(layer):
    if getattr(layer, "explicit_expert_comm", False) and layer.tp_group.size() > 1:
        raise ValueError(
            "LoRA on routed experts needs --expert-tensor-parallel-size 1 (adapters inside "
            "expert tensor parallelism are not supported); leave 'experts' out of --lora-target-modules"
        )


class LoRAColumnParallelLinear(tensor_parallel.ColumnParallelLinear, _Adapter):
    def __init__(self, input_size, output_size, *, lora: LoRAConfig, glu_output: bool = False, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        if self.gather_output:
            raise ValueError("LoRA does not support a column-parallel linear with gather_output")
        _check_expert_tp(self)
        self.glu_output = glu_output
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self._add_adapters(lora, input_size, output_size, "b_output", tp_size, tp_rank)
        # A's gradient is partial per sequence shard under SP: summed over TP like the SP norms'.
        self.lora_a.sequence_parallel = self.sequence_parallel and tp_size > 1
        self.lora_b.sequence_parallel = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        low_rank = torch.nn.functional.linear(self._dropout(input_, self.sequence_parallel), self.lora_a)
        if self.tp_group.size() > 1 and not self.explicit_expert_comm:
            if self.sequence_parallel:
                low_rank = gather_from_sequence_parallel_region(low_rank, group=self.tp_group)
            else:  # backward sums B's partial input gradients over TP, as for the base input
                low_rank = copy_to_tensor_model_parallel_region(low_rank, group=self.tp_group)
        return output + torch.nn.functional.linear(low_rank, self.lora_b) * self.lora.scale, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_adapters(prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0}, self.glu_output)


class LoRARowParallelLinear(tensor_parallel.RowParallelLinear, _Adapter):
    def __init__(self, input_size, output_size, *, lora: LoRAConfig, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        _check_expert_tp(self)
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self._add_adapters(lora, input_size, output_size, "a_input", tp_size, tp_rank)
        self.lora_a.sequence_parallel = False
        # B's gradient is partial per sequence shard under SP.
        self.lora_b.sequence_parallel = self.sequence_parallel and tp_size > 1

    def forward(self, input_):
        output, bias = super().forward(input_)
        tp_size = self.tp_group.size()
        low_rank = torch.nn.functional.linear(self._dropout(input_, tp_size > 1), self.lora_a)
        if tp_size > 1 and not self.explicit_expert_comm:
            if self.sequence_parallel:
                low_rank = reduce_scatter_to_sequence_parallel_region(low_rank, group=self.tp_group)
            else:
                low_rank = reduce_from_tensor_model_parallel_region(low_rank, group=self.tp_group)
        return output + torch.nn.functional.linear(low_rank, self.lora_b) * self.lora.scale, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_adapters(prefix, sharded_offsets, metadata, {"weight": 1}, False)


class LoRADuplicatedLinear(DuplicatedLinear, _Adapter):
    """Adapters on the TP-duplicated linear model.py uses for MLA's down-projections. megatron-core's
    MLA accepts only the plain class in its spec, so these are converted after the build
    (:func:`add_adapters_to_duplicated_linears`)."""

    def forward(self, x):
        output, bias = super().forward(x)
        low_rank = torch.nn.functional.linear(self._dropout(x, self.config.sequence_parallel), self.lora_a)
        return output + torch.nn.functional.linear(low_rank, self.lora_b) * self.lora.scale, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._sharded_adapters(prefix, sharded_offsets, metadata, {}, False)


_LORA_CLASSES = {
    tensor_parallel.ColumnParallelLinear: LoRAColumnParallelLinear,
    tensor_parallel.RowParallelLinear: LoRARowParallelLinear,
}


def apply_lora_to_spec(spec, lora: LoRAConfig, component: str | None = None, glu: bool = False):
    """`spec` (a layer/block spec, submodules dataclass or list) with the targeted linears of the
    attention / MLP / expert components replaced by their LoRA versions."""
    if isinstance(spec, list):
        return [apply_lora_to_spec(item, lora, component, glu) for item in spec]
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=apply_lora_to_spec(spec.submodules, lora, component, glu))
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    changes = {}
    for field in dataclasses.fields(spec):
        if not field.init:
            continue
        value = getattr(spec, field.name)
        inner = _COMPONENT_FIELDS.get(field.name, component)
        if component is not None and isinstance(value, type) and value in _LORA_CLASSES:
            if lora.targets(component, field.name):
                params = {"lora": lora}
                if field.name == "linear_fc1" and component != "attention" and glu:
                    params["glu_output"] = True
                changes[field.name] = ModuleSpec(module=_LORA_CLASSES[value], params=params)
        elif isinstance(value, (ModuleSpec, list)) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            changes[field.name] = apply_lora_to_spec(value, lora, inner, glu)
    return dataclasses.replace(spec, **changes)


def lora_spec_transform(lora: LoRAConfig, gated_linear_unit: bool):
    """The block-spec transform build_gpt_model applies (see training.setup); the duplicated
    linears follow with :func:`add_adapters_to_duplicated_linears` on the built model."""
    return lambda spec: apply_lora_to_spec(spec, lora, glu=gated_linear_unit)


def add_adapters_to_duplicated_linears(model, lora: LoRAConfig) -> int:
    """Give the targeted TP-duplicated linears (MLA's q/kv down-projections) their adapters in
    place: same parameters and checkpoint keys, plus lora_a/lora_b. Returns how many."""
    count = 0
    for name, module in model.named_modules():
        if type(module) is DuplicatedLinear and ".self_attention." in name:
            if lora.targets("attention", name.rsplit(".", 1)[-1]):
                module.__class__ = LoRADuplicatedLinear
                module._add_adapters(lora, module.in_features, module.out_features, None, 1, 0)
                count += 1
    return count


def adapter_layers(model) -> list:
    return [module for module in model.modules() if isinstance(module, _Adapter)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, `model` computes as its base model: every adapter's scale is 0, so the adapter path
    adds exact zeros (GRPO's reference policy is the base model, without a copy of it)."""
    layers = adapter_layers(model)
    configs = [layer.lora for layer in layers]
    for layer, config in zip(layers, configs):
        layer.lora = dataclasses.replace(config, alpha=0.0)
    try:
        yield
    finally:
        for layer, config in zip(layers, configs):
            layer.lora = config


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def freeze_base_model(model) -> int:
    """Freeze every parameter but the adapters; returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter_key(name)
        trainable += param.numel() if param.requires_grad else 0
    if not adapter_layers(model):
        raise ValueError("--lora-target-modules matched no linear layer of this model")
    return trainable


def checkpoint_adapters_only(model) -> None:
    """Make `model`'s checkpoints hold its adapters alone (the frozen base weights come from
    --pretrained-checkpoint): its sharded_state_dict drops the base weights, and loading a state
    dict without them keeps the ones in place. `full_sharded_state_dict` still gives everything."""
    full = model.sharded_state_dict

    def adapters_only(prefix="", sharded_offsets=(), metadata=None):
        return {k: v for k, v in full(prefix, sharded_offsets, metadata).items() if is_adapter_key(k)}

    def keep_base_weights(module, incompatible_keys):
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if is_adapter_key(k)]

    model.full_sharded_state_dict = full
    model.sharded_state_dict = adapters_only
    model.register_load_state_dict_post_hook(keep_base_weights)


def merge_adapters(model) -> int:
    """Fold every adapter into its base weight (see _Adapter.merge_adapter); returns how many."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.merge_adapter()
    return len(layers)
