"""tools/generate.py: greedy output with the KV cache equals transformers' generate on the exported
model (and our own full recomputation); sampling is reproducible and top-k 1 is greedy; the
exported tokenizer loads with AutoTokenizer and encodes as ours does."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command

from megatron_r1.distributed import destroy_distributed, initialize_distributed
from megatron_r1.generation import generate, load_model
from megatron_r1.hf.export import export_to_hf
from megatron_r1.tokenizer import train_sentencepiece

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "megatron_r1" / "assets" / "tiny_corpus.jsonl"
PROMPT = "The system administrator fixed"
MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu",
         "--disable-bias-linear", "--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank", "16", "--qk-head-dim", "8",
         "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--num-experts", "4", "--moe-ffn-hidden-size", "16",
         "--moe-shared-expert-intermediate-size", "16", "--moe-router-score-function", "sigmoid",
         "--moe-router-enable-expert-bias", "--seq-length", "64", "--micro-batch-size", "2", "--lr", "1e-2"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generate")
    lines = [json.loads(record)["text"] for record in CORPUS.read_text(encoding="utf-8").splitlines()[:300]]
    tokenizer = train_sentencepiece(lines, str(workdir / "spm"), vocab_size=1000, character_coverage=0.98)
    run_command(
        [
            sys.executable,
            str(REPO / "pretrain_r1.py"),
            *MODEL,
            "--tokenizer-model",
            tokenizer.model_file,
            "--train-iters",
            "3",
            "--save",
            "ckpt",
        ],
        workdir,
        timeout=300,
    )
    initialize_distributed()
    export_to_hf(str(workdir / "ckpt" / "iter_0000003"), str(workdir / "hf"), progress=False)
    yield workdir, tokenizer
    destroy_distributed()


def test_greedy_generation_equals_transformers_generate(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, tokenizer = trained
    output = run_command(
        [
            sys.executable,
            str(REPO / "tools" / "generate.py"),
            "--load",
            "ckpt",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "12",
        ],
        workdir,
    ).stdout
    ours = [int(t) for t in re.search(r"new token ids: ([\d ]*)", output).group(1).split()]
    hf_tokenizer = AutoTokenizer.from_pretrained(workdir / "hf")
    prompt = hf_tokenizer.encode(PROMPT, add_special_tokens=False)
    assert prompt == tokenizer.tokenize(PROMPT)
    model = AutoModelForCausalLM.from_pretrained(workdir / "hf", torch_dtype=torch.float32)
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    assert ours == theirs and len(ours) > 0
    assert hf_tokenizer.decode(ours) == tokenizer.detokenize(ours)
    # transformers' generate stops where ours does: end of document, and end of a chat turn.
    stops = json.loads((workdir / "hf" / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [tokenizer.eod, tokenizer.token_to_id("<|end|>")]


def test_kv_cache_sampling_filters_and_seeds(trained):
    workdir, tokenizer = trained
    args, model = load_model(str(workdir / "ckpt" / "iter_0000003"))
    prompt = tokenizer.tokenize(PROMPT)

    def run(**kwargs):
        return generate(model, prompt, 10, args.vocab_size, **kwargs)

    greedy = run()
    assert run(use_kv_cache=False) == greedy
    assert run(temperature=1.0, top_k=1, seed=3) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus keeps only the most likely token
    sampled = run(temperature=1.5, seed=5)
    assert run(temperature=1.5, seed=5) == sampled
    assert run(temperature=1.5, seed=5, use_kv_cache=False) == sampled
    assert all(0 <= token < args.vocab_size for token in sampled)
    stop_at = greedy[2]
    assert run(stop_ids=[stop_at]) == greedy[: greedy.index(stop_at) + 1]


def test_chat_renders_the_fine_tuning_template_and_stops_at_the_end_of_the_turn(trained):
    from megatron_r1.data.sft import ChatTemplate

    workdir, tokenizer = trained
    output = run_command(
        [
            sys.executable,
            str(REPO / "tools" / "generate.py"),
            "--load",
            "ckpt",
            "--chat",
            "--prompt",
            "What is 3 + 4?",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "8",
        ],
        workdir,
    ).stdout
    template = ChatTemplate(tokenizer)
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    prompt = template.render(turns, add_generation_prompt=True)[0]
    assert re.search(r"prompt token ids: ([\d ]*)", output).group(1).split() == [str(t) for t in prompt]
    args, model = load_model(str(workdir / "ckpt" / "iter_0000003"))
    expected = generate(model, prompt, 8, args.vocab_size, stop_ids=template.end_ids)
    assert re.search(r"new token ids: ([\d ]*)", output).group(1).split() == [str(t) for t in expected]


def test_export_converts_every_sentencepiece_type(trained, tmp_path):
    """Llama2Tokenizer/GPTSentencePieceTokenizer models are SentencePiece models: the export converts
    them to tokenizer.json like SentencePieceTokenizer's (rather than look for one beside them)."""
    from transformers import AutoTokenizer

    workdir, tokenizer = trained
    export_to_hf(
        str(workdir / "ckpt" / "iter_0000003"), str(tmp_path / "hf"), tokenizer_type="Llama2Tokenizer", progress=False
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(
        PROMPT, add_special_tokens=False
    ) == tokenizer.tokenize(PROMPT)
