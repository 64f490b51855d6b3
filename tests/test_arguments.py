"""Launch checks run before any process group exists: one clear line naming the flags."""

import pytest
import torch

from megatron_r1.arguments import parse_args, transformer_config_from_args

TINY = ["--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "64", "--disable-bias-linear",
        "--num-attention-heads", "4", "--micro-batch-size", "2"]  # fmt: skip


def parse_error(argv, capsys, world_size=1, monkeypatch=None):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(SystemExit) as exit_info:
        parse_args("test", argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, world_size, expected",
    [
        (
            ["--num-attention-heads", "6", "--tensor-model-parallel-size", "4"],
            4,
            "--num-attention-heads (6) is not divisible by --tensor-model-parallel-size (4)",
        ),
        (
            ["--num-experts", "6", "--expert-model-parallel-size", "4"],
            4,
            "--num-experts (6) is not divisible by --expert-model-parallel-size (4)",
        ),
        (
            ["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
            2,
            "--num-layers (3) is not divisible by --pipeline-model-parallel-size (2); "
            "or split it unevenly with --decoder-first/last-pipeline-num-layers",
        ),
        (
            ["--num-layers", "61", "--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "3"],
            4,
            "--num-layers (61) minus --decoder-first-pipeline-num-layers (3) leaves 58 layers, which do not split "
            "evenly over the other 3 of --pipeline-model-parallel-size (4) stages",
        ),
        (
            ["--global-batch-size", "6"],
            2,
            "--global-batch-size (6) is not divisible by --micro-batch-size (2) x data-parallel size (2)",
        ),
        (
            ["--tensor-model-parallel-size", "3"],
            4,
            "world size 4 is not divisible by --tensor-model-parallel-size (3) x --pipeline-model-parallel-size (1)",
        ),
        (
            ["--num-experts", "4", "--tensor-model-parallel-size", "2"],
            2,
            "MoE with --tensor-model-parallel-size > 1 requires --sequence-parallel",
        ),
        (
            ["--multi-latent-attention", "--tensor-model-parallel-size", "2"],
            2,
            "--multi-latent-attention with --tensor-model-parallel-size > 1 requires --sequence-parallel",
        ),
        (
            ["--moe-layer-freq", "[0]+[1]*2", "--num-experts", "4"],
            1,
            "--moe-layer-freq pattern has 3 entries, --num-layers is 4",
        ),
        (
            [
                "--num-layers-per-virtual-pipeline-stage",
                "1",
                "--pipeline-model-parallel-size",
                "2",
                "--global-batch-size",
                "2",
            ],
            2,
            "interleaved pipelining needs the number of micro-batches (1 = --global-batch-size / (--micro-batch-size"
            " x data-parallel size)) divisible by --pipeline-model-parallel-size (2)",
        ),
        (
            ["--fp8-format", "e4m3", "--transformer-impl", "local"],
            1,
            "--fp8-format needs --transformer-impl transformer_engine (CUDA + TransformerEngine)",
        ),
        (
            ["--seq-length", "128", "--seq-length-curriculum", "48:0"],
            1,
            "--seq-length-curriculum: 48 does not divide --seq-length (128)",
        ),
        (["--attention-dropout", "1.0"], 1, "--attention-dropout (1.0) must be in [0, 1)"),
        (
            ["--window-attn-skip-freq", "2"],
            1,
            "--window-attn-skip-freq needs --window-size (the sliding window of the other layers)",
        ),
        (
            ["--window-size", "8,0", "--window-attn-skip-freq", "[1,0]"],
            1,
            "--window-attn-skip-freq pattern has 2 entries, --num-layers is 4",
        ),
        (
            ["--train-samples", "64", "--lr-warmup-iters", "2"],
            1,
            "--lr-warmup-iters does not go with --train-samples: use --lr-warmup-samples",
        ),
        (["--lr-decay-samples", "64"], 1, "--lr-decay-samples does not go with --train-iters: use --lr-decay-iters"),
        (
            ["--train-samples", "64", "--train-iters", "4"],
            1,
            "--train-iters and --train-samples are alternatives: give one",
        ),
        (
            ["--train-samples", "64", "--lr-warmup-samples", "64"],
            1,
            "the warm-up (64 samples) must be shorter than the decay (--lr-decay-samples 64, default --train-samples)",
        ),
        (["--recompute-modules", "mlp"], 1, "--recompute-modules needs --recompute-granularity selective"),
        (
            ["--overlap-param-gather", "--overlap-grad-reduce"],
            2,
            "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce",
        ),
    ],
)
def test_inconsistent_layouts_are_rejected_naming_the_flags(extra, world_size, expected, capsys, monkeypatch):
    line = parse_error(TINY + extra, capsys, world_size, monkeypatch)
    assert line.endswith(expected), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectation")
def test_cpu_defaults_to_the_local_implementation(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_args("test", TINY).transformer_impl == "local"
    line = parse_error(TINY + ["--transformer-impl", "transformer_engine"], capsys, 1, monkeypatch)
    assert line.endswith(
        "--transformer-impl transformer_engine needs CUDA and TransformerEngine (pip install -e .[gpu])"
    )


def test_missing_data_files_are_named(tmp_path, capsys, monkeypatch):
    model = tmp_path / "tok.model"
    model.write_bytes(b"")
    (tmp_path / "corpus_text_document.bin").write_bytes(b"")
    prefix = str(tmp_path / "corpus_text_document")
    argv = [a for a in TINY if a != "--mock-data"] + [
        "--tokenizer-model",
        str(model),
        "--data-path",
        "0.5",
        prefix,
        "0.5",
        str(tmp_path / "missing"),
    ]
    line = parse_error(argv, capsys, 1, monkeypatch)
    assert line.endswith(f"--data-path: {prefix}.idx does not exist"), line


def test_tokenizer_flags_name_what_a_run_without_a_model_needs(tmp_path, capsys, monkeypatch):
    """--mock-data without a model draws NullTokenizer ids (saved as such); data needs its tokenizer."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_args("test", TINY).tokenizer_type == "NullTokenizer"
    without_mock = [a for a in TINY if a != "--mock-data"]
    line = parse_error(without_mock + ["--data-path", str(tmp_path / "x")], capsys, 1, monkeypatch)
    assert line.endswith(
        "--data-path needs the tokenizer the data was made with: --tokenizer-type "
        "SentencePieceTokenizer needs --tokenizer-model"
    ), line
    (tmp_path / "tok.model").write_bytes(b"")
    line = parse_error(
        TINY + ["--tokenizer-type", "NullTokenizer", "--tokenizer-model", str(tmp_path / "tok.model")],
        capsys,
        1,
        monkeypatch,
    )
    assert line.endswith("--tokenizer-type NullTokenizer reads token ids, no --tokenizer-model"), line


def test_deepseek_flags_reach_the_transformer_config(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        "test",
        TINY
        + [
            "--swiglu",
            "--disable-bias-linear",
            "--multi-latent-attention",
            "--kv-lora-rank",
            "16",
            "--num-experts",
            "8",
            "--moe-layer-freq",
            "[0]+[1]*3",
            "--moe-router-score-function",
            "sigmoid",
            "--moe-router-enable-expert-bias",
            "--moe-router-num-groups",
            "4",
            "--moe-router-group-topk",
            "2",
            "--moe-router-topk-scaling-factor",
            "2.5",
            "--mtp-num-layers",
            "1",
            "--norm-epsilon",
            "1e-5",
            "--window-size",
            "32,0",
            "--recompute-granularity",
            "selective",
            "--recompute-modules",
            "mla_up_proj",
            "moe",
        ],
    )
    config = transformer_config_from_args(args)
    assert type(config).__name__ == "MLATransformerConfig"
    assert (config.num_moe_experts, config.moe_layer_freq, config.kv_lora_rank) == (8, [0, 1, 1, 1], 16)
    assert config.moe_router_score_function == "sigmoid" and config.moe_router_enable_expert_bias
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (4, 2)
    assert config.mtp_num_layers == 1 and config.layernorm_epsilon == 1e-5
    assert config.gated_linear_unit and not config.add_bias_linear and config.window_size == (32, 0)
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["mla_up_proj", "moe"]


def test_a_megatron_lm_deepseek_v3_recipe_parses(monkeypatch):
    """Flags as NVIDIA's DeepSeek-V3 recipes spell them (Megatron-MoE-ModelZoo, Megatron-LM examples)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(
        "test",
        TINY
        + [
            "--use-mcore-models",
            "--moe-layer-freq",
            "([0]*1+[1]*3)",
            "--num-experts",
            "4",
            "--moe-grouped-gemm",
            "--accumulate-allreduce-grads-in-fp32",
            "--attention-softmax-in-fp32",
            "--main-grads-dtype",
            "fp32",
            "--pipeline-model-parallel-size",
            "2",
            "--num-virtual-stages-per-pipeline-rank",
            "2",
            "--global-batch-size",
            "8",
            "--recompute-activations",
            "--window-size",
            "127",
            "0",
            "--attention-backend",
            "fused",
            "--use-rotary-position-embeddings",
            "--position-embedding-type",
            "none",
            "--moe-router-force-load-balancing",
            "--log-validation-ppl-to-tensorboard",
            "--no-rope-fusion",
            "--moe-token-dispatcher-type",
            "flex",
            "--moe-flex-dispatcher-backend",
            "hybridep",
            "--moe-hybridep-num-sms",
            "32",
        ],
    )
    assert parse_args("test", TINY + ["--no-position-embedding"]).position_embedding_type == "rope"
    config = transformer_config_from_args(args)
    assert config.moe_layer_freq == [0, 1, 1, 1] and config.recompute_granularity == "selective"
    assert (args.virtual_pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage) == (2, 1)
    assert config.window_size == (127, 0) and config.attention_backend.name == "fused"
    assert config.moe_router_force_load_balancing and args.position_embedding_type == "none"  # the last flag wins
    assert config.moe_grouped_gemm  # megatron_r1.experts without TransformerEngine, CUDA or not
    assert (config.moe_flex_dispatcher_backend, config.moe_hybridep_num_sms) == ("hybridep", 32)
    assert config.moe_token_dispatcher_type == ("flex" if torch.cuda.is_available() else "alltoall")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--fp16"], "--fp16: fp16 training (with loss scaling) is not supported: use --bf16"),
        (
            ["--cross-entropy-loss-fusion"],
            "--cross-entropy-loss-fusion (native) rounds the logits' gradient to bf16: use it with --bf16",
        ),
        (
            ["--wandb-project", "p", "--use-precision-aware-optimizer"],
            "--wandb-project: Weights & Biases is not built in: use --tensorboard-dir or --metrics-port; "
            "--use-precision-aware-optimizer: low-precision optimizer state is not supported (it is kept in fp32)",
        ),
        (["--moe-router-top-k", "2"], "--moe-router-top-k: unknown flag (did you mean --moe-router-topk?)"),
        (
            ["--context-parallel-size", "2"],
            "--context-parallel-size 2: only 1 is supported here; context parallelism "
            "is not supported (long sequences: --recompute-granularity, --sequence-parallel)",
        ),
        (["--rotary-percent", "0.5"], "--rotary-percent 0.5: only 1 is supported here; partial RoPE is not supported"),
        (
            ["--main-params-dtype", "fp32", "--exp-avg-dtype", "bf16"],
            "--exp-avg-dtype bf16: only fp32 is supported "
            "here; low-precision optimizer state is not supported (it is kept in fp32)",
        ),
        (["--window-size", "4096"], "--window-size 4096: give LEFT,RIGHT, two numbers of tokens (e.g. 4096,0)"),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--num-virtual-stages-per-pipeline-rank",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "1",
            ],
            "--num-virtual-stages-per-pipeline-rank and --num-layers-per-virtual-pipeline-stage are alternatives: give one",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "3"],
            "--num-virtual-stages-per-pipeline-rank (3) needs --pipeline-model-parallel-size > 1 and --num-layers (4) "
            "divisible by PP x it (6)",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|ttt|tL"],
            "--pipeline-model-parallel-layout Et|ttt|tL: pipeline_model_parallel_layout must be divisible by "
            "pipeline_model_parallel_size (len(layout)=3, pipeline_model_parallel_size=2) (--num-layers 4, "
            "--mtp-num-layers 0, --pipeline-model-parallel-size 2)",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|tL"],
            "Number of decoder layers 2must match num_layers 4 (--num-layers 4, --mtp-num-layers 0, "
            "--pipeline-model-parallel-size 2)",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--mtp-num-layers",
                "1",
                "--pipeline-model-parallel-layout",
                "Ettttm|L",
            ],
            "--pipeline-model-parallel-layout Ettttm|L: the MTP layers (m) must be on the last pipeline "
            "stage, with the loss (L)",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--decoder-first-pipeline-num-layers",
                "1",
                "--pipeline-model-parallel-layout",
                "Et|tttL",
            ],
            "--pipeline-model-parallel-layout places every layer: not "
            "with --decoder-first/last-pipeline-num-layers, --num-layers-per-virtual-pipeline-stage or "
            "--num-virtual-stages-per-pipeline-rank",
        ),
        (
            ["--no-position-embedding", "--position-embedding-type", "learned_absolute"],
            "--no-position-embedding goes with RoPE only; for no position information at all: --position-embedding-type "
            "none (not learned_absolute)",
        ),
        (
            ["--use-rope-scaling", "--position-embedding-type", "learned_absolute"],
            "--use-rope-scaling scales RoPE of GQA/MHA models (--position-embedding-type rope); MLA's: --rope-type yarn",
        ),
        (
            ["--pipeline-model-parallel-layout", "Ett|ttL"],
            "--pipeline-model-parallel-layout Ett|ttL: 2 stages need --pipeline-model-parallel-size > 1",
        ),
        (
            ["--dataloader-type", "cyclic"],
            "argument --dataloader-type: invalid choice: 'cyclic' (choose from 'single')",
        ),
    ],
)
def test_megatron_lm_flags_without_a_counterpart_are_refused_with_the_reason(extra, expected, capsys, monkeypatch):
    line = parse_error(TINY + extra, capsys, 2, monkeypatch)
    assert line.endswith(expected), line


