"""Reinforcement learning with GRPO (DeepSeekMath, arXiv 2402.03300; DeepSeek-R1, arXiv 2501.12948):
the pieces of ``grpo_r1.py`` that need no model. ``prompts`` (prompt JSONL, its rendering and a
resumable shuffled stream), ``rewards`` (rule-based and user reward functions), ``objective`` (group
advantages, the clipped policy loss, k3 KL and loss aggregation on torch tensors) and ``tasks``
(a verifiable arithmetic task small enough for a CPU)."""
