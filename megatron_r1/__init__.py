"""megatron-r1: DeepSeek-R1/V3-style MoE training on megatron-core."""

__version__ = "0.1.0"
