"""mcore2hf under transformers 4.57 and 5.x, for each MoE architecture it writes (DeepSeek-V3, Qwen3-MoE,
Mixtral: 5.x fuses their experts as it loads them): the exported directory is the same file for file
whichever version writes it, --verify passes under both, and the other major version than the installed
one loads the directory with the same logits, tokens and greedy continuation.

The other version runs in subprocesses, from $MEGATRON_R1_OTHER_TRANSFORMERS (a directory put first on
PYTHONPATH, e.g. ``pip install --target DIR transformers==5.*``) or else from pytest's cache, where pip
installs it with what it needs beyond this environment (tens of MB, once; the test is skipped, with
pip's message, when pip cannot install it)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command

from megatron_r1.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"
CORPUS = REPO / "megatron_r1" / "assets" / "tiny_corpus.jsonl"
OTHER_TRANSFORMERS = "MEGATRON_R1_OTHER_TRANSFORMERS"
TEXTS = ["The system administrator fixed", "   indented\n\tcode  with  spaces", "ünïcödé ✓ 日本語",
         "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n<think>easy</think>4<|end|>"]  # fmt: skip
# A DeepSeek-V3-style model: MLA with q compression, a dense first layer, MoE with shared experts,
# sigmoid group-limited routing with a trained expert bias, yarn RoPE, an MTP layer, untied output.
DEEPSEEK = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu",
            "--disable-bias-linear", "--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "16",
            "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8",
            "--rope-type", "yarn", "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "8",
            "--mscale", "1.0", "--mscale-all-dim", "1.0", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
            "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2",
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate", "0.05", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
            "--moe-router-topk-scaling-factor", "2.5", "--mtp-num-layers", "1", "--untie-embeddings-and-output-weights",
            "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip
# DeepSeek-V2-Lite's kind: softmax routing, no q compression, yarn with mscale_all_dim (a softmax factor).
DEEPSEEK_V2 = ["--mock-data", "--vocab-size", "100", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
               "4", "--swiglu", "--disable-bias-linear", "--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank",
               "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--rope-type", "yarn",
               "--rotary-scaling-factor", "4", "--original-max-position-embeddings", "8", "--mscale", "0.707",
               "--mscale-all-dim", "0.707", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
               "--moe-shared-expert-intermediate-size", "32", "--moe-layer-freq", "[0]+[1]", "--moe-router-topk", "2",
               "--moe-router-score-function", "softmax", "--moe-router-pre-softmax", "--seq-length", "32",
               "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip
GQA = ["--mock-data", "--hidden-size", "32", "--num-attention-heads", "4", "--group-query-attention",
       "--num-query-groups", "2", "--swiglu", "--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size",
       "16", "--moe-router-topk", "2", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip
MODELS = {
    "DeepseekV3ForCausalLM": DEEPSEEK,
    # q/k norms, a dense first layer, heads of 16 channels (not hidden / heads), untied output.
    "Qwen3MoeForCausalLM": [*GQA, "--num-layers", "3", "--qk-layernorm", "--kv-channels", "16", "--moe-layer-freq",
                            "[0]+[1]*2", "--untie-embeddings-and-output-weights"],
    "MixtralForCausalLM": [*GQA, "--num-layers", "2", "--rotary-base", "1000000"],
}  # fmt: skip
# A tensor each architecture publishes under its own name (the experts 5.x fuses when it loads them).
PUBLISHED = {"DeepseekV3ForCausalLM": "model.layers.1.mlp.experts.3.up_proj.weight",
             "Qwen3MoeForCausalLM": "model.layers.2.mlp.experts.3.up_proj.weight",
             "MixtralForCausalLM": "model.layers.1.block_sparse_moe.experts.3.w3.weight"}  # fmt: skip

# Run under either version: logits of fixed tokens, the texts' ids and a greedy continuation.
PROBE = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
prompt = torch.tensor([tokenizer.encode(json.loads(sys.argv[3])[0])])
with torch.no_grad():
    logits = model(tokens).logits
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
torch.save({"version": transformers.__version__, "logits": logits, "greedy": greedy.tolist(),
            "ids": [tokenizer.encode(text, add_special_tokens=False) for text in json.loads(sys.argv[3])],
            "decoded": [tokenizer.decode(tokenizer.encode(text)) for text in json.loads(sys.argv[3])]}, sys.argv[2])
"""


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _environment(pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(REPO)])
    return env


