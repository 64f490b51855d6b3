import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_r1.data import indexed
from megatron_r1.data.indexed import IndexedDatasetWriter, merge_indexed_datasets, read_index, token_dtype


def random_documents(seed, count, vocab_size):
    generator = np.random.default_rng(seed)
    return [generator.integers(0, vocab_size, size=generator.integers(1, 50)) for _ in range(count)]


def write_with_megatron(prefix, documents, dtype, multimodal=False):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.dtype(dtype).type, multimodal=multimodal)
    for document in documents:
        builder.add_item(torch.tensor(document), mode=int(document[0]) % 3)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def write_with_ours(prefix, documents, dtype):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.write_tokens(np.asarray(document, dtype=dtype))
        writer.add_documents(np.array([len(document) for document in documents]))


def same_bytes(first_prefix, second_prefix):
    return all(
        open(first_prefix + suffix, "rb").read() == open(second_prefix + suffix, "rb").read()
        for suffix in (".bin", ".idx")
    )


@pytest.mark.parametrize("vocab_size", [3000, 70000])
def test_writer_output_is_byte_identical_to_megatron_core_builder(tmp_path, vocab_size):
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size < 65500 else np.int32)
    documents = random_documents(0, 200, vocab_size)
    write_with_megatron(str(tmp_path / "megatron"), documents, dtype)
    write_with_ours(str(tmp_path / "ours"), documents, dtype)
    assert same_bytes(str(tmp_path / "megatron"), str(tmp_path / "ours"))
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == 200 and all(np.array_equal(dataset[i], documents[i]) for i in range(200))


def test_token_dtype_switches_at_megatron_threshold():
    assert token_dtype(65499) == np.uint16 and token_dtype(65500) == np.int32


def test_index_columns_are_streamed_in_blocks(tmp_path, monkeypatch):
    # Blocks smaller than the dataset exercise the pointer carry between blocks.
    monkeypatch.setattr(indexed, "_BLOCK_ENTRIES", 7)
    documents = random_documents(1, 50, 3000)
    write_with_megatron(str(tmp_path / "megatron"), documents, np.uint16)
    write_with_ours(str(tmp_path / "ours"), documents, np.uint16)
    assert same_bytes(str(tmp_path / "megatron"), str(tmp_path / "ours"))


def test_merge_is_byte_identical_to_megatron_add_index_including_multi_sequence_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_BLOCK_ENTRIES", 5)
    prefixes = []
    for part in range(3):
        prefix = str(tmp_path / f"part{part}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for document in range(4 + part):
            for sequence in random_documents(10 * part + document, 1 + document % 3, 3000):
                builder.add_item(torch.tensor(sequence))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    merge_indexed_datasets(prefixes, str(tmp_path / "ours"))
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "megatron.idx"))
    assert same_bytes(str(tmp_path / "megatron"), str(tmp_path / "ours"))


def test_multimodal_merge_keeps_sequence_modes(tmp_path):
    prefixes = [str(tmp_path / "a"), str(tmp_path / "b")]
    for seed, prefix in enumerate(prefixes):
        write_with_megatron(prefix, random_documents(seed, 10, 3000), np.uint16, multimodal=True)
    merge_indexed_datasets(prefixes, str(tmp_path / "ours"), multimodal=True)
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16, multimodal=True)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "megatron.idx"))
    assert same_bytes(str(tmp_path / "megatron"), str(tmp_path / "ours"))


def test_failure_inside_the_writer_leaves_no_files_and_keeps_the_previous_output(tmp_path):
    prefix = str(tmp_path / "data")
    write_with_ours(prefix, random_documents(2, 5, 3000), np.uint16)
    before = {suffix: open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")}
    with pytest.raises(RuntimeError, match="simulated crash"):
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            writer.write_tokens(np.arange(10, dtype=np.uint16))
            writer.add_documents(np.array([10]))
            raise RuntimeError("simulated crash")
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "data.idx"]
    assert {suffix: open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")} == before


def test_crash_between_the_renames_leaves_no_index_that_pairs_with_the_new_data(tmp_path, monkeypatch):
    prefix = str(tmp_path / "data")
    write_with_ours(prefix, random_documents(3, 5, 3000), np.uint16)
    real_replace = os.replace

    def replace_then_crash_on_idx(source, destination):
        if destination.endswith(".idx"):
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(indexed.os, "replace", replace_then_crash_on_idx)
    with pytest.raises(KeyboardInterrupt):
        write_with_ours(prefix, random_documents(4, 8, 3000), np.uint16)
    assert not IndexedDataset.exists(prefix)
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]


def test_lengths_that_disagree_with_the_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lengths add up to 20 bytes but .bin has 8"):
        with IndexedDatasetWriter(str(tmp_path / "data"), np.uint16) as writer:
            writer.write_tokens(np.arange(4, dtype=np.uint16))
            writer.add_documents(np.array([10]))
    assert os.listdir(tmp_path) == []


def test_truncated_or_foreign_index_is_reported_with_its_path(tmp_path):
    prefix = str(tmp_path / "data")
    write_with_ours(prefix, random_documents(5, 5, 3000), np.uint16)
    with open(prefix + ".idx", "r+b") as index_file:
        index_file.truncate(os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(ValueError, match=f"{prefix}.idx: .* bytes where 5 sequences"):
        read_index(prefix + ".idx")
    (tmp_path / "junk.idx").write_bytes(b"NOTANIDX" * 8)
    with pytest.raises(ValueError, match="junk.idx: not a megatron-core indexed dataset"):
        read_index(str(tmp_path / "junk.idx"))


def test_merge_refuses_mixed_dtypes_and_missing_files(tmp_path):
    write_with_ours(str(tmp_path / "small"), random_documents(6, 3, 3000), np.uint16)
    write_with_ours(str(tmp_path / "large"), random_documents(7, 3, 70000), np.int32)
    with pytest.raises(ValueError, match="large.idx: dtype int32 differs"):
        merge_indexed_datasets([str(tmp_path / "small"), str(tmp_path / "large")], str(tmp_path / "out"))
    os.remove(tmp_path / "large.idx")
    with pytest.raises(FileNotFoundError, match="large.idx: missing"):
        merge_indexed_datasets([str(tmp_path / "small"), str(tmp_path / "large")], str(tmp_path / "out"))
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()
