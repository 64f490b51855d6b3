"""Conversion between our megatron-core torch_dist checkpoints and Hugging Face transformers
directories (DeepSeek-V3 layout, ``DeepseekV3ForCausalLM``).

- :mod:`~megatron_r1.hf.config`: model flags <-> ``config.json``, and what transformers cannot represent;
- :mod:`~megatron_r1.hf.keys`: the tensor-by-tensor mapping, grouped by layer;
- :mod:`~megatron_r1.hf.storage`: reading our checkpoints and safetensors directories a few tensors at a time,
  writing sharded safetensors;
- :mod:`~megatron_r1.hf.export` / :mod:`~megatron_r1.hf.import_`: the two directions, layer by layer;
- :mod:`~megatron_r1.hf.tokenizer`: our SentencePiece model as Hugging Face tokenizer files;
- :mod:`~megatron_r1.hf.verify`: both models on the same tokens.
"""
