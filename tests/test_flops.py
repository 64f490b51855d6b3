"""Parameter counts against built megatron-core models and DeepSeek's published sizes; the FLOP
formula against hand arithmetic."""

import shlex

import pytest

from megatron_r1.arguments import parse_args, transformer_config_from_args
from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.flops import count_model, human_count, report_model_size, summary
from megatron_r1.model import build_gpt_model

BASE = "--mock-data --vocab-size 500 --seq-length 32 --num-layers 2 --hidden-size 64 --num-attention-heads 4"

TINY_CONFIGS = {
    "mla_moe_shared_mtp_untied": "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 "
    "--v-head-dim 16 --num-experts 4 --moe-layer-freq [0]+[1] --moe-router-topk 2 --moe-ffn-hidden-size 64 "
    "--moe-shared-expert-intermediate-size 64 --mtp-num-layers 1",
    # The last layer is dense, so the MTP layers are too; LayerNorm brings norm biases.
    "mla_tied_two_dense_mtp_layers_layernorm": "--disable-bias-linear --multi-latent-attention --q-lora-rank 24 "
    "--kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --num-experts 4 "
    "--moe-layer-freq [1]+[0] --mtp-num-layers 2 --normalization LayerNorm",
    "gqa_dense_biases_learned_positions_tied": "--group-query-attention --num-query-groups 2 "
    "--normalization LayerNorm --position-embedding-type learned_absolute --ffn-hidden-size 96",
    "gqa_moe_every_second_layer_kv_channels": "--num-layers 3 --num-experts 4 --moe-ffn-hidden-size 32 "
    "--kv-channels 8 --moe-layer-freq 2 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--moe-shared-expert-intermediate-size 48",
}

DEEPSEEK_V3 = (
    "--mock-data --vocab-size 129280 --num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 "
    "--num-attention-heads 128 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 "
    "--v-head-dim 128 --num-experts 256 --moe-layer-freq [0]*3+[1]*58 --moe-router-topk 8 "
    "--moe-ffn-hidden-size 2048 --moe-shared-expert-intermediate-size 2048 --mtp-num-layers 1 "
    "--seq-length 4096 --micro-batch-size 1"
)
DEEPSEEK_V2_LITE = (
    "--mock-data --vocab-size 102400 --num-layers 27 --hidden-size 2048 --ffn-hidden-size 10944 "
    "--num-attention-heads 16 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--multi-latent-attention --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 "
    "--num-experts 64 --moe-layer-freq [0]*1+[1]*26 --moe-router-topk 6 --moe-ffn-hidden-size 1408 "
    "--moe-shared-expert-intermediate-size 2816 --seq-length 4096 --micro-batch-size 1"
)


def parse(flags):
    return parse_args("test", shlex.split(flags))


@pytest.fixture(scope="module")
def process_group():
    initialize_distributed()
    yield
    destroy_distributed()


def build(args):
    args.padded_vocab_size = 512  # 500 padded to a multiple of 128
    return build_gpt_model(
        transformer_config_from_args(args),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )


def inactive_expert_params(model, args) -> int:
    """Parameters of the routed experts a token does not use: (E - k) / E of every MoE block's
    experts, read off the built model."""
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts.local_experts." in name)
    return expert_params * (args.num_experts - args.moe_router_topk) // args.num_experts


@pytest.mark.parametrize("qk_layernorm", [False, True], ids=["no_qk_norm", "qk_norm"])
@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_counts_match_built_model(process_group, name, qk_layernorm):
    args = parse(f"{BASE} {TINY_CONFIGS[name]}")
    # No flag yet; the config takes every field the namespace names.
    args.qk_layernorm = qk_layernorm
    model = build(args)
    count = count_model(args)
    assert count.total_params == sum(p.numel() for p in model.parameters())

    # Embedding lookups are not active; tied word embeddings are, as the output projection.
    lookups = [model.embedding.position_embeddings] if args.position_embedding_type == "learned_absolute" else []
    if args.untie_embeddings_and_output_weights:
        lookups.append(model.embedding.word_embeddings)
    expected_active = count.total_params - sum(table.weight.numel() for table in lookups)
    if args.num_experts:
        expected_active -= inactive_expert_params(model, args)
    assert count.active_params == expected_active


def test_counts_match_built_model_without_q_compression(process_group):
    args = parse(
        f"{BASE} --disable-bias-linear --multi-latent-attention --kv-lora-rank 32 --qk-head-dim 16 "
        "--qk-pos-emb-head-dim 8 --v-head-dim 16"
    )
    assert count_model(args).total_params == sum(p.numel() for p in build(args).parameters())


def test_deepseek_v3_published_size():
    """DeepSeek-V3: 671B total and 36.6B activated (0.9B output head included) for the main model,
    plus an MTP module of 11.5B own parameters (the weights' README)."""
    count = count_model(parse(DEEPSEEK_V3))
    mtp = count.components["mtp"]
    assert count.total_params - mtp.total == pytest.approx(671e9, rel=0.01)
    assert count.active_params - mtp.active == pytest.approx(36.6e9, rel=0.02)
    assert mtp.total == pytest.approx(11.5e9, rel=0.03)
    assert count.components["output_layer"].active == 129280 * 7168


