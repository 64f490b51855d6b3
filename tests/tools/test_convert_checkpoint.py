"""tools/convert_checkpoint.py: a checkpoint saved under TP=2/EP=2 (with the grouped-GEMM experts)
exports to the same Hugging Face weights as the TP=1 checkpoint it was resharded from; --verify
reports matching logits; bad input fails with a message and writes nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from conftest import preset_model_flags, run_command
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
MODEL = ["--mock-data", "--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
         "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu", "--disable-bias-linear",
         "--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
         "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
         "--moe-shared-expert-intermediate-size", "16", "--moe-layer-freq", "[0]+[1]", "--moe-router-score-function",
         "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.05", "--mtp-num-layers", "1",
         "--untie-embeddings-and-output-weights", "--seq-length", "16", "--micro-batch-size", "2"]  # fmt: skip

# pretrain_r1.py in two processes, TP=2 with sequence parallelism and EP=2.
PRETRAIN_UNDER_TP2_EP2 = ["torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "pretrain_r1.py"), *MODEL,
                          "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                          "--expert-tensor-parallel-size", "1", "--sequence-parallel"]  # fmt: skip


def hf_tensors(directory: Path) -> dict:
    tensors = {}
    for name in set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()):
        tensors.update(load_file(directory / name))
    return tensors


def test_tp2_ep2_checkpoint_exports_the_same_weights_as_tp1(tmp_path):
    run_command([sys.executable, str(REPO / "pretrain_r1.py"), *MODEL, "--train-iters", "2", "--save", "tp1"], tmp_path)
    # The same weights resharded: loaded and saved again by two processes under TP=2, EP=2, with the
    # grouped-GEMM experts (megatron_r1.experts), whose checkpoints are SequentialMLP's.
    run_command(
        [
            *PRETRAIN_UNDER_TP2_EP2,
            "--moe-grouped-gemm",
            "--load",
            "tp1",
            "--finetune",
            "--train-iters",
            "0",
            "--save",
            "tp2",
        ],
        tmp_path,
    )
    assert (
        json.loads((tmp_path / "tp2" / "iter_0000000" / "megatron_r1.json").read_text())["layout"][
            "tensor_model_parallel_size"
        ]
        == 2
    )
    outputs = {}
    for name in ("tp1", "tp2"):
        result = run_command(
            [
                sys.executable,
                str(TOOL),
                "--direction",
                "mcore2hf",
                "--load",
                name,
                "--save",
                f"hf_{name}",
                "--no-progress",
            ]
            + (["--verify"] if name == "tp2" else []),
            tmp_path,
        )
        outputs[name] = result.stdout
    first, second = hf_tensors(tmp_path / "hf_tp1"), hf_tensors(tmp_path / "hf_tp2")
    assert first.keys() == second.keys()
    assert [key for key in first if not torch.equal(first[key], second[key])] == []
    verify = json.loads(outputs["tp2"][outputs["tp2"].index("{") :])["verify"]
    assert verify["max_abs_logit_diff"] <= 1e-4 and verify["top1_agreement"] == 1.0, verify

    result = run_command(
        [
            sys.executable,
            str(TOOL),
            "--direction",
            "hf2mcore",
            "--load",
            "hf_tp1",
            "--save",
            "back",
            "--tensor-model-parallel-size",
            "2",
            "--make-vocab-size-divisible-by",
            "64",
            "--max-shard-size",
            "4KB",
            "--no-progress",
        ],
        tmp_path,
    )
    assert "--finetune" in result.stdout
    assert json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])["parts"] > 10
    # The converted checkpoint, written in parts of 4 KB (tensors split across them), loads for
    # fine-tuning under the layout it was padded for.
    run_command([*PRETRAIN_UNDER_TP2_EP2, "--load", "back", "--finetune", "--train-iters", "1"], tmp_path)


def test_bad_input_fails_with_a_message_and_writes_nothing(tmp_path):
    def fails(*argv):
        result = subprocess.run(
            [sys.executable, str(TOOL), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0
        return result.stderr

    assert "does not exist" in fails("--direction", "mcore2hf", "--load", "nowhere", "--save", "out")
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint directory" in fails("--direction", "mcore2hf", "--load", "empty", "--save", "out")
    assert "no config.json" in fails("--direction", "hf2mcore", "--load", "empty", "--save", "out")
    assert "--verify with --fp8" in fails(
        "--direction", "mcore2hf", "--load", "empty", "--save", "out", "--fp8", "--verify"
    )
    assert "--fp8 is for mcore2hf" in fails("--direction", "hf2mcore", "--load", "empty", "--save", "out", "--fp8")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.tmp")


# The published shapes scaled down; every other model flag as the preset gives it.
PRESET_SIZES = {"--num-layers": "2", "--hidden-size": "32", "--ffn-hidden-size": "64", "--num-attention-heads": "4",
                "--seq-length": "16", "--max-position-embeddings": "16", "--q-lora-rank": "16", "--kv-lora-rank": "16",
                "--qk-head-dim": "8", "--qk-pos-emb-head-dim": "8", "--v-head-dim": "8",
                "--original-max-position-embeddings": "8", "--moe-layer-freq": "[0]*1+[1]*1",
                "--num-experts": "16", "--moe-ffn-hidden-size": "16"}  # fmt: skip


def scaled_preset_model_flags(script: str) -> list[str]:
    """The model flags of examples/`script` with PRESET_SIZES in place of the published sizes; shared
    experts keep their count."""
    flags = preset_model_flags(script)
    values = {flag: i + 1 for i, flag in enumerate(flags) if flag in PRESET_SIZES}
    shared = flags.index("--moe-shared-expert-intermediate-size") + 1
    flags[shared] = str(int(flags[shared]) // int(flags[flags.index("--moe-ffn-hidden-size") + 1]) * 16)
    for flag, position in values.items():
        flags[position] = PRESET_SIZES[flag]
    return flags


def test_deepseek_presets_export_as_deepseek_v3_and_v2(tmp_path):
    """The V3 preset's model exports to DeepseekV3ForCausalLM with transformers' logits, V2-Lite's (softmax
    routing) to DeepseekV2ForCausalLM, which transformers 4.x computes without yarn's mscale_all_dim
    softmax factor: --verify refuses it there, naming why (test_transformers_versions verifies it under 5.x)."""
    training = ["--mock-data", "--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2",
                "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0"]  # fmt: skip
    for script in ("pretrain_deepseek_v3.sh", "pretrain_deepseek_v2_lite.sh"):
        flags = scaled_preset_model_flags(script)
        assert "--qk-layernorm" in flags, script
        run_command([sys.executable, str(REPO / "pretrain_r1.py"), *flags, *training, "--save", script], tmp_path)
        export = subprocess.run(
            [
                sys.executable,
                str(TOOL),
                "--direction",
                "mcore2hf",
                "--load",
                script,
                "--save",
                f"hf_{script}",
                "--verify",
                "--no-progress",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        architecture = json.loads((tmp_path / f"hf_{script}" / "config.json").read_text())["architectures"]
        if script == "pretrain_deepseek_v3.sh" or int(transformers.__version__.split(".")[0]) >= 5:
            assert export.returncode == 0, export.stderr[-3000:]
            verify = json.loads(export.stdout[export.stdout.index("{") :])["verify"]
            assert verify["max_abs_logit_diff"] <= 1e-4 and verify["top1_agreement"] == 1.0, verify
        else:
            assert export.returncode != 0 and "verify under transformers >= 5" in export.stderr, export.stderr[-3000:]
        assert architecture == ["DeepseekV3ForCausalLM" if "v3" in script else "DeepseekV2ForCausalLM"]
