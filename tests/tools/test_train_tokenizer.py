import importlib.util
import json
import os
import subprocess
import sys

import sentencepiece
from bad_input import corpus_records, good_corpus_records, jsonl_lines, write_line_file
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_r1.tokenizer import SPECIAL_TOKENS, build_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO_ROOT, "megatron_r1", "assets", "tiny_corpus.jsonl")
TOOL = os.path.join(REPO_ROOT, "tools", "train_tokenizer.py")

_spec = importlib.util.spec_from_file_location("train_tokenizer_tool", TOOL)
train_tokenizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tokenizer)


def test_quickstart_command_on_the_bundled_corpus(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            CORPUS,
            "--vocab-size",
            "4000",
            "--output-prefix",
            str(tmp_path / "tokenizer"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "vocab size: 4000 (requested 4000)  pad 0  bos 2  eod 3" in result.stdout
    assert (
        "user-defined symbols: <think>=4 </think>=5 <|system|>=6 <|user|>=7 <|assistant|>=8 <|tool|>=9 <|end|>=10"
        in result.stdout
    )
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.model", "tokenizer.vocab"]
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "tokenizer.model"))
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(4, 11))
    # Trained on the corpus: its Chinese and English come out in few tokens, and round-trip exactly.
    for text in ("清晨的城市还没有完全醒来", 'The "if" statement is used for conditional execution:'):
        ids = tokenizer.tokenize(text)
        assert len(ids) < len(text.encode()) / 2 and tokenizer.detokenize(ids) == text


def test_reservoir_sample_is_bounded_and_bad_lines_are_counted(tmp_path, capsys):
    lines = [
        json.dumps({"text": f"sentence {i} about apples\nand a second line {i % 7} about pears"}) for i in range(300)
    ]
    lines[10] = '{"text": broken'
    lines[20] = json.dumps({"content": "wrong key"})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    exit_code = train_tokenizer.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--vocab-size",
            "400",
            "--max-sentences",
            "100",
            "--output-prefix",
            str(tmp_path / "tok"),
            "--num-threads",
            "1",
        ]
    )
    output = capsys.readouterr().out
    assert exit_code == 0
    assert "documents: 298  lines seen: 596  sampled: 100\nskipped lines: 2\n" in output
    assert f"invalid_json (not a JSON object): 1  e.g. {tmp_path / 'in.jsonl'}:11" in output
    assert f"missing_key (a text field is missing): 1  e.g. {tmp_path / 'in.jsonl'}:21" in output
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert processor.piece_to_id("<think>") == 4 and processor.eos_id() == 3
    # A vocabulary larger than the tiny sample supports is trained as large as it can be.
    assert processor.get_piece_size() <= 400


def test_strict_and_impossible_vocabulary_fail_without_touching_existing_files(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "一二三四五六七八九十 alpha beta"}\n{"text": 3}\n')
    (tmp_path / "tok.model").write_bytes(b"previous model")
    arguments = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "tok"), "--num-threads", "1"]
    assert train_tokenizer.main(arguments + ["--vocab-size", "1000", "--strict"]) == 2
    assert f"{tmp_path / 'in.jsonl'}:2: not_a_string" in capsys.readouterr().err
    assert train_tokenizer.main(arguments + ["--vocab-size", "20"]) == 1
    assert "Vocabulary size is smaller than required_chars" in capsys.readouterr().err
    assert (
        sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok.model"]
        and (tmp_path / "tok.model").read_bytes() == b"previous model"
    )


def test_custom_symbols_and_long_lines_are_cut_for_sentencepiece(tmp_path):
    long_line = "word " * 2000  # 10 kB: SentencePiece would drop it whole; the sampler cuts it instead
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": long_line}) + "\n")
    assert (
        train_tokenizer.main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "tok"),
                "--vocab-size",
                "300",
                "--user-defined-symbols",
                "<tool_call>",
                "--num-threads",
                "1",
            ]
        )
        == 0
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert processor.piece_to_id("<tool_call>") == 4 and processor.piece_to_id("▁word") != processor.unk_id()


# capsys is read out (and so emptied) on every example.
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(jsonl_lines(corpus_records, good_corpus_records), max_size=8), replace_surrogates=st.booleans())
@example(
    lines=[b'{"text": "lone \\ud800 surrogate"}', b'{"text": "fine"}'], replace_surrogates=False
)  # issue 18's crash
def test_any_input_trains_a_tokenizer_accounting_for_every_line_or_fails_with_one_error(
    tmp_path_factory, capsys, lines, replace_surrogates
):
    directory = tmp_path_factory.mktemp("fuzz")
    expected_lines = write_line_file(directory / "in.jsonl", lines)
    arguments = [
        "--input",
        str(directory / "in.jsonl"),
        "--output-prefix",
        str(directory / "tok"),
        "--vocab-size",
        "400",
        "--num-threads",
        "1",
    ]
    exit_code = train_tokenizer.main(arguments + ["--replace-lone-surrogates"] * replace_surrogates)
    output, errors = capsys.readouterr()
    if exit_code == 0:
        documents = int(output.split("documents: ")[1].split()[0])
        skipped = int(output.split("skipped lines: ")[1].split()[0])
        assert documents + skipped == expected_lines
        assert sorted(os.listdir(directory)) == ["in.jsonl", "tok.model", "tok.vocab"]
    else:  # no usable text, or too few characters for SentencePiece's vocabulary
        assert exit_code == 1 and "\nerror: " in "\n" + errors.split("\r")[-1] and os.listdir(directory) == ["in.jsonl"]
