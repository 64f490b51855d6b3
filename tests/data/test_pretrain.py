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
    assert second["tokens"].tolist() == [[600, 601, 602, 603], [604, 605, 606, 607],
                                         [700, 701, 702, 703], [704, 705, 706, 707]]  # fmt: skip
    assert torch.equal(second["labels"], second["tokens"] + 1)
    assert second["position_ids"].tolist() == [[0, 1, 2, 3]] * 4
    assert batches.consumed_samples == 8
