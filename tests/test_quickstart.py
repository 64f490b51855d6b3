"""examples/quickstart.sh end to end, with the fewest iterations its stages allow: every artefact is
made, the second pre-training run resumes from the first one's checkpoint, the Hugging Face export
computes what our model computes, and both generators print the same continuation."""

import os
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    run_and_check_quickstart(tmp_path)


def run_and_check_quickstart(tmp_path) -> Path:
    """Runs examples/quickstart.sh (on this machine's device: tests/gpu runs it on a GPU too) and
    checks every stage's result; returns its output directory."""
    out = tmp_path / "quickstart"
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATA_PATH", "TOKENIZER_MODEL", "MASTER_ADDR", "EXTRA_ARGS", "DRY_RUN")
    }
    environment.update(
        OUT=str(out), PRETRAIN_ITERS="2", SFT_ITERS="2", GRPO_ITERS="2", NEW_TOKENS="4", OMP_NUM_THREADS="1"
    )
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "examples" / "quickstart.sh")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-6000:]

    # Every stage ran, in order.
    stages = re.findall(r"^=== (\d+)/12 ", log, re.M)
    assert stages == [str(i) for i in range(1, 13)], stages

    # Pre-training stopped at iteration 1 and the second run went on from its checkpoint to 2.
    first_run, resumed = log.split("=== 6/12 resume", 1)
    assert re.search(r"^ iteration +1/ +2 \|", first_run, re.M) and not re.search(
        r"^ iteration +2/ +2 \|", first_run, re.M
    )
    assert "resumed from iteration 1 (16 samples consumed)" in resumed
    resumed_pretraining = resumed.split("=== 7/12", 1)[0]
    assert re.findall(r"^ iteration +(\d+)/ +2 \|", resumed_pretraining, re.M) == ["2"]

    # LoRA fine-tuning trained adapters on the pre-trained weights, and the merge wrote a full checkpoint.
    sft = log.split("=== 7/12", 1)[1].split("=== 9/12", 1)[0]
    assert f"starting weights: {out}/checkpoints/iter_0000002" in sft
    assert re.search(r"LoRA: \d+ trainable parameters", sft)
    assert re.findall(r"^ iteration +(\d+)/ +2 \|", sft, re.M) == ["1", "2"]
    assert re.search(
        r"^merged \d+ adapted linears .* into .*: " + re.escape(f"{out}/sft_merged/iter_0000002"), sft, re.M
    )

    # GRPO from the merged SFT checkpoint, which is also the KL term's reference policy.
    grpo = log.split("=== 9/12", 1)[1].split("=== 10/12", 1)[0]
    assert f"starting weights: {out}/sft_merged/iter_0000002" in grpo and f"reference policy: {out}/sft_merged" in grpo
    assert re.findall(r"^ iteration +(\d+)/ +2 \|.* reward mean: ", grpo, re.M) == ["1", "2"]

    # The export's check: the same top-1 token as our model everywhere.
    assert re.search(r"^verify passed: top-1 agreement 1\.000, max \|logit diff\| ", log, re.M)

    # transformers on the export and tools/generate.py on our checkpoint continue the prompt alike.
    hf_ids = re.search(r"^transformers new token ids: ([\d ]+)$", log, re.M)
    our_ids = re.search(r"^new token ids: ([\d ]+)$", log, re.M)
    assert hf_ids and our_ids, log[-3000:]
    assert hf_ids.group(1).split() == our_ids.group(1).split()
    our_prompt = re.search(r"^prompt token ids: ([\d ]+)$", log, re.M)  # --chat: the template's rendering
    assert our_prompt and our_prompt.group(1).split() == (out / "prompt_ids.txt").read_text().split()
    assert re.search(r"^transformers: '.+'$", log, re.M)
    assert re.search(r"^generated \d+ tokens after a \d+-token prompt", log, re.M)

    artefacts = ["clean.jsonl", "rejects.jsonl", "dedup.jsonl", "clusters.jsonl", "tokenizer.model",
                 "corpus_text_document.bin", "corpus_text_document.idx", "checkpoints/iter_0000002",
                 "sft_lora/lora.json", "sft_merged/iter_0000002", "hf/config.json", "hf/tokenizer.json",
                 "hf/model.safetensors.index.json", "hf_export.log", "prompt_ids.txt", "grpo/iter_0000002"]  # fmt: skip
    for artefact in artefacts:
        assert (out / artefact).exists(), artefact
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (out / "sft_lora" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "hf").glob("model-*.safetensors"))
    # The closing list names where everything is.
    listing = log.split("=== artefacts", 1)[1]
    for name in ("checkpoints", "sft_lora", "sft_merged", "grpo", "hf", "tokenizer.model", "tensorboard"):
        assert f"{out}/{name}" in listing, name
    return out
