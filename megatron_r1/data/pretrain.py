"""Pre-training data: megatron-core's GPTDataset (blended by --data-path weights, split by
--split) or MockGPTDataset, read in Megatron-LM's sample order so a run can resume from its
consumed-sample count."""

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_r1.data.indexed import idx_path, read_index

SPLIT_NAMES = ("train", "validation", "test")


class _TokenIds:
    """What megatron's GPTDataset reads of a tokenizer: vocab size, eod and pad ids, and the
    identifiers that go into its index-cache hash."""

    def __init__(self, vocab_size: int, eod: int, pad: int, name: str):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad
        self.unique_identifiers = {"class": name, "vocab_size": vocab_size, "eod": eod, "pad": pad}


def _token_ids(args, tokenizer):
    pad = tokenizer.pad if tokenizer.pad is not None else -1
    return _TokenIds(tokenizer.vocab_size, tokenizer.eod, pad, name=f"{args.tokenizer_type}:{args.tokenizer_model}")


def build_datasets(args, tokenizer, train_samples: int, eval_samples: int):
    """(train, valid) datasets; valid is None when the split leaves no validation data."""
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data or args.data_per_split else args.data_path,
        blend_per_split=args.data_per_split,
        split=None if args.data_per_split else args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=_token_ids(args, tokenizer),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.reset_attention_mask,  # otherwise causal attention needs no mask
        mmap_bin_files=args.mmap_bin_files,
        mid_level_dataset_surplus=0.005,
    )
    sizes = [train_samples, eval_samples, 0]
    if config.split_matrix is not None:
        # megatron-core builds every split with a share of --split, even one no sample is drawn
        # from, and loops forever on an empty one: build only the splits that are read.
        config.split_matrix = [part if size else None for part, size in zip(config.split_matrix, sizes)]
    dataset_cls = MockGPTDataset if args.mock_data else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(dataset_cls, sizes, lambda: True, config).build()
    return train, valid


def empty_split_error(data_path, split: str, drawn_from: list[bool]) -> str | None:
    """What is wrong when a split that samples are drawn from gets no document of a --data-path
    prefix (it gets those in [round(begin * n), round(end * n)), as megatron-core cuts them)."""
    prefixes, weights = data_path
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, part, drawn in zip(SPLIT_NAMES, matrix, drawn_from):
        if drawn and part is None:
            return f"--split {split} gives the {name} split no share, and {name} data is read"
    for index, prefix in enumerate(prefixes):
        if weights is not None and weights[index] == 0:
            continue
        count = len(read_index(idx_path(prefix)).sequence_lengths)
        for name, part, drawn in zip(SPLIT_NAMES, matrix, drawn_from):
            if drawn and part is not None and round(part[0] * count) == round(part[1] * count):
                return (
                    f"--split {split}: the {name} split of {prefix} gets none of its {count} documents; "
                    f"give it a larger share"
                )
    return None


class MicroBatches:
    """Micro-batches of this data-parallel rank, in Megatron-LM's order: each global step takes the
    next ``micro_batch_size * dp_size`` samples per micro-batch and this rank its slice.

    ``seq_length`` below the dataset's sample length (a sequence-length curriculum) cuts every sample
    into ``sample_length / seq_length`` independent sequences: the same tokens per step, and the
    data position (consumed samples) moves exactly as at full length."""

    def __init__(self, dataset, micro_batch_size: int, consumed_samples: int = 0, cycle: bool = False):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.consumed_samples = consumed_samples
        self.cycle = cycle
        self.seq_length = None  # None: the samples' own length

    def __iter__(self):
        return self

    def skip(self, micro_batches: int) -> "MicroBatches":
        """Go on from where `micro_batches` draws would have left this reader (wrapping around
        as a cycling reader's draws do)."""
        stride = self.micro_batch_size * self.dp_size
        if self.cycle:
            micro_batches %= max(len(self.dataset) // stride, 1)
        self.consumed_samples += micro_batches * stride
        return self

    def __next__(self):
        stride = self.micro_batch_size * self.dp_size
        if self.consumed_samples + stride > len(self.dataset):
            if not self.cycle:
                raise StopIteration
            self.consumed_samples = 0
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[i] for i in range(start, start + self.micro_batch_size)]
        self.consumed_samples += stride
        # segment_ids: packed fine-tuning samples (megatron_r1.data.sft) say which sample each token is
        # of; attention_mask (--reset-attention-mask) and reset position_ids keep documents apart.
        per_document = ("position_ids", "attention_mask")
        optional = ("segment_ids",) + per_document
        keys = ("tokens", "labels", "loss_mask") + tuple(key for key in optional if key in samples[0])
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}
        length = self.seq_length or batch["tokens"].shape[1]
        if length != batch["tokens"].shape[1]:  # independent sequences (no document masks: validate_args)
            batch = {key: value.reshape(-1, length) for key, value in batch.items() if key not in per_document}
        batch.setdefault("position_ids", torch.arange(length).expand_as(batch["tokens"]))
        return batch
