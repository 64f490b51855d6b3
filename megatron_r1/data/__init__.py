"""Training data on disk: JSONL reading with bad-input accounting, megatron-core indexed datasets
(``.bin``/``.idx``) written atomically, and the parallel JSONL -> indexed dataset preprocessing."""
