import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import sentencepiece
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_r1.tokenizer import train_sentencepiece

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO_ROOT, "megatron_r1", "assets", "tiny_corpus.jsonl")
TOOL = os.path.join(REPO_ROOT, "tools", "preprocess_data.py")

_spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
preprocess_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(preprocess_data)

EXTRA_TEXTS = [
    "<|user|>What is 12+30?<|end|><|assistant|><think>12 + 30 = 42</think>42<|end|>",
    "def add(a, b):\n    return a + b\n\n\tprint(add(1, 2))",
    "混合 English 和中文，還有繁體字與 emoji 🙂。",
]


@pytest.fixture(scope="module")
def corpus_texts():
    with open(CORPUS, encoding="utf-8") as corpus:
        return [json.loads(line)["text"] for line in corpus]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus_texts):
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "sp")
    train_sentencepiece(
        (line for text in corpus_texts[:400] for line in text.split("\n") if line.strip()),
        prefix,
        vocab_size=2500,
        character_coverage=0.999,
    )
    return prefix + ".model"


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as output:
        for text in texts:
            output.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return str(path)


def run_tool(*args, **popen_args):
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, **popen_args
    )


def test_megatron_core_reads_every_document_as_a_direct_sentencepiece_encode(tmp_path, sp_model, corpus_texts):
    texts = corpus_texts[:200] + EXTRA_TEXTS
    input_path = write_jsonl(tmp_path / "in.jsonl", texts)
    result = run_tool(
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
        "--append-eod",
        "--workers",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"documents: {len(texts)}" in result.stdout
        and "skipped lines: 0" in result.stdout
        and "docs/s" in result.stdout
    )
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert len(dataset) == len(texts) and dataset.document_indices.tolist() == list(range(len(texts) + 1))
    for index, text in enumerate(texts):
        assert dataset[index].tolist() == processor.encode(text) + [processor.eos_id()], index


def test_llama2_tokenizer_documents_start_with_bos_as_in_megatron_lm(tmp_path, sp_model, corpus_texts):
    input_path = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:20])
    result = run_tool(
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "Llama2Tokenizer",
        "--tokenizer-model",
        sp_model,
        "--append-eod",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    for index, text in enumerate(corpus_texts[:20]):
        assert dataset[index].tolist() == [processor.bos_id(), *processor.encode(text), processor.eos_id()], index


def test_null_tokenizer_stores_token_id_text_and_skips_lines_that_are_not_ids(tmp_path):
    input_path = write_jsonl(tmp_path / "in.jsonl", ["5 6 7", "not ids", "1 2", "3 1000"])
    result = run_tool(
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "1000",
        "--append-eod",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "documents: 2" in result.stdout and "skipped lines: 2" in result.stdout
    assert "not_token_ids" in result.stdout and "in.jsonl:2" in result.stdout and "in.jsonl:4" in result.stdout
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[5, 6, 7, 999], [1, 2, 999]]
    missing = run_tool(
        "--input", input_path, "--output-prefix", str(tmp_path / "out2"), "--tokenizer-type", "NullTokenizer"
    )
    assert missing.returncode == 2 and "--tokenizer-type NullTokenizer needs --vocab-size N" in missing.stderr
    no_model = run_tool("--input", input_path, "--output-prefix", str(tmp_path / "out2"))
    assert (
        no_model.returncode == 2
        and "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model" in no_model.stderr
    )


def test_partitions_flag_writes_shards_and_the_merged_dataset(tmp_path, sp_model, corpus_texts):
    input_path = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:150])
    result = run_tool(
        "--input",
        input_path,
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-model",
        sp_model,
        "--workers",
        "2",
        "--partitions",
        "2",
    )
    assert result.returncode == 0, result.stderr
    for prefix in ("out_0_text_document", "out_1_text_document", "out_text_document"):
        assert f"wrote {tmp_path / prefix}.bin / .idx" in result.stdout
    merged = IndexedDataset(str(tmp_path / "out_text_document"))
    shards = [IndexedDataset(str(tmp_path / f"out_{i}_text_document")) for i in range(2)]
    assert len(merged) == 150 == sum(len(shard) for shard in shards)


def test_bad_lines_are_skipped_and_counted_with_file_and_line(tmp_path, sp_model, capsys):
    good = [json.dumps({"text": f"good document number {i}"}).encode() + b"\n" for i in range(4)]
    first = tmp_path / "a.jsonl"
    first.write_bytes(
        b"".join(
            [
                good[0],  # 1
                b"\n",  # 2 blank
                b'{"text": "no closing brace"\n',  # 3 invalid JSON
                b'{"body": "wrong key"}\n',  # 4 missing key
                b'{"text": "caf\xe9 latin-1"}\n',  # 5 not UTF-8
                b'{"text": "   "}\n',  # 6 empty
                b'{"text": {"nested": 1}}\n',  # 7 not a string
                good[1],  # 8
                json.dumps({"text": "x" * 3000}).encode() + b"\n",  # 9 over --max-document-bytes
                good[2],  # 10
            ]
        )
    )
    second = tmp_path / "b.jsonl"
    second.write_bytes(good[3] + b"[]\n")
    exit_code = preprocess_data.main(
        [
            "--input",
            str(tmp_path / "*.jsonl"),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-model",
            sp_model,
            "--workers",
            "1",
            "--max-document-bytes",
            "2000",
        ]
    )
    output = capsys.readouterr().out
    assert exit_code == 0
    assert "documents: 4 " in output and "skipped lines: 8" in output
    for reason, location in [("blank_line", "a.jsonl:2"), ("missing_key", "a.jsonl:4"), ("non_utf8", "a.jsonl:5"), ("empty_document", "a.jsonl:6"),
                             ("not_a_string", "a.jsonl:7"), ("too_large", "a.jsonl:9")]:  # fmt: skip
        assert (
            f"  {reason} (" in output
            and f"): 1  e.g. {tmp_path / location}" in output.split(f"  {reason} (")[1].split("\n")[0]
        )
    assert f"invalid_json (not a JSON object): 2  e.g. {tmp_path / 'a.jsonl'}:3, {tmp_path / 'b.jsonl'}:2" in output
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        processor.encode(f"good document number {i}") for i in (0, 1, 2, 3)
    ]


