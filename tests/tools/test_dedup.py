import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "dedup.py")

_spec = importlib.util.spec_from_file_location("dedup_tool", TOOL)
dedup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dedup)


def documents(seed=0, count=40):
    """Unrelated English and Chinese documents (random words / characters)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(2000)]
    texts = []
    for index in range(count):
        if index % 2:
            texts.append("".join(chr(0x4E00 + int(i)) for i in rng.integers(0, 2000, size=300)) + "。")
        else:
            texts.append(" ".join(words[int(i)] for i in rng.integers(0, 2000, size=200)) + ".")
    return texts


def near_copy(text, changes, seed):
    """Replace ``changes`` units (words, or characters for Chinese) of the text."""
    rng = np.random.default_rng(seed)
    chinese = " " not in text
    units = list(text) if chinese else text.split(" ")
    for position in rng.choice(len(units) - 1, size=changes, replace=False):
        units[position] = "丁" if chinese else "zzzz"
    return ("" if chinese else " ").join(units)


def write_jsonl(path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((json.dumps(line, ensure_ascii=False) + "\n").encode() if isinstance(line, dict) else line)


@pytest.fixture
def corpus(tmp_path):
    texts = documents()
    first = [{"id": f"a{i}", "text": text} for i, text in enumerate(texts[:20])]
    first.insert(5, b"{not json\n")
    second = [
        {"id": "b0", "text": texts[0].upper()},  # exact duplicate of a0 (case only)
        {"id": "b1", "text": near_copy(texts[1], 2, 1)},  # near duplicate of a1 (Chinese, 2 of 301 characters)
        {"id": "b2", "text": near_copy(texts[2], 2, 2)},  # near duplicate of a2 (English, 2 of 200 words)
        {"id": "b3", "text": near_copy(texts[3], 120, 3)},  # heavily edited: not a duplicate
        b'{"id": "b4", "text": ""}\n',
        b"\xff\xfe\n",
        *({"id": f"b{i + 20}", "text": text} for i, text in enumerate(texts[20:])),
        {"id": "b99", "text": near_copy(texts[1], 3, 4)},  # also near a1 (and b1): one cluster of three
    ]  # fmt: skip
    paths = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(paths[0], first)
    write_jsonl(paths[1], second)
    return paths


def run_tool(args, tmp_path):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_cli_removes_exact_and_near_duplicates_across_files_with_two_workers(corpus, tmp_path):
    first, second = corpus
    output, clusters = tmp_path / "out" / "kept.jsonl", tmp_path / "out" / "clusters.jsonl"
    result = run_tool(
        ["--input", str(first), str(second), "--output", str(output), "--clusters", str(clusters), "--workers", "2"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line)["id"] for line in output.read_text(encoding="utf-8").splitlines()]
    removed = {"b0", "b1", "b2", "b99"}
    expected = [f"a{i}" for i in range(20)] + ["b3"] + [f"b{i}" for i in range(20, 40)]
    assert kept == expected and not removed & set(kept)
    # Kept lines are copied byte for byte.
    originals = {
        json.loads(line)["id"]: line
        for line in (first.read_bytes() + second.read_bytes()).splitlines(keepends=True)
        if line.startswith(b'{"id"')
    }
    assert output.read_bytes() == b"".join(originals[doc_id] for doc_id in expected)

    records = [json.loads(line) for line in clusters.read_text(encoding="utf-8").splitlines()]
    by_representative = {record["representative"]: record for record in records}
    assert set(by_representative) == {f"{first}:1", f"{first}:2", f"{first}:3"}
    assert by_representative[f"{first}:1"]["members"] == [f"{first}:1", f"{second}:1"]
    assert by_representative[f"{first}:1"]["edges"][0]["match"] == "exact_text"
    three = by_representative[f"{first}:2"]
    assert three["size"] == 3 and set(three["members"]) == {f"{first}:2", f"{second}:2", f"{second}:27"}
    assert all(
        edge["match"] in ("minhash_estimate", "jaccard") and edge["similarity"] >= 0.85 for edge in three["edges"]
    )

    summary = result.stdout
    for line in ("documents: 45, kept: 41, removed: 4 (exact: 1, near: 3)", "skipped lines: 3", f"invalid_json (not a JSON object): 1  e.g. {first}:6",
                 f"non_utf8 (not valid UTF-8): 1  e.g. {second}:6", f"empty_document (empty or whitespace-only text): 1  e.g. {second}:5", "clusters: 3", "docs/s", "peak RSS"):  # fmt: skip
        assert line in summary, line
    assert not [
        name for name in os.listdir(output.parent) if name.startswith(".")
    ]  # no temporary or signature files left


def test_threshold_word_shingles_and_simhash_options(corpus, tmp_path):
    first, second = corpus
    output = tmp_path / "strict.jsonl"
    # At threshold 0.99 only the exact duplicate goes (the near copies have Jaccard ~0.9-0.95).
    result = run_tool(
        ["--input", str(first), str(second), "--output", str(output), "--threshold", "0.99", "--workers", "1"], tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "removed: 1 (exact: 1, near: 0)" in result.stdout
    assert (tmp_path / "strict.clusters.jsonl").exists()  # default clusters path
    result = run_tool(
        [
            "--input",
            str(first),
            str(second),
            "--output",
            str(output),
            "--shingle",
            "word",
            "--ngram",
            "3",
            "--num-perm",
            "64",
            "--workers",
            "1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "removed: 2 (exact: 1, near: 1)" in result.stdout  # a Chinese text is one "word": only the English near copy
    result = run_tool(
        [
            "--input",
            str(first),
            str(second),
            "--output",
            str(output),
            "--method",
            "simhash",
            "--max-distance",
            "6",
            "--workers",
            "1",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "method simhash" in result.stdout and "exact: 1" in result.stdout


def test_failed_run_leaves_outputs_untouched(corpus, tmp_path, monkeypatch):
    first, second = corpus
    output = tmp_path / "kept.jsonl"
    output.write_text("previous\n")

    def failing_copy(*args):
        raise OSError("disk full")

    monkeypatch.setattr(dedup, "_copy_lines", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        dedup.main(["--input", str(first), str(second), "--output", str(output), "--workers", "1"])
    assert output.read_text() == "previous\n"
    assert (
        sorted(name for name in os.listdir(tmp_path) if name.startswith(".")) == []
    )  # temporary output and signatures removed


def test_bad_flags_and_compressed_input_are_errors(tmp_path, capsys):
    source = tmp_path / "in.jsonl.gz"
    with gzip.open(source, "wt") as handle:
        handle.write('{"text": "x"}\n')
    plain = tmp_path / "in.jsonl"
    plain.write_text('{"text": "x"}\n')
    for argv, message in [
        (["--input", str(source), "--output", str(tmp_path / "o")], "compressed input is not supported"),
        (["--input", str(plain), "--output", str(tmp_path / "o"), "--threshold", "1.5"], "--threshold"),
        (
            ["--input", str(plain), "--output", str(tmp_path / "o"), "--bands", "20", "--rows", "8"],
            "exceeds --num-perm",
        ),
        (["--input", str(plain), "--output", str(tmp_path / "o"), "--bands", "20"], "give both --bands and --rows"),
        (["--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path / "o")], "no file matches"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            dedup.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    result = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--num-perm" in result.stdout and "--method" in result.stdout
