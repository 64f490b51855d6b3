import gzip
import json

import pytest
from bad_input import corpus_records, good_corpus_records, jsonl_lines, write_line_file
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_r1.data.jsonl import (
    SKIP_REASONS,
    SkipCounter,
    StrictModeError,
    parse_document,
    read_lines,
    split_into_ranges,
)


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(lines))
    return str(path)


@pytest.mark.parametrize("target_bytes", [1, 7, 40, 1000, 10**6])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_ranges_cover_every_line_exactly_once_in_order(tmp_path, target_bytes, trailing_newline):
    lines = [json.dumps({"text": "x" * (i % 13)}).encode() + (b"\r\n" if i % 5 == 0 else b"\n") for i in range(60)]
    if not trailing_newline:
        lines[-1] = lines[-1].rstrip(b"\r\n")
    path = write_lines(tmp_path / "in.jsonl", lines)
    ranges = split_into_ranges([path], target_bytes)
    assert ranges[0].start == 0 and all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    assert sum(r.disk_bytes for r in ranges) == sum(map(len, lines))
    read = [line for r in ranges for line, _ in read_lines(r, max_line_bytes=10**6)]
    assert read == lines


def test_overlong_line_is_reported_as_none_and_fully_consumed(tmp_path):
    lines = [b'{"text": "a"}\n', b'{"text": "' + b"b" * 5000 + b'"}\n', b'{"text": "c"}\n', b"x" * 100 + b"\n"]
    path = write_lines(tmp_path / "in.jsonl", lines)
    (byte_range,) = split_into_ranges([path], 10**6)
    read = list(read_lines(byte_range, max_line_bytes=100))
    # The limit excludes the newline: a 100-byte line passes, a 5013-byte one does not.
    assert read == [
        (lines[0], len(lines[0])),
        (None, len(lines[1])),
        (lines[2], len(lines[2])),
        (lines[3], len(lines[3])),
    ]


def test_gzip_input_is_one_range_read_through_gzip(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(20)]
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as output:
        output.write(b"".join(lines))
    (byte_range,) = split_into_ranges([str(path)], 10)
    assert [line for line, _ in read_lines(byte_range, 10**6)] == lines


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"\n", "blank_line"),
        (b"   \t\r\n", "blank_line"),
        (b'{"text": "caf\xe9"}\n', "non_utf8"),
        (b'{"text": "unterminated\n', "invalid_json"),
        (b"[1, 2]\n", "invalid_json"),
        (b'{"other": "x"}\n', "missing_key"),
        (b'{"text": 42}\n', "not_a_string"),
        (b'{"text": ["a", "b"]}\n', "not_a_string"),
        (b'{"text": ""}\n', "empty_document"),
        (b'{"text": " \\n\\t "}\n', "empty_document"),
        (b'{"text": "lone \\ud800 surrogate"}\n', "lone_surrogate"),
        (b'{"text": "reversed pair \\udc00\\ud800"}\n', "lone_surrogate"),
        pytest.param(b"[" * 100_000 + b"\n", "invalid_json", id="deep-nesting"),  # json raises RecursionError
    ],
)
def test_bad_lines_get_their_reason(line, reason):
    assert parse_document(line, ["text"]) == (None, reason)


def test_good_line_gives_one_text_per_key_and_every_key_is_required():
    line = json.dumps({"q": "问题", "a": "answer\n  code", "id": 3}, ensure_ascii=False).encode() + b"\n"
    assert parse_document(line, ["q", "a"]) == (["问题", "answer\n  code"], None)
    assert parse_document(line, ["q", "missing"]) == (None, "missing_key")


def test_skip_counter_merges_with_line_offsets_and_keeps_the_first_examples():
    total = SkipCounter(max_examples=3)
    first = SkipCounter(max_examples=3)
    first.add("invalid_json", "a.jsonl", 2)
    first.add("invalid_json", "a.jsonl", 5)
    second = SkipCounter(max_examples=3)
    for line in (1, 4, 9):
        second.add("invalid_json", "a.jsonl", line)
    second.add("missing_key", "a.jsonl", 3)
    total.merge(first)
    total.merge(second, line_offset=100)
    assert total.counts == {"invalid_json": 5, "missing_key": 1} and total.total == 6
    assert total.examples["invalid_json"] == [("a.jsonl", 2), ("a.jsonl", 5), ("a.jsonl", 101)]
    summary = "\n".join(total.summary_lines())
    assert "invalid_json (not a JSON object): 5  e.g. a.jsonl:2, a.jsonl:5, a.jsonl:101 ..." in summary
    assert "missing_key (a text field is missing): 1  e.g. a.jsonl:103" in summary


def test_lone_surrogates_are_replaced_when_asked_and_pairs_are_text():
    line = b'{"text": "a \\ud800 b \\ud83d\\ude00"}\n'
    assert parse_document(line, ["text"], replace_surrogates=True) == (["a \ufffd b \U0001f600"], None)
    assert parse_document(b'{"text": "pair \\ud83d\\ude00"}', ["text"]) == (["pair \U0001f600"], None)


def test_skip_table_is_the_total_then_the_reasons_with_details_and_strict_raises_on_the_first():
    counter = SkipCounter()
    counter.add("invalid_record", "a.jsonl", 4, "no assistant message")
    counter.add("blank_line", "a.jsonl", 7)
    assert counter.table(indent="  ") == [
        "  skipped lines: 2",
        "    invalid_record (not an SFT record in instruction or chat format): 1  e.g. a.jsonl:4 (no assistant message)",
        "    blank_line (blank line): 1  e.g. a.jsonl:7",
    ]
    with pytest.raises(
        StrictModeError,
        match=r"^a\.jsonl:3: not_a_string \(a text field is not a string: is null\); stopped by --strict$",
    ):
        SkipCounter(strict=True).add("not_a_string", "a.jsonl", 3, "is null")


@settings(max_examples=60, derandomize=True, deadline=None)
@given(lines=st.lists(jsonl_lines(corpus_records, good_corpus_records), max_size=8), replace_surrogates=st.booleans())
@example(lines=[b'{"text": "lone \\ud800"}', b'{"text": "fine"}'], replace_surrogates=False)  # issue 18's crash
def test_every_line_of_any_input_is_usable_text_or_a_counted_reason(tmp_path_factory, lines, replace_surrogates):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    expected_lines = write_line_file(path, lines)
    read = 0
    for byte_range in split_into_ranges([str(path)], 16):
        for line, _ in read_lines(byte_range, max_line_bytes=200):
            read += 1
            texts, reason = (
                parse_document(line, ["text"], replace_surrogates) if line is not None else (None, "too_large")
            )
            if reason is None:
                # What the tokenizers receive: text that encodes as UTF-8 and is not blank.
                assert len(texts) == 1 and texts[0].strip() and texts[0].encode("utf-8")
            else:
                assert reason in SKIP_REASONS and not (replace_surrogates and reason == "lone_surrogate")
    assert read == expected_lines
