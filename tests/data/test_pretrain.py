import pytest
import torch

from megatron_r1.data.pretrain import MicroBatches


class _Samples:
    """GPTDataset-shaped samples: sample i holds tokens i*100 .. i*100+7."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        tokens = torch.arange(8) + 100 * index
        return {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(8), "position_ids": torch.arange(8)}


def test_megatron_sample_order_and_curriculum_reshape(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 2)
    batches = MicroBatches(_Samples(), micro_batch_size=2)
    first = next(batches)  # global micro-batch 0: samples 0-3, rank 1 takes 2 and 3
    assert first["tokens"][:, 0].tolist() == [200, 300]
    assert batches.consumed_samples == 4

    batches.seq_length = 4  # curriculum: each 8-token sample becomes two 4-token sequences
    second = next(batches)  # samples 6 and 7
    assert second["tokens"].tolist() == [
        [600, 601, 602, 603],
        [604, 605, 606, 607],
        [700, 701, 702, 703],
        [704, 705, 706, 707],
    ]
    assert torch.equal(second["labels"], second["tokens"] + 1)
    assert second["position_ids"].tolist() == [[0, 1, 2, 3]] * 4
    assert batches.consumed_samples == 8


def _documents_dataset(tmp_path, eod):
    """An indexed dataset of 40 documents of 5 tokens, each ending with the end-of-document id."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for document in range(40):
        builder.add_document(torch.tensor([document % 7 + 1] * 4 + [eod]), [5])
    builder.finalize(prefix + ".idx")
    return prefix


def test_eod_mask_loss_and_file_reads_reach_megatron_datasets(tmp_path):
    """--eod-mask-loss: no loss on end-of-document tokens (only then); --no-mmap-bin-files reads the
    same samples without memory maps."""
    from types import SimpleNamespace

    from megatron_r1.data.pretrain import build_datasets
    from megatron_r1.tokenizer import NullTokenizer

    vocab_size = 16  # NullTokenizer's end-of-document id is vocab_size - 1
    prefix = _documents_dataset(tmp_path, eod=vocab_size - 1)

    def first_sample(**flags):
        args = SimpleNamespace(
            seed=1,
            seq_length=12,
            mock_data=False,
            data_path=([prefix], None),
            split="100,0,0",
            data_per_split=None,
            data_cache_path=None,
            tokenizer_type="NullTokenizer",
            tokenizer_model=None,
            eod_mask_loss=False,
            mmap_bin_files=True,
            reset_attention_mask=False,
            reset_position_ids=False,
        )
        train, _ = build_datasets(SimpleNamespace(**{**vars(args), **flags}), NullTokenizer(vocab_size), 8, 0)
        readers.append(type(train.dataset.bin_reader).__name__)
        return train[0]

    readers = []
    plain, masked, unmapped = first_sample(), first_sample(eod_mask_loss=True), first_sample(mmap_bin_files=False)
    assert readers == ["_MMapBinReader", "_MMapBinReader", "_FileBinReader"]
    is_eod = plain["tokens"] == vocab_size - 1
    assert is_eod.any() and plain["loss_mask"].all()
    assert torch.equal(masked["loss_mask"], (~is_eod).float())
    assert torch.equal(unmapped["tokens"], plain["tokens"])


def test_document_masks_and_separate_validation_data_reach_the_batches(tmp_path, monkeypatch):
    """--reset-attention-mask / --reset-position-ids: each document of a sample attends only to itself
    and counts positions from 0, in the micro-batches the model gets; --train-data-path and
    --valid-data-path build each split from its own files."""
    from megatron.core import parallel_state

    from megatron_r1.arguments import parse_args
    from megatron_r1.data.pretrain import build_datasets
    from megatron_r1.tokenizer import NullTokenizer

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    train_prefix = _documents_dataset(tmp_path, eod=15)
    (tmp_path / "valid").mkdir()
    valid_prefix = _documents_dataset(tmp_path / "valid", eod=15)
    args = parse_args(
        "test",
        [
            "--train-data-path",
            train_prefix,
            "--valid-data-path",
            valid_prefix,
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "16",
            "--seq-length",
            "12",
            "--reset-attention-mask",
            "--reset-position-ids",
        ],
    )
    train, valid = build_datasets(args, NullTokenizer(args.vocab_size), 8, 4)
    assert [d.dataset.path_prefix for d in (train, valid)] == [train_prefix, valid_prefix]
    batch = next(MicroBatches(train, micro_batch_size=2))
    for tokens, positions, mask in zip(batch["tokens"], batch["position_ids"], batch["attention_mask"][:, 0]):
        document = torch.cat([torch.zeros(1, dtype=torch.long), (tokens == 15).long().cumsum(0)[:-1]])
        assert document.max() > 0, "the sample should span documents"
        starts = [int((document == d).nonzero()[0]) for d in document.tolist()]
        assert positions.tolist() == [i - start for i, start in enumerate(starts)]
        allowed = (document[:, None] == document[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
        assert torch.equal(~mask, allowed)


def test_a_split_with_no_documents_is_skipped_when_unread_and_named_when_read(tmp_path, capsys, monkeypatch):
    """40 documents under the default --split 969,30,1 leave the test split none (megatron-core
    would loop forever building it, though no sample is drawn from it); a read split without
    documents is refused at launch, naming the flag and the prefix."""
    import threading

    from megatron.core import parallel_state

    from megatron_r1.arguments import parse_args
    from megatron_r1.data.pretrain import build_datasets
    from megatron_r1.tokenizer import NullTokenizer

    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    prefix = _documents_dataset(tmp_path, eod=15)
    flags = ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "16", "--seq-length", "12"]
    args = parse_args("test", flags)
    built = []
    worker = threading.Thread(target=lambda: built.append(build_datasets(args, NullTokenizer(16), 8, 0)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert built, "building the datasets did not finish"
    train, valid = built[0]
    assert len(train) >= 8 and valid is None

    for split, expected in (("999,1,0", f"--split 999,1,0: the validation split of {prefix} gets none of its 40 "
                                        "documents; give it a larger share"),
                            ("100,0,0", "--split 100,0,0 gives the validation split no share, and validation data "
                                        "is read"),
                            ("9,1,x", "--split 9,1,x: give train,valid,test proportions such as 969,30,1")):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args("test", flags + ["--eval-interval", "2", "--split", split])
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(expected)
    with pytest.raises(SystemExit):
        parse_args("test", ["--train-data-path", prefix, *flags[2:], "--eval-interval", "2"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("evaluation (--eval-interval, --skip-train) reads validation data: give --valid-data-path")
    )