def _validate_error(argv, capsys, **kwargs):
    from megatron_r1.arguments import build_parser, validate_args

    parser = build_parser("test")
    with pytest.raises(SystemExit):
        validate_args(parser.parse_args(argv), parser.error, **kwargs)
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("data", [[], ["--data-path", "train.jsonl"]])
def test_without_pretraining_data_its_checks_are_skipped(data, tmp_path, capsys, monkeypatch):
    """validate_args(..., pretraining_data=False), as fine-tuning calls it: neither --mock-data nor an
    indexed --data-path is needed (fine-tuning checks its own data, left as given)."""
    from megatron_r1.arguments import build_parser, validate_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "tok.model").write_bytes(b"")
    argv = [a for a in TINY if a != "--mock-data"] + ["--tokenizer-model", str(tmp_path / "tok.model"), *data]
    assert "--data-path" in _validate_error(argv, capsys)  # pre-training's: no data, or no indexed dataset
    args = build_parser("test").parse_args(argv + ["--tensor-model-parallel-size", "2"])
    validate_args(args, pytest.fail, pretraining_data=False)
    assert args.data_path == (data[1:] or None) and args.data_per_split is None
    assert (args.data_parallel_size, args.global_batch_size, args.num_microbatches) == (1, 2, 1)


def test_without_pretraining_data_the_other_checks_still_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    (tmp_path / "tok.model").write_bytes(b"")
    argv = [a for a in TINY if a != "--mock-data"] + ["--tokenizer-model", str(tmp_path / "tok.model")]
    line = _validate_error(
        argv + ["--num-attention-heads", "6", "--tensor-model-parallel-size", "4"], capsys, pretraining_data=False
    )
    assert line.endswith("--num-attention-heads (6) is not divisible by --tensor-model-parallel-size (4)"), line
    line = _validate_error(
        argv + ["--tokenizer-model", str(tmp_path / "missing.model")], capsys, pretraining_data=False
    )
    assert line.endswith("missing.model: no such file or directory"), line


