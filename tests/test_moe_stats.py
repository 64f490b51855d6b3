import torch

from megatron_r1.moe_stats import ExpertLoadTracker


def test_counts_every_routed_token_per_moe_layer(monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_gpt_model

    initialize_distributed()
    try:
        config = TransformerConfig(
            num_layers=3,
            hidden_size=32,
            num_attention_heads=4,
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            moe_layer_freq=[0, 1, 1],
            add_bias_linear=False,
            use_cpu_initialization=True,
        )
        model = build_gpt_model(config, vocab_size=64, max_sequence_length=8)
        tracker = ExpertLoadTracker([model], num_layers=3, num_experts=4)
        tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
        model(tokens, torch.arange(8).expand(3, 8), None)
        counts = tracker.counts.clone()
        assert counts[0].sum() == 0, "layer 1 is dense"
        assert counts[1].sum() == counts[2].sum() == 3 * 8 * 2, "every token goes to top-2 experts"
        imbalance = tracker.collect()
        assert set(imbalance) == {2, 3}
        for layer in (2, 3):
            assert abs(imbalance[layer] - (counts[layer - 1].max() / counts[layer - 1].mean()).item()) < 1e-6
        assert tracker.counts.sum() == 0, "collect() starts a new window"
    finally:
        destroy_distributed()
