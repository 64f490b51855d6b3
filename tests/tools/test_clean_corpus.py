import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "clean_corpus.py")

_spec = importlib.util.spec_from_file_location("clean_corpus_tool", TOOL)
clean_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clean_corpus)

ENGLISH = (
    "The river that runs through the old town was once the main road for traders who carried salt, "
    "cloth and grain to the markets in the north. Today it is quiet, and most of the warehouses along "
    "its banks have been turned into small museums, cafes and workshops. Write to the museum at "
    "info@river-museum.org or call 415-555-2671 to book a tour.\n\n"
    "Local historians have collected letters, maps and account books that show how the trade changed "
    "with the seasons. In winter the water was too low for heavy boats, so merchants stored their goods "
    "and waited for the spring floods before they set out again."
)
CHINESE = (
    "这座城市的老街保存了许多上世纪的建筑，沿街的店铺大多由同一个家族经营了几代人。每到周末，附近的居民会带着孩子来这里散步，"
    "买一些手工做的点心，也有游客专门来拍照。预约请致电13812345678。\n\n"
    "当地的历史学者整理了不少旧信件和账本，从中可以看出商人们如何根据季节调整生意。冬天河水太浅，货船无法通行，"
    "他们就把货物存放在仓库里，等到春天涨水以后再出发。这些资料现在陈列在河边的一座小博物馆中，免费向公众开放。"
)
JAPANESE = "東京は日本の首都です。" * 20


def write_lines(path, lines):
    with open(path, "wb") as handle:
        for line in lines:
            handle.write((json.dumps(line, ensure_ascii=False) + "\n").encode() if isinstance(line, dict) else line)


def leftovers(directory):
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_cli_cleans_counts_every_drop_and_bad_line(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_lines(
        first,
        [
            {
                "id": 1,
                "source": "web",
                "text": "\ufeff"
                + ENGLISH.replace("river", "ｒｉｖｅｒ", 1)
                + "\nWe use cookies to improve your experience.",
            },
            b"{broken json\n",
            {"id": 2, "text": "Lorem ipsum dolor sit amet. " + ENGLISH},
            b'{"id": 3, "text": "caf\xe9"}\n',  # Latin-1, not UTF-8
            {"id": 4, "text": "   "},
            b"\n",
            {"id": 5, "text": "Too short."},
        ],
    )
    write_lines(
        second,
        [
            {"id": 6, "text": CHINESE},
            {"id": 7, "body": "no text key"},
            {"id": 8, "text": JAPANESE},
            b'{"id": 9, "text": 42}',  # last line without a newline
        ],
    )
    rules = tmp_path / "domains.json"
    rules.write_text(
        json.dumps({"history": ["historians", "历史", "museum"], "code": ["python", "函数"]}), encoding="utf-8"
    )
    output, rejects = tmp_path / "out" / "clean.jsonl", tmp_path / "rejects.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            str(first),
            str(tmp_path / "b*.jsonl"),
            "--output",
            str(output),
            "--keep-rejects",
            str(rejects),
            "--languages",
            "zh,en",
            "--domain-rules",
            str(rules),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    kept = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [record["id"] for record in kept] == [1, 6]
    english, chinese = kept
    assert english["lang"] == "en" and chinese["lang"] == "zh" and english["source"] == "web"
    assert english["text"].startswith("The river that runs") and "\ufeff" not in english["text"]  # NFKC, BOM removed
    assert "cookies" not in english["text"]  # boilerplate line
    assert "<EMAIL>" in english["text"] and "<PHONE>" in english["text"] and "<PHONE>" in chinese["text"]
    assert english["domain"] == chinese["domain"] == "history"

    summary = result.stdout
    assert "documents: 5, kept: 2" in summary
    for line in ("dropped language: 1", "dropped lorem_ipsum: 1", "dropped too_short: 1", "skipped lines: 6",
                 "invalid_json (not a JSON object): 1", "non_utf8 (not valid UTF-8): 1", "empty_document", "missing_key", "not_a_string", "blank_line",
                 f"{first}:2", f"{first}:4", "kept by language: zh=1, en=1, other=0", "<EMAIL>=1", "<PHONE>=2", "kept by domain: history=2"):  # fmt: skip
        assert line in summary, line
    rejected = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    reasons = {record["reject_location"]: record["reject_reason"] for record in rejected}
    assert reasons == {
        f"{first}:2": "invalid_json",
        f"{first}:3": "lorem_ipsum",
        f"{first}:4": "non_utf8",
        f"{first}:5": "empty_document",
        f"{first}:7": "too_short",
        f"{second}:2": "missing_key",
        f"{second}:3": "language",
        f"{second}:4": "not_a_string",
    }
    assert all(
        "text" in record and "lang" in record
        for record in rejected
        if record["reject_reason"] in ("lorem_ipsum", "too_short", "language")
    )
    assert "<EMAIL>" in next(
        record["text"] for record in rejected if record["reject_reason"] == "lorem_ipsum"
    )  # rejects are anonymized too
    assert not leftovers(tmp_path) and not leftovers(output.parent)


def test_output_is_atomic_when_the_run_fails(tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    write_lines(source, [{"text": ENGLISH}, {"text": CHINESE}])
    output = tmp_path / "clean.jsonl"
    output.write_text("previous run\n")

    def failing_map(func, items, workers, initializer, initargs):
        initializer(*initargs)
        for item in items:
            yield func(item)
            raise OSError("disk full")

    monkeypatch.setattr(clean_corpus, "ordered_map", failing_map)
    with pytest.raises(OSError, match="disk full"):
        clean_corpus.main(
            [
                "--input",
                str(source),
                "--output",
                str(output),
                "--keep-rejects",
                str(tmp_path / "rejects.jsonl"),
                "--workers",
                "1",
            ]
        )
    assert output.read_text() == "previous run\n"
    assert not (tmp_path / "rejects.jsonl").exists() and not leftovers(tmp_path)


def test_gzip_input_is_read(tmp_path):
    source = tmp_path / "in.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": ENGLISH}) + "\n{bad\n")
    output = tmp_path / "clean.jsonl"
    assert clean_corpus.main(["--input", str(source), "--output", str(output), "--workers", "1", "--no-pii"]) == 0
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert "info@river-museum.org" in record["text"] and record["lang"] == "en"


def test_bad_flags_are_errors_naming_the_flag(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    write_lines(source, [{"text": ENGLISH}])
    for argv, message in [
        (["--input", str(tmp_path / "missing.jsonl"), "--output", "x"], "--input"),
        (["--input", str(source), "--output", str(source)], "--output"),
        (["--input", str(source), "--output", str(tmp_path / "o"), "--languages", "zh,fr"], "--languages"),
        (["--input", str(source), "--output", str(tmp_path / "o"), "--domain-rules", str(source)], str(source)),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            clean_corpus.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_lists_the_quality_thresholds():
    result = subprocess.run(
        [sys.executable, TOOL, "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0
    for flag in (
        "--keep-rejects",
        "--min-words",
        "--max-dup-10gram",
        "--min-zh-chars",
        "--domain-rules",
        "--no-pii",
        "--workers",
    ):
        assert flag in result.stdout
