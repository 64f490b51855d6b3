"""megatron-r1: DeepSeek-R1/V3-style MoE training on megatron-core."""

import importlib.abc
import sys
import warnings

__version__ = "0.1.0"


class _MegatronCoreImport(importlib.abc.MetaPathFinder):
    """Hands megatron.core's first import to megatron_r1.platform (which imports torch, so only
    then: the corpus and data tools need neither)."""

    def find_spec(self, name, path=None, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)
        from megatron_r1.platform import megatron_core_import_spec

        return megatron_core_import_spec()


# megatron-core warns from each of its modules, in every process, that TransformerEngine and Apex
# are absent (six warnings per rank per run); megatron_r1.training.setup says it once instead.
for _absent in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
    warnings.filterwarnings("ignore", message=_absent, category=UserWarning)

if "megatron.core" not in sys.modules:
    sys.meta_path.insert(0, _MegatronCoreImport())