def _version_at(directory: Path) -> str | None:
    """transformers' version where `directory` comes first on the path, None when it does not import."""
    code = "import transformers; print(transformers.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=_environment(directory), capture_output=True, text=True, timeout=300
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _pip(requirement: str, *args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--timeout", "30"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip(f"pip could not install {requirement} (no network or package index?): {result.stderr[-800:]}")


def _pip_install_other(requirement: str, target: Path) -> None:
    """`requirement` and what it needs beyond this environment (resolved against it: the packages pip
    would add or change), into `target`; pytest.skip with pip's message when pip cannot."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _pip(requirement, "--dry-run", "--report", str(staging / "report.json"), requirement)
    report = json.loads((staging / "report.json").read_text())
    _pip(requirement, "--no-deps", "--target", str(staging),
         *(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]))  # fmt: skip
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


@pytest.fixture(scope="module")
def other_transformers(request, tmp_path_factory) -> Path:
    """A directory whose transformers, first on PYTHONPATH, is the other major version (4.57 <-> 5.x)."""
    import transformers

    installed = _major(transformers.__version__)
    requirement = "transformers>=5,<6" if installed == 4 else "transformers>=4.57,<5"
    given = os.environ.get(OTHER_TRANSFORMERS)
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: this run's tmp then
    name = f"transformers-{9 - installed}"
    target = Path(given) if given else cache.mkdir(name) if cache else tmp_path_factory.mktemp(name)
    version = _version_at(target)
    if given and (version is None or _major(version) == installed):
        pytest.fail(f"${OTHER_TRANSFORMERS}={given} has transformers {version}, not {requirement}")
    if version is None or _major(version) == installed:
        _pip_install_other(requirement, target)
        version = _version_at(target)
    assert version is not None and _major(version) != installed, (target, version)
    return target


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    lines = [json.loads(record)["text"] for record in CORPUS.read_text(encoding="utf-8").splitlines()[:300]]
    prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
    return train_sentencepiece(lines, str(prefix), vocab_size=1000, character_coverage=0.98)


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tokenizer, other_transformers, tmp_path_factory):
    """(working directory, architecture): a trained checkpoint of MODELS[architecture] with the
    SentencePiece tokenizer in ckpt/, exported with --verify under the installed transformers into
    hf_installed/ and under the other version into hf_other/."""
    workdir = tmp_path_factory.mktemp(request.param)
    command = [sys.executable, str(REPO / "pretrain_r1.py"), *MODELS[request.param]]
    run_command([*command, "--tokenizer-model", tokenizer.model_file, "--train-iters", "3", "--save", "ckpt"], workdir)
    installed, other = _export(workdir, "hf_installed"), _export(workdir, "hf_other", other_transformers)
    assert installed["shards"] == other["shards"] > 1
    return workdir, request.param


def _export(workdir: Path, name: str, pythonpath: Path | None = None) -> dict:
    """mcore2hf --verify into workdir/name under the transformers first on `pythonpath`: its summary."""
    command = [sys.executable, str(TOOL), "--direction", "mcore2hf", "--load", "ckpt", "--save", name,
               "--max-shard-size", "200KB", "--verify", "--no-progress"]  # fmt: skip
    result = subprocess.run(
        command, cwd=workdir, env=_environment(pythonpath), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["verify"]["max_abs_logit_diff"] <= 1e-4 and summary["verify"]["top1_agreement"] == 1.0, summary
    return summary


def _probe(directory: Path, out: Path, pythonpath: Path | None = None) -> dict:
    command = [sys.executable, "-c", PROBE, str(directory), str(out), json.dumps(TEXTS)]
    result = subprocess.run(command, env=_environment(pythonpath), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return torch.load(out)


def test_both_versions_export_the_same_directory_and_verify(exported):
    workdir, architecture = exported
    files = sorted(os.listdir(workdir / "hf_installed"))
    assert files == sorted(os.listdir(workdir / "hf_other"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in files:
        assert (workdir / "hf_installed" / name).read_bytes() == (workdir / "hf_other" / name).read_bytes(), name
    assert json.loads((workdir / "hf_installed" / "config.json").read_text())["architectures"] == [architecture]
    assert (
        PUBLISHED[architecture]
        in json.loads((workdir / "hf_installed" / "model.safetensors.index.json").read_text())["weight_map"]
    )


def test_the_other_version_loads_the_export_with_the_same_logits_and_tokens(exported, tokenizer, other_transformers):
    workdir, _ = exported
    installed = _probe(workdir / "hf_installed", workdir / "installed.pt")
    other = _probe(workdir / "hf_installed", workdir / "other.pt", other_transformers)
    assert _major(installed["version"]) != _major(other["version"])
    assert (installed["logits"] - other["logits"]).abs().max() <= 1e-5
    assert installed["greedy"] == other["greedy"] and len(other["greedy"]) > 0
    assert installed["ids"] == other["ids"] == [_ids_around_symbols(tokenizer, text) for text in TEXTS]
    assert installed["decoded"] == other["decoded"]
    assert [text for text, symbols in zip(installed["decoded"], map(_has_symbol, TEXTS)) if not symbols] == [
        text for text in TEXTS if not _has_symbol(text)
    ]


def _has_symbol(text: str) -> bool:
    return "<" in text


def _ids_around_symbols(tokenizer, text: str) -> list[int]:
    """The symbols' ids, and each text between them as SentencePiece encodes it alone: how the
    fine-tuning chat template renders a conversation, and the exported tokenizer encodes its string."""
    specials = tokenizer.special_tokens
    pattern = "(" + "|".join(re.escape(name) for name in sorted(specials, key=len, reverse=True)) + ")"
    return [i for part in re.split(pattern, text) if part
            for i in ([specials[part]] if part in specials else tokenizer.tokenize(part))]  # fmt: skip


def test_deepseek_v2_yarn_verifies_under_5_and_is_refused_naming_why_under_4(other_transformers, tmp_path):
    """transformers 4.x's DeepseekV2 leaves yarn's mscale_all_dim factor out of the softmax scale (5.x
    applies it, as DeepSeek's code and megatron-core do): --verify passes under 5.x and, under 4.x,
    stops naming the reason after writing the directory."""
    run_command([sys.executable, str(REPO / "pretrain_r1.py"), *DEEPSEEK_V2, "--train-iters", "2", "--save", "ckpt"],
                tmp_path)  # fmt: skip
    for name, pythonpath in (("hf_installed", None), ("hf_other", other_transformers)):
        command = [sys.executable, str(TOOL), "--direction", "mcore2hf", "--load", "ckpt", "--save", name, "--verify",
                   "--no-progress"]  # fmt: skip
        result = subprocess.run(
            command, cwd=tmp_path, env=_environment(pythonpath), capture_output=True, text=True, timeout=600
        )
        version = _version_at(pythonpath) if pythonpath else __import__("transformers").__version__
        if _major(version) >= 5:
            assert result.returncode == 0, result.stderr[-3000:]
            verify = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])["verify"]
            assert verify["max_abs_logit_diff"] <= 1e-4 and verify["top1_agreement"] == 1.0, verify
        else:
            assert result.returncode != 0 and "verify under transformers >= 5" in result.stderr, result.stderr[-3000:]
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert (
            config["architectures"] == ["DeepseekV2ForCausalLM"] and config["rope_scaling"]["mscale_all_dim"] == 0.707
        )