def test_deepseek_v2_lite_published_size():
    count = count_model(parse(DEEPSEEK_V2_LITE))
    assert count.total_params == pytest.approx(15.7e9, rel=0.02)
    assert count.active_params == pytest.approx(2.4e9, rel=0.04)
    assert count.components["mtp"].total == 0


def test_flops_of_a_dense_gqa_model_by_hand():
    args = parse(
        "--mock-data --vocab-size 256 --seq-length 64 --num-layers 3 --hidden-size 64 --num-attention-heads 4 "
        "--group-query-attention --num-query-groups 2 --ffn-hidden-size 160 --swiglu --disable-bias-linear "
        "--micro-batch-size 2 --global-batch-size 8"
    )
    head_dim = 64 // 4
    per_layer_weights = 64 * (4 + 2 * 2) * head_dim + 4 * head_dim * 64 + 64 * 2 * 160 + 160 * 64
    # Causal attention: each query meets 64 / 2 keys on average, for QK^T and for AV.
    per_layer_attention = 6 * 4 * (head_dim + head_dim) * 64 / 2
    logits = 6 * 64 * 256
    expected_per_token = 3 * (6 * per_layer_weights + per_layer_attention) + logits
    count = count_model(args)
    assert count.flops_per_token == pytest.approx(expected_per_token, rel=1e-12)
    assert count.flops_per_iteration == pytest.approx(expected_per_token * 8 * 64, rel=1e-12)


def test_routed_flops_follow_top_k_not_expert_count():
    flags = f"{BASE} --disable-bias-linear --num-experts {{experts}} --moe-router-topk {{topk}} --moe-ffn-hidden-size 8"
    base = count_model(parse(flags.format(experts=8, topk=2))).components
    more_experts = count_model(parse(flags.format(experts=16, topk=2))).components
    more_routed = count_model(parse(flags.format(experts=8, topk=4))).components
    assert more_experts["routed_experts"].flops_per_token == base["routed_experts"].flops_per_token
    assert more_experts["routed_experts"].total == 2 * base["routed_experts"].total
    assert more_routed["routed_experts"].flops_per_token == 2 * base["routed_experts"].flops_per_token
    assert more_routed["routed_experts"].active == 2 * base["routed_experts"].active


def test_sliding_window_counts_the_band_of_the_mask():
    flags = "--mock-data --vocab-size 256 --seq-length 64 --num-layers 1 --hidden-size 32 --num-attention-heads 2"
    full = count_model(parse(flags)).components["attention"].flops_per_token
    wide = count_model(parse(flags + " --window-size 64 0")).components["attention"].flops_per_token
    narrow = count_model(parse(flags + " --window-size 16 0")).components["attention"].flops_per_token
    assert wide == full
    per_key = 6 * 2 * (16 + 16)  # heads x (d_qk + d_v)
    assert full - narrow == pytest.approx(per_key * (64 / 2 - (64**2 - 48**2) / (2 * 64)))


def test_window_attn_skip_freq_counts_full_attention_in_the_layers_it_names():
    """--window-attn-skip-freq 2: layers 2 and 4 attend fully, 1 and 3 through the window; as a
    per-layer list the same. The built model's layers agree (MTP's takes the last decoder layer's)."""
    from megatron_r1.layers import SDPACoreAttention

    flags = (
        "--mock-data --vocab-size 256 --seq-length 64 --max-position-embeddings 64 --num-layers 4 "
        "--hidden-size 32 --num-attention-heads 2"
    )
    attention = {
        name: count_model(parse(flags + extra)).components["attention"].flops_per_token
        for name, extra in (
            ("full", ""),
            ("window", " --window-size 16 0"),
            ("every 2nd full", " --window-size 16 0 --window-attn-skip-freq 2"),
            ("pattern", " --window-size 16 0 --window-attn-skip-freq ([1]+[0])*2"),
        )  # fmt: skip
    }
    assert (
        attention["every 2nd full"]
        == attention["pattern"]
        == pytest.approx((attention["full"] + attention["window"]) / 2)
    )
    args = parse(flags + " --window-size 16 0 --window-attn-skip-freq ([1]+[0])*2 --mtp-num-layers 1")
    model = build(args)
    windows = [module.window_size for module in model.modules() if isinstance(module, SDPACoreAttention)]
    assert windows == [(16, 0), None, (16, 0), None, None]


def test_summary_and_startup_report():
    args = parse(DEEPSEEK_V3 + " --global-batch-size 1")
    printed = []
    count = report_model_size(args, print_fn=printed.append)
    assert printed == [f" > model size: {summary(count)}"]
    assert summary(count).startswith("total 682.6B params (MTP 11.6B), active 37.3B per token, ")
    assert [human_count(n) for n in (999, 1500, 2.5e6, 15.7e9)] == ["999", "1.5K", "2.5M", "15.7B"]


def test_vocab_is_padded_like_megatron_or_taken_from_training():
    args = parse(f"{BASE} --make-vocab-size-divisible-by 300")
    assert count_model(args).components["embedding"].total == 600 * 64
    args.padded_vocab_size = 1024  # set by training.setup from the tokenizer
    assert count_model(args).components["embedding"].total == 1024 * 64
