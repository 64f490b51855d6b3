"""Issue 18's file of 14 kinds of bad line (among them an 8 MB document, which is good, and a
JSON-escaped lone surrogate) through every tool that reads text: each finishes with exit status 0
and the same skip table, counting every line; with --strict each stops with exit status 2, one
error line naming the first bad line, and no output."""

import importlib.util
import re
from pathlib import Path

import pytest
from bad_input import write_bad_line_file
from sft_task import train_task_tokenizer

from megatron_r1.data.jsonl import SKIP_REASONS

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _document(i: int) -> dict:
    return {"text": f"Document {i} is about the harvest: apples, pears and plums were picked early this year."}


def _chat(value) -> dict:
    return {"messages": [{"role": "user", "content": "What was picked?"}, {"role": "assistant", "content": value}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_lines")
    return {
        "corpus": write_bad_line_file(directory / "corpus.jsonl", lambda value: {"text": value}, _document),
        "sft": write_bad_line_file(directory / "sft.jsonl", _chat, lambda i: _chat(f"Apples and pears, {i}.")),
        "tokenizer": train_task_tokenizer(directory),
    }


# tool -> (input kind, arguments after --input FILE given the output directory and the tokenizer,
# outputs that must not exist after --strict, pattern of the summary's document count)
RUNS = {
    "preprocess_data": ("corpus", lambda out, tok: ["--output-prefix", f"{out}/data", "--tokenizer-model", tok, "--workers", "1"],
                        ["data_text_document.idx"], r"documents: (\d+) "),
    "train_tokenizer": ("corpus", lambda out, tok: ["--output-prefix", f"{out}/tok", "--vocab-size", "400", "--num-threads", "1"],
                        ["tok.model"], r"documents: (\d+) "),
    "preprocess_sft": ("sft", lambda out, tok: ["--output-prefix", f"{out}/sft", "--tokenizer-model", tok],
                       ["sft.idx", "sft_loss_mask.idx"], r"records: (\d+) "),
    "clean_corpus": ("corpus", lambda out, tok: ["--output", f"{out}/clean.jsonl", "--workers", "1"],
                     ["clean.jsonl"], r"documents: (\d+),"),
    "dedup": ("corpus", lambda out, tok: ["--output", f"{out}/dedup.jsonl", "--workers", "1"],
              ["dedup.jsonl", "dedup.clusters.jsonl"], r"documents: (\d+),"),
}  # fmt: skip


def _run(name, inputs, out, strict, capsys):
    kind, arguments, outputs, documents = RUNS[name]
    exit_code = load_tool(name).main(
        ["--input", inputs[kind]["path"], *arguments(out, inputs["tokenizer"])] + ["--strict"] * strict
    )
    return exit_code, capsys.readouterr(), inputs[kind], outputs, documents


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_line_is_a_document_or_in_the_skip_table(name, inputs, tmp_path, capsys):
    exit_code, (output, _), expected, _, documents = _run(name, inputs, tmp_path, False, capsys)
    assert exit_code == 0
    assert int(re.search(documents, output).group(1)) == expected["documents"]
    assert f"skipped lines: {sum(expected['skipped'].values())}\n" in output
    for reason, count in expected["skipped"].items():
        assert f"  {reason} ({SKIP_REASONS[reason]}): {count}  e.g. {expected['path']}:" in output, reason


@pytest.mark.parametrize("name", sorted(RUNS))
def test_strict_stops_at_the_first_bad_line_with_exit_status_2_and_no_output(name, inputs, tmp_path, capsys):
    exit_code, (_, errors), expected, outputs, _ = _run(name, inputs, tmp_path, True, capsys)
    assert exit_code == 2
    error_lines = [line for line in errors.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert error_lines == [
        f"error: {expected['path']}:{expected['first_bad']}: invalid_json (not a JSON object); stopped by --strict"
    ]
    assert not [name for name in outputs if (tmp_path / name).exists()]


def test_build_mixture_counts_every_line_and_stops_under_strict(inputs, tmp_path, capsys):
    build_mixture = load_tool("build_mixture")
    corpus = inputs["corpus"]
    arguments = [
        "--source",
        f"a={corpus['path']}",
        "--weight",
        "a=1",
        "--output",
        str(tmp_path / "mix.jsonl"),
        "--workers",
        "1",
    ]
    assert build_mixture.main(arguments) == 0
    output = capsys.readouterr().out
    assert (
        re.search(rf"^  a +{corpus['documents']} ", output, re.MULTILINE)
        and f"skipped lines: {sum(corpus['skipped'].values())}\n" in output
    )
    assert f"  lone_surrogate ({SKIP_REASONS['lone_surrogate']}): 1  e.g. {corpus['path']}:" in output
    (tmp_path / "mix.jsonl").unlink()
    assert build_mixture.main(arguments + ["--strict"]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {corpus['path']}:{corpus['first_bad']}: invalid_json (not a JSON object); stopped by --strict\n"
    )
    assert not (tmp_path / "mix.jsonl").exists()


def test_replace_lone_surrogates_keeps_the_line_with_u_fffd(inputs, tmp_path, capsys):
    clean_corpus = load_tool("clean_corpus")
    corpus = inputs["corpus"]
    arguments = [
        "--input",
        corpus["path"],
        "--output",
        str(tmp_path / "clean.jsonl"),
        "--workers",
        "1",
        "--replace-lone-surrogates",
    ]
    assert clean_corpus.main(arguments) == 0
    output = capsys.readouterr().out
    assert f"documents: {corpus['documents'] + 1}," in output and "lone_surrogate (" not in output
