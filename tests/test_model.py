"""The DeepSeek-style model (MLA, dense-then-MoE layers, sigmoid router with expert bias,
group-limited routing, sequence aux loss, MTP) under every 2-process layout."""

import pytest

DEEPSEEK = ["--deepseek"]

LAYOUTS = {
    # The MLA + TP case catches the rotary-key gradient that a column-parallel kv down-projection
    # loses (megatron_r1/model.py).
    "tp2_sequence_parallel": ["--tp", "2", "--sequence-parallel"],
    "ep2_alltoall": ["--ep", "2", "--dispatcher", "alltoall"],
    # Attention split over TP=2 while each expert stays whole (expert tensor parallel 1) on EP=2.
    "tp2_sp_etp1_ep2": ["--tp", "2", "--sequence-parallel", "--etp", "1", "--ep", "2", "--dispatcher", "alltoall"],
    "pp2_mtp_on_last_stage": ["--pp", "2"],
    "dp2_distributed_optimizer": ["--distributed-optimizer"],
}


def test_deepseek_single_process_trains(tiny_gpt_runs):
    _, result = tiny_gpt_runs.reference(DEEPSEEK)
    assert result["losses"][-1] < result["losses"][0] - 0.1, result["losses"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deepseek_layout_matches_single_process(tiny_gpt_runs, layout, tmp_path):
    tiny_gpt_runs.assert_layout_matches(DEEPSEEK, LAYOUTS[layout], tmp_path)


def test_deepseek_uneven_pipeline_matches_single_process(tiny_gpt_runs, tmp_path):
    """PP=2 over 4 layers: the dense layer alone on the first stage, the 3 MoE layers and MTP on the last."""
    tiny_gpt_runs.assert_layout_matches(DEEPSEEK + ["--num-layers", "4"], ["--pp", "2", "--first-stage-layers", "1"],
                                        tmp_path)  # fmt: skip


def test_deepseek_expert_tensor_parallel_under_ep_matches_single_process(tiny_gpt_runs, tmp_path):
    """4 processes: attention over TP=2 + SP, each expert split over expert-TP=2 and the experts over
    EP=2. Each expert-TP rank then receives a different number of tokens, which the alltoall
    dispatcher gathers and (backwards) reduce-scatters in uneven parts."""
    layout = ["--tp", "2", "--sequence-parallel", "--etp", "2", "--ep", "2", "--dispatcher", "alltoall"]
    tiny_gpt_runs.assert_layout_matches(DEEPSEEK, layout, tmp_path, nproc=4)


def test_deepseek_interleaved_pipeline_matches_single_process(tiny_gpt_runs, tmp_path):
    """PP=2 with two virtual stages per rank: both pipeline neighbours are the same rank, the case
    where batched p2p would pair activations with gradients."""
    tiny_gpt_runs.assert_layout_matches(DEEPSEEK + ["--num-layers", "4"], ["--pp", "2", "--vpp", "2"], tmp_path)


def test_deepseek_pipeline_layout_matches_single_process(tiny_gpt_runs, tmp_path):
    """--pipeline-model-parallel-layout: PP=2 x 2 virtual stages of 1, 2, 1 and 0 decoder layers (the
    last chunk only MTP and loss), an uneven interleaved split the other flags cannot express."""
    tiny_gpt_runs.assert_layout_matches(DEEPSEEK + ["--num-layers", "4"], ["--pp", "2", "--vpp", "2", "--layout",
                                                                           "Et|tt|t|mL"], tmp_path)  # fmt: skip


def test_label_smoothing_applies_to_training_loss_only():
    """Smoothed loss = (1 - eps') * CE + eps' * mean(-log p) over the vocabulary, as megatron's
    vocab_parallel_cross_entropy defines eps' = eps * V / (V - 1)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_r1.distributed import destroy_distributed, initialize_distributed
    from megatron_r1.model import build_gpt_model

    initialize_distributed()
    try:
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                                   attention_dropout=0.0, use_cpu_initialization=True)
        model = build_gpt_model(config, vocab_size=64, max_sequence_length=16, label_smoothing=0.2)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        labels = torch.roll(tokens, -1, dims=1)
        positions = torch.arange(16).expand(2, 16)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, positions, None)  # [b, s, V]
            plain = model(tokens, positions, None, labels=labels)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        cross_entropy = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(plain, cross_entropy, atol=1e-5)
        model.train()
        with torch.no_grad():
            smoothed = model(tokens, positions, None, labels=labels)
        eps = 0.2 * 64 / 63
        expected = (1 - eps) * cross_entropy + eps * (-log_probs.mean(-1))
        assert torch.allclose(smoothed, expected, atol=1e-5)
    finally:
        destroy_distributed()
