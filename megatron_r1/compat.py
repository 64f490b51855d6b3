"""Fixes for megatron-core 0.16.1 when TransformerEngine (and Apex) are not installed (CPU
machines, or GPU installs without the [gpu] extra). These are megatron-core bugs, not device
questions, so they apply on every device; with TransformerEngine installed nothing changes.
"""

import importlib.util

import torch


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def missing_gpu_packages() -> list[str]:
    """The optional GPU packages megatron-core would use and this machine lacks."""
    wanted = {"TransformerEngine": "transformer_engine", "Apex": "apex"}
    return [name for name, module in wanted.items() if importlib.util.find_spec(module) is None]


def fix_megatron_without_transformer_engine() -> None:
    if transformer_engine_installed():
        return
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    # multi_latent_attention's TE import succeeds through a mock module, so HAVE_TE is True and
    # isinstance(linear_proj, TELinear) fails on the mock.
    multi_latent_attention.HAVE_TE = False
    # moe_utils binds te_general_gemm only when TE imports, yet reads it on every router forward.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _fix_distributed_optimizer_state_loading()


def _fix_distributed_optimizer_state_loading():
    """With torch's optimizers (no Apex/TE), DistributedOptimizer cannot load its sharded state:
    - a fresh optimizer has no state, and its `state_dict()` (called to build the loading state
      dict) asserts on every parameter's torch-style "step": empty state is initialised first;
    - `_set_main_param_and_optimizer_states` copies into the fp32 main parameter with autograd on
      ("a view of a leaf Variable that requires grad"), and expects a "step" tensor per parameter,
      which the checkpoint keeps in the param groups (restored by `load_state_dict` already);
    - `load_state_dict` hands every parameter's state one shared "step" tensor, which torch's Adam
      then increments in place once per parameter per step: the bias correction goes wrong from the
      first step after a resume. Each parameter gets its own copy."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if distrib_optimizer.HAVE_APEX_OR_TE or getattr(cls, "_megatron_r1_fixed", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, destination in destinations.items():
                if key != "step":
                    destination.copy_(tensors[key])

    original_sharded_state_dict = cls.sharded_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading and not self.optimizer.state:
            self.init_state_fn(self.optimizer, self.config)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param].setdefault("step", torch.tensor(0.0))
        return original_sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    original_load_state_dict = cls.load_state_dict

    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for param_state in self.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()

    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict
    cls.sharded_state_dict = sharded_state_dict
    cls._megatron_r1_fixed = True
