import gzip
import json

import pytest

from megatron_r1.data.jsonl import SkipCounter, parse_document, read_lines, split_into_ranges


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
    assert read == [(lines[0], len(lines[0])), (None, len(lines[1])), (lines[2], len(lines[2])), (lines[3], len(lines[3]))]


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
    assert "missing_key (a --json-keys key is missing): 1  e.g. a.jsonl:103" in summary