def test_gpu_kernel_choices_fall_back_where_their_package_or_layout_is_missing(monkeypatch, capsys):
    """On a CUDA machine without TransformerEngine or DeepEP (as the H200 this project is measured
    on), Megatron-LM recipes' kernel choices fall back to the plain path, one line naming what each
    lacks; DeepEP's dispatcher also needs a second expert-parallel rank; where all is there, the
    choices stay."""
    import importlib.machinery
    import importlib.util

    find_spec, installed = importlib.util.find_spec, set()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def found(name, *rest):
        if name in ("transformer_engine", "deep_ep"):
            return importlib.machinery.ModuleSpec(name, None) if name in installed else None
        return find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", found)
    kernels = ["--num-experts", "4", "--moe-permute-fusion", "--moe-router-fusion", "--moe-token-dispatcher-type",
               "flex", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te", "--bf16",
               "--transformer-impl", "local"]  # fmt: skip

    def chosen(args):
        return (
            args.moe_permute_fusion,
            args.moe_router_fusion,
            args.moe_token_dispatcher_type,
            args.cross_entropy_fusion_impl,
        )

    assert chosen(parse_args("test", TINY + kernels)) == (False, False, "alltoall", "native")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "without TransformerEngine, the plain megatron-core path stands in for --moe-permute-fusion, "
        "--moe-router-fusion, --cross-entropy-fusion-impl te; without DeepEP, the plain megatron-core path stands "
        "in for --moe-token-dispatcher-type flex (same results)"
    )
    installed.update(("transformer_engine", "deep_ep"))
    assert chosen(parse_args("test", TINY + kernels)) == (True, True, "alltoall", "te")
    assert "without a second expert-parallel or expert-tensor-parallel rank" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args("test", TINY + kernels + ["--expert-model-parallel-size", "2"])
    assert chosen(args) == (True, True, "flex", "te")
