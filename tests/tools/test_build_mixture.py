import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "build_mixture.py")

_spec = importlib.util.spec_from_file_location("build_mixture_tool", TOOL)
build_mixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_mixture)


def write_source(path, language, count, length, bad=()):
    """``count`` documents of exactly ``length`` characters (so the 'chars' proxy is exact)."""
    with open(path, "wb") as handle:
        for index in range(count):
            unit = "中" if language == "zh" else "e" if language == "en" else "ж"
            handle.write(
                (
                    json.dumps(
                        {"id": f"{path.stem}-{index}", "lang": language, "text": unit * length}, ensure_ascii=False
                    )
                    + "\n"
                ).encode()
            )
        handle.writelines(bad)


@pytest.fixture
def sources(tmp_path):
    write_source(tmp_path / "zh_1.jsonl", "zh", 150, 20, bad=[b"{oops\n", b'{"text": "  "}\n'])
    write_source(tmp_path / "zh_2.jsonl", "zh", 150, 20)
    write_source(tmp_path / "en.jsonl", "en", 200, 25, bad=[b"\xc3\x28\n"])
    write_source(tmp_path / "other.jsonl", "other", 100, 10)
    return tmp_path


def mix_args(directory, *extra):
    return [
        "--source",
        f"zh={directory}/zh_*.jsonl",
        "--source",
        f"en={directory}/en.jsonl",
        "--source",
        f"other={directory}/other.jsonl",
        "--weight",
        "zh=45",
        "--weight",
        "en=35",
        "--weight",
        "other=20",
        "--token-proxy",
        "chars",
        *extra,
    ]


def test_cli_mixes_to_target_token_weights_and_writes_the_data_path(sources, tmp_path):
    output, data_path = tmp_path / "out" / "mixed.jsonl", tmp_path / "out" / "data_path.txt"
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            *mix_args(
                sources,
                "--output",
                str(output),
                "--data-path-out",
                str(data_path),
                "--prefix-dir",
                "/data/tok",
                "--prefix",
                "other=/data/custom_other",
                "--workers",
                "2",
            ),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # Available: zh 6000, en 5000, other 1000 tokens; "other" limits the total to 1000 / 0.2 = 5000.
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    tokens = {
        language: sum(len(r["text"]) for r in records if r["lang"] == language) for language in ("zh", "en", "other")
    }
    assert tokens == {"zh": 2240, "en": 1750, "other": 1000}  # closest document sums to 2250 / 1750 / 1000
    assert len({r["id"] for r in records}) == len(records)  # no document repeated without --allow-upsample
    assert (
        data_path.read_text()
        == "0.45 /data/tok/zh_text_document 0.35 /data/tok/en_text_document 0.2 /data/custom_other\n"
    )
    # Sources are interleaved, not concatenated.
    first_half = [r["lang"] for r in records[: len(records) // 2]]
    assert {"zh", "en", "other"} <= set(first_half)
    assert "target total 5000" in result.stdout and "skipped lines: 3" in result.stdout
    assert f"invalid_json (not a JSON object): 1  e.g. {sources}/zh_1.jsonl:151" in result.stdout
    assert "non_utf8" in result.stdout and "empty_document" in result.stdout
    assert "--data-path 0.45 /data/tok/zh_text_document" in result.stdout


def test_total_tokens_needs_upsampling_flag(sources, tmp_path, capsys):
    output = tmp_path / "mixed.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        build_mixture.main(mix_args(sources, "--output", str(output), "--total-tokens", "10000", "--workers", "1"))
    assert exit_info.value.code == 2
    assert "needs 2000 tokens of source 'other' but it has 1000" in capsys.readouterr().err
    assert not output.exists()
    assert (
        build_mixture.main(
            mix_args(sources, "--output", str(output), "--total-tokens", "1e4", "--allow-upsample", "--workers", "1")
        )
        == 0
    )
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    other = [r["id"] for r in records if r["lang"] == "other"]
    assert len(other) == 200 and len(set(other)) == 100  # two whole passes over "other"
    assert "passes" in capsys.readouterr().out


def test_data_path_only_and_failed_write_is_atomic(sources, tmp_path, monkeypatch, capsys):
    data_path = tmp_path / "weights.txt"
    assert build_mixture.main(mix_args(sources, "--data-path-out", str(data_path), "--workers", "1")) == 0
    assert data_path.read_text() == "0.45 ./zh_text_document 0.35 ./en_text_document 0.2 ./other_text_document\n"
    output = tmp_path / "mixed.jsonl"
    output.write_text("previous\n")

    def failing_lines(*args):
        yield b'{"text": "partial"}\n'
        raise OSError("disk full")

    monkeypatch.setattr(build_mixture, "iter_selected_lines", failing_lines)
    with pytest.raises(OSError, match="disk full"):
        build_mixture.main(mix_args(sources, "--output", str(output), "--workers", "1"))
    assert output.read_text() == "previous\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_bad_flags_are_errors_naming_the_flag(sources, capsys):
    for argv, message in [
        (["--source", f"zh={sources}/zh_*.jsonl", "--weight", "en=1"], "--weight must name exactly the sources"),
        (["--source", "zh", "--weight", "zh=1"], "--source expects NAME=VALUE"),
        (["--source", f"zh={sources}/nothing*.jsonl", "--weight", "zh=1"], "--source zh"),
        (["--source", f"zh={sources}/zh_*.jsonl", "--weight", "zh=-1"], "positive"),
        (["--source", f"zh={sources}/zh_*.jsonl", "--weight", "zh=1", "--total-tokens", "lots"], "--total-tokens"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            build_mixture.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    result = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--data-path-out" in result.stdout and "--allow-upsample" in result.stdout
