import importlib.util
import os
import subprocess
import sys

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_r1.data.indexed import IndexedDatasetWriter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "merge_datasets.py")

_spec = importlib.util.spec_from_file_location("merge_datasets_tool", TOOL)
merge_datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_datasets)


def write_dataset(prefix, documents, dtype=np.uint16):
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for document in documents:
            writer.write_tokens(np.asarray(document, dtype=dtype))
        writer.add_documents(np.array([len(document) for document in documents]))


def test_megatron_core_reads_the_merged_documents_in_file_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    generator = np.random.default_rng(0)
    documents = {
        name: [generator.integers(0, 5000, size=generator.integers(1, 30)).tolist() for _ in range(count)]
        for name, count in [("b", 4), ("a", 3), ("c", 5)]
    }
    for name, docs in documents.items():
        write_dataset(shards / name, docs)
    result = subprocess.run(
        [sys.executable, TOOL, "--input", str(shards), "--output-prefix", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "merged 3 datasets" in result.stdout and "documents: 12  sequences: 12" in result.stdout
    merged = IndexedDataset(str(tmp_path / "merged"))
    expected = documents["a"] + documents["b"] + documents["c"]
    assert [merged[i].tolist() for i in range(len(merged))] == expected
    assert merged.document_indices.tolist() == list(range(13))


def test_output_inside_the_input_directory_is_not_merged_into_itself(tmp_path, capsys):
    write_dataset(tmp_path / "a", [[1, 2], [3]])
    write_dataset(tmp_path / "b", [[4]])
    for _ in range(2):  # the second run must not pick up the first run's output
        assert merge_datasets.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "all")]) == 0
        assert "merged 2 datasets" in capsys.readouterr().out
    merged = IndexedDataset(str(tmp_path / "all"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[1, 2], [3], [4]]


def test_incomplete_pair_and_mixed_dtypes_are_errors_naming_the_file(tmp_path, capsys):
    write_dataset(tmp_path / "a", [[1, 2]])
    (tmp_path / "orphan.bin").write_bytes(b"\x00\x01")
    assert merge_datasets.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'orphan'}.idx: missing" in capsys.readouterr().err
    os.remove(tmp_path / "orphan.bin")
    write_dataset(tmp_path / "wide", [[70000]], dtype=np.int32)
    assert merge_datasets.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'wide'}.idx: dtype int32 differs" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "wide.bin", "wide.idx"]
