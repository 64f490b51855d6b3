import pytest

from megatron_r1.corpus.jsonl import InputError, atomic_output, expand_inputs, iter_line_batches, iter_lines, parse_text


class Progress:
    def __init__(self):
        self.n = 0

    def update(self, count):
        self.n += count


def test_lines_come_with_numbers_and_offsets_and_overlong_lines_are_never_read(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [b'{"text": "one"}\n', b'{"text": "' + b"x" * 100 + b'"}\n', b'{"text": "three"}']
    path.write_bytes(b"".join(lines))
    read = list(iter_lines(str(path), 7, max_line_bytes=50))
    assert [(file_index, number, offset) for file_index, number, offset, _ in read] == [
        (7, 1, 0),
        (7, 2, 16),
        (7, 3, 16 + len(lines[1])),
    ]
    assert read[1][3] is None and parse_text(read[1][3], "text") == (None, "too_large")
    assert parse_text(read[2][3], "text") == ("three", None)
    progress = Progress()
    batches = list(iter_line_batches([str(path), str(path)], batch_lines=2, progress=progress))
    assert [len(batch) for batch in batches] == [2, 2, 2]
    assert progress.n == 2 * path.stat().st_size


def test_atomic_output_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(str(path)) as handle:
            handle.write(b"partial")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with atomic_output(str(path)) as handle:
        handle.write(b"new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_inputs_expand_globs_in_order_and_report_missing_ones(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")]) == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
    ]
    with pytest.raises(InputError, match="--input .*no file matches"):
        expand_inputs([str(tmp_path / "*.txt")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "c.jsonl")], flag="--source x")