def test_a_50_mb_document_is_skipped_under_the_default_limit(tmp_path, sp_model, capsys):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as output:
        output.write(b'{"text": "before"}\n{"text": "')
        chunk = b"lorem ipsum " * 100_000
        for _ in range(42):  # 42 x 1.2 MB = 50 MB
            output.write(chunk)
        output.write(b'"}\n{"text": "after"}\n')
    assert (
        preprocess_data.main(
            [
                "--input",
                str(path),
                "--output-prefix",
                str(tmp_path / "out"),
                "--tokenizer-model",
                sp_model,
                "--workers",
                "2",
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "documents: 2 " in output and f"too_large (longer than --max-document-bytes): 1  e.g. {path}:2" in output


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, sp_model, capsys):
    input_path = tmp_path / "in.jsonl"
    input_path.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": 5}\n{oops\n')
    exit_code = preprocess_data.main(
        [
            "--input",
            str(input_path),
            "--output-prefix",
            str(tmp_path / "out"),
            "--tokenizer-model",
            sp_model,
            "--strict",
            "--workers",
            "2",
        ]
    )
    assert exit_code == 2
    assert (
        f"error: {input_path}:3: not_a_string (a text field is not a string); stopped by --strict"
        in capsys.readouterr().err
    )
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_input_with_no_usable_line_is_an_error_naming_the_reasons(tmp_path, sp_model, capsys):
    input_path = tmp_path / "in.jsonl"
    input_path.write_bytes(b"not json\n")
    assert (
        preprocess_data.main(
            ["--input", str(input_path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", sp_model]
        )
        == 1
    )
    assert (
        f"every line was skipped\n  invalid_json (not a JSON object): 1  e.g. {input_path}:1" in capsys.readouterr().err
    )
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_bad_flags_name_the_flag_and_a_missing_output_directory_is_created(tmp_path, sp_model, capsys):
    with pytest.raises(SystemExit):
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "missing*.jsonl"),
                "--output-prefix",
                str(tmp_path / "out"),
                "--tokenizer-model",
                sp_model,
            ]
        )
    assert "--input" in capsys.readouterr().err
    write_jsonl(tmp_path / "in.jsonl", ["text"])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "file" / "out"),
                "--tokenizer-model",
                sp_model,
            ]
        )
    assert "--output-prefix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "out"),
                "--tokenizer-model",
                sp_model,
                "--workers",
                "0",
            ]
        )
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert (
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output-prefix",
                str(tmp_path / "new" / "dir" / "out"),
                "--tokenizer-model",
                sp_model,
            ]
        )
        == 0
    )
    assert IndexedDataset.exists(str(tmp_path / "new" / "dir" / "out_text_document"))


def big_input(path, corpus_texts, megabytes):
    with open(path, "w", encoding="utf-8") as output:
        written = 0
        for text in itertools.cycle(corpus_texts):
            if written >= megabytes * 1e6:
                break
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            output.write(line)
            written += len(line.encode())
    return str(path)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_run_never_leaves_an_index_that_looks_valid(tmp_path, sp_model, corpus_texts, how):
    input_path = big_input(tmp_path / "in.jsonl", corpus_texts, 12)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen(
        [
            sys.executable,
            TOOL,
            "--input",
            input_path,
            "--output-prefix",
            str(out_dir / "data"),
            "--tokenizer-model",
            sp_model,
            "--workers",
            "2",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    # Wait until tokens are being appended to the temporary .bin, then kill the whole process group.
    while not any(
        name.endswith(".tmp") and ".bin." in name and os.path.getsize(out_dir / name) > 0
        for name in os.listdir(out_dir)
    ):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before it could be interrupted"
        time.sleep(0.005)
    if how == signal.SIGKILL:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    assert not IndexedDataset.exists(str(out_dir / "data_text_document"))
    assert not [name for name in os.listdir(out_dir) if name.endswith(".idx")]
    if how != signal.SIGKILL:
        assert process.returncode == 130 and "interrupted" in stderr
        assert os.listdir(out_dir) == []  # every temporary file removed
        assert psutil.pid_exists(process.pid) is False or psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE


def peak_tree_rss(command):
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, sum(member.memory_info().rss for member in [root] + root.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.01)
    assert process.returncode == 0
    return peak


def test_memory_does_not_grow_with_input_size(tmp_path, sp_model, corpus_texts):
    small = big_input(tmp_path / "small.jsonl", corpus_texts, 1)
    large = big_input(tmp_path / "large.jsonl", corpus_texts, 10)
    command = [sys.executable, TOOL, "--tokenizer-model", sp_model, "--workers", "2", "--append-eod"]
    small_peak = peak_tree_rss(command + ["--input", small, "--output-prefix", str(tmp_path / "small")])
    large_peak = peak_tree_rss(command + ["--input", large, "--output-prefix", str(tmp_path / "large")])
    # 10x the input (about 2.5M tokens more, ~100 MB as Python lists) must not show up in memory.
    assert large_peak < 1.25 * small_peak, (small_peak, large_peak)
