"""Supervised fine-tuning data: JSONL conversations rendered with the chat template, loss only on
the responses, packed into fixed-length sequences whose samples do not attend to each other.

Records (one JSON object per line):

- instruction format: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional,
  joined to the instruction by a blank line; optional ``system`` and ``reasoning``);
- chat format: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}``
  (an assistant message may carry ``reasoning`` / ``reasoning_content``).

Template, with the tokenizer's special tokens (tools/train_tokenizer.py puts them in every
vocabulary it trains; a vocabulary without one gets the plain-text marker in brackets)::

    [bos] <|user|>{content}<|end|> <|assistant|><think>{reasoning}</think>{content}<|end|> ... [eod]
          ("User: ", "\\n\\n")      ("Assistant: ")

Loss is on everything an assistant message produces -- the reasoning section with its ``<think>``
delimiters, the answer, its ``<|end|>`` -- and on the final eod after an assistant turn; never on
the role markers, system/user/tool text or bos.

Packing: whole samples are placed first-fit into sequences of ``--seq-length`` next-token pairs
(longer samples are cut); ``segment_ids`` tell the training step which sample each position is
of, from which it builds the attention mask (causal within a sample, nothing across samples) and
per-sample position ids (:func:`packed_attention_inputs`). With rotary embeddings attention depends
only on offsets within a sample, so a packed sample computes exactly what it computes alone.

Large sets are tokenized once by ``tools/preprocess_sft.py`` into two indexed datasets,
``PREFIX.bin/.idx`` (tokens) and ``PREFIX_loss_mask.bin/.idx`` (one 0/1 byte per token);
``--data-path`` takes such prefixes as well as ``.jsonl`` files.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_r1.data.files import remove_if_exists
from megatron_r1.data.indexed import IndexedDatasetWriter, bin_path, idx_path, read_index, token_dtype
from megatron_r1.data.jsonl import (
    BadInputError,
    ByteRange,
    SkipCounter,
    describe_reason,
    has_lone_surrogate,
    load_json_object,
    read_lines,
    replace_lone_surrogates,
)

ROLES = ("system", "user", "assistant", "tool")
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|tool|>"}
END_MARKER, THINK_START, THINK_END = "<|end|>", "<think>", "</think>"
# Text used where the vocabulary lacks a marker token.
PLAIN_TEXT_MARKERS = {"<|system|>": "System: ", "<|user|>": "User: ", "<|assistant|>": "Assistant: ",
                      "<|tool|>": "Tool: ", "<|end|>": "\n\n", "<think>": "<think>\n", "</think>": "\n</think>\n"}  # fmt: skip
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
LOSS_MASK_SUFFIX = "_loss_mask"
_MAX_LINE_BYTES = 64 * 1024 * 1024


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


class RecordError(BadInputError):
    """A line that is not a usable record: ``reason`` is its SKIP_REASONS name, ``detail`` (or None)
    says what is wrong; the message starts with ``file:line``."""

    def __init__(self, where: str, reason: str, detail: str | None = None):
        super().__init__(f"{where}: {describe_reason(reason, detail)}")
        self.reason, self.detail = reason, detail


_JSON_TYPES = {
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
    list: "an array",
    dict: "an object",
}


class _TextFields:
    """Reads a record's text fields: strings, with lone surrogates refused or replaced by U+FFFD."""

    def __init__(self, where: str, replace_surrogates: bool):
        self.where, self.replace_surrogates = where, replace_surrogates

    def __call__(self, value, what: str) -> str:
        if not isinstance(value, str):
            raise RecordError(
                self.where, "not_a_string", f"{what} is {_JSON_TYPES.get(type(value), type(value).__name__)}"
            )
        if has_lone_surrogate(value):
            if not self.replace_surrogates:
                raise RecordError(self.where, "lone_surrogate", f"in {what}")
            value = replace_lone_surrogates(value)
        return value


def _chat_messages(record: dict, where: str, text: _TextFields) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(where, "invalid_record", "'messages' must be a non-empty list")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(where, "invalid_record", f"messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RecordError(
                where,
                "invalid_record",
                f"messages[{i}] has role {message['role']!r}; expected one of {', '.join(ROLES)}",
            )
        entry = {"role": message["role"], "content": text(message["content"], f"messages[{i}].content")}
        reasoning = message.get("reasoning", message.get("reasoning_content"))
        if reasoning is not None:
            if message["role"] != "assistant":
                raise RecordError(
                    where, "invalid_record", f"messages[{i}] has reasoning but is not an assistant message"
                )
            entry["reasoning"] = text(reasoning, f"messages[{i}].reasoning")
        parsed.append(entry)
    return parsed


def _instruction_messages(record: dict, where: str, text: _TextFields) -> list[dict]:
    for key in ("instruction", "output"):
        if key not in record:
            raise RecordError(where, "missing_key", f"instruction-format record lacks {key!r}")
    prompt = text(record["instruction"], "'instruction'")
    if record.get("input"):
        prompt += "\n\n" + text(record["input"], "'input'")
    parsed = [{"role": "system", "content": text(record["system"], "'system'")}] if record.get("system") else []
    parsed.append({"role": "user", "content": prompt})
    answer = {"role": "assistant", "content": text(record["output"], "'output'")}
    if record.get("reasoning") is not None:
        answer["reasoning"] = text(record["reasoning"], "'reasoning'")
    parsed.append(answer)
    return parsed


def parse_record(record, where: str, replace_surrogates: bool = False) -> list[dict]:
    """The conversation of one record as ``[{"role", "content", "reasoning"?}]``; RecordError
    naming ``where`` (``file:line``) and the fault otherwise. ``replace_surrogates``: lone
    surrogates become U+FFFD instead of making the record bad."""
    if not isinstance(record, dict):
        raise RecordError(where, "invalid_json", f"a record must be a JSON object, got {type(record).__name__}")
    text = _TextFields(where, replace_surrogates)
    if "messages" in record:
        parsed = _chat_messages(record, where, text)
    elif "instruction" in record or "output" in record:
        parsed = _instruction_messages(record, where, text)
    else:
        raise RecordError(
            where, "missing_key", "expected 'messages' (chat format) or 'instruction'/'output' (instruction format)"
        )
    responses = [m for m in parsed if m["role"] == "assistant"]
    if not responses:
        raise RecordError(where, "invalid_record", "no assistant message: nothing to learn")
    if not any(m["content"].strip() or m.get("reasoning", "").strip() for m in responses):
        raise RecordError(where, "empty_document", "every assistant message is empty: nothing to learn")
    return parsed


def parse_sft_line(line: bytes | None, where: str, replace_surrogates: bool = False) -> list[dict]:
    """The conversation of one JSONL line (None: a line over the size limit); RecordError otherwise."""
    if line is None:
        raise RecordError(where, "too_large", f"over {_MAX_LINE_BYTES} bytes")
    record, reason = load_json_object(line)
    if reason is not None:
        raise RecordError(where, reason)
    return parse_record(record, where, replace_surrogates)


class ChatTemplate:
    """Renders conversations to token ids and a 0/1 loss mask (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.markers = {}
        for marker, plain in PLAIN_TEXT_MARKERS.items():
            try:
                self.markers[marker] = [tokenizer.token_to_id(marker)]
            except KeyError:
                self.markers[marker] = tokenizer.tokenize(plain)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        tokens, mask = [], []

        def add(ids, loss):
            tokens.extend(ids)
            mask.extend([loss] * len(ids))

        if self.tokenizer.bos is not None:
            add([self.tokenizer.bos], 0)
        for message in messages:
            response = int(message["role"] == "assistant")
            add(self.markers[ROLE_MARKERS[message["role"]]], 0)
            if "reasoning" in message:
                add(
                    self.markers[THINK_START] + self.tokenizer.tokenize(message["reasoning"]) + self.markers[THINK_END],
                    1,
                )
            add(self.tokenizer.tokenize(message["content"]) + self.markers[END_MARKER], response)
        if add_generation_prompt:
            add(self.markers[ROLE_MARKERS["assistant"]], 0)
        elif self.tokenizer.eod is not None:
            add([self.tokenizer.eod], int(messages[-1]["role"] == "assistant"))
        return tokens, mask

    @property
    def end_ids(self) -> list[int]:
        """Ids that end an assistant turn (for generation)."""
        return self.markers[END_MARKER][-1:] + ([self.tokenizer.eod] if self.tokenizer.eod is not None else [])


def read_conversations(path: str, skipped: SkipCounter | None = None, replace_surrogates: bool = False):
    """Yield ``(line_number, messages, consumed_bytes)`` for every usable line of a JSONL file
    (``consumed_bytes``: bytes read since the previous yield, for progress). Bad lines go to
    ``skipped`` (blank ones too); without it, blank lines are passed over and any other bad line
    raises RecordError naming ``file:line``."""
    byte_range = ByteRange(path, 0, None, os.path.getsize(path))
    consumed_since_yield = 0
    for line_number, (line, consumed) in enumerate(read_lines(byte_range, _MAX_LINE_BYTES), start=1):
        consumed_since_yield += consumed
        try:
            messages = parse_sft_line(line, f"{path}:{line_number}", replace_surrogates)
        except RecordError as error:
            if skipped is not None:
                skipped.add(error.reason, path, line_number, error.detail)
            elif error.reason != "blank_line":
                raise
            continue
        yield line_number, messages, consumed_since_yield
        consumed_since_yield = 0


def tokenize_jsonl(path: str, template: ChatTemplate) -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_sample(template, messages) for _, messages, _ in read_conversations(path)]


def render_sample(template: ChatTemplate, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """One conversation as the (tokens, 0/1 loss mask) arrays the datasets hold."""
    tokens, mask = template.render(messages)
    return np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def write_sft_dataset(samples, output_prefix: str, vocab_size: int) -> tuple[int, int]:
    """Write (tokens, mask) samples as the two indexed datasets of ``output_prefix``, each under
    temporary names until complete (an exception in ``samples`` leaves no output and any previous
    one in place). Returns (samples, tokens)."""
    count = total = 0
    # The inner (mask) writer is published first and the tokens' .idx, which --data-path checks,
    # last; a previous tokens .idx goes before either, so that it never pairs with the new mask.
    with IndexedDatasetWriter(output_prefix, token_dtype(vocab_size)) as tokens_out:
        with IndexedDatasetWriter(output_prefix + LOSS_MASK_SUFFIX, np.uint8) as masks:
            for tokens, mask in samples:
                tokens_out.write_tokens(np.asarray(tokens, dtype=tokens_out.dtype))
                masks.write_tokens(np.asarray(mask, dtype=np.uint8))
                tokens_out.add_documents([len(tokens)])
                masks.add_documents([len(tokens)])
                count, total = count + 1, total + len(tokens)
            remove_if_exists(idx_path(output_prefix))
    return count, total


def read_sft_dataset(prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (tokens, mask) samples of a dataset written by :func:`write_sft_dataset` (memory-mapped)."""
    mask_prefix = prefix + LOSS_MASK_SUFFIX
    if not os.path.isfile(idx_path(mask_prefix)):
        raise BadInputError(f"{prefix}: no {idx_path(mask_prefix)}; SFT data must come from tools/preprocess_sft.py")
    arrays = []
    for part in (prefix, mask_prefix):
        index = read_index(idx_path(part))
        data = np.memmap(bin_path(part), dtype=index.dtype, mode="r")
        starts = index.sequence_pointers // index.dtype.itemsize
        arrays.append([data[s : s + n] for s, n in zip(starts, index.sequence_lengths)])
    if [len(t) for t in arrays[0]] != [len(m) for m in arrays[1]]:
        raise BadInputError(f"{prefix}: tokens and {LOSS_MASK_SUFFIX} datasets do not match sample for sample")
    return list(zip(*arrays))


def load_samples(paths: list[str], tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    template = ChatTemplate(tokenizer)
    samples = []
    for path in paths:
        samples.extend(tokenize_jsonl(path, template) if is_jsonl(path) else read_sft_dataset(path))
    return samples


def pack(lengths: list[int], seq_length: int, open_bins: int = 64) -> list[list[int]]:
    """First-fit packing of samples (lengths in next-token pairs, at most seq_length) into bins of
    seq_length, looking back over the last ``open_bins`` bins (linear time, near-full bins)."""
    bins, room = [], []
    for sample, length in enumerate(lengths):
        first_open = max(0, len(bins) - open_bins)
        for i in range(first_open, len(bins)):
            if room[i] >= length:
                bins[i].append(sample)
                room[i] -= length
                break
        else:
            bins.append([sample])
            room.append(seq_length - length)
    return bins


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packed sequences of fine-tuning samples; ``num_samples`` beyond one epoch repeats the
    sequences in a new order each epoch (as megatron's GPTDataset). Items hold ``tokens``,
    ``labels``, ``loss_mask`` and ``segment_ids`` of ``seq_length`` positions."""

    def __init__(self, samples, seq_length: int, pad_id: int, seed: int, num_samples: int = 0, packing: bool = True):
        self.samples, self.seq_length, self.pad_id, self.seed = samples, seq_length, pad_id, seed
        lengths = [min(len(tokens) - 1, seq_length) for tokens, _ in samples]
        self.truncated = sum(len(tokens) - 1 > seq_length for tokens, _ in samples)
        self.bins = pack(lengths, seq_length) if packing else [[i] for i in range(len(samples))]
        self.num_samples = max(num_samples, len(self.bins))

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        epoch, position = divmod(index, len(self.bins))
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.bins))
        tokens = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(self.seq_length, dtype=np.float32)
        segment_ids = np.full(self.seq_length, len(self.bins[order[position]]), dtype=np.int64)  # padding: its own
        start = 0
        for segment, sample in enumerate(self.bins[order[position]]):
            sample_tokens, sample_mask = self.samples[sample]
            length = min(len(sample_tokens) - 1, self.seq_length)
            end = start + length
            tokens[start:end] = sample_tokens[:length]
            labels[start:end] = sample_tokens[1 : length + 1]
            loss_mask[start:end] = sample_mask[1 : length + 1]
            segment_ids[start:end] = segment
            start = end
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "segment_ids": segment_ids}


def packed_attention_inputs(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attention_mask, position_ids)`` of packed sequences [b, s]: megatron's mask [b, 1, s, s]
    (True = masked: later positions and other samples) and positions counted from each sample's start."""
    length = segment_ids.shape[1]
    same_sample = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    attention_mask = ~(same_sample & causal)
    positions = torch.arange(length, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    sample_start = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return attention_mask[:, None], positions - sample_start


def split_samples(samples: list, split: str, seed: int) -> tuple[list, list]:
    """(train, valid) by the first two --split weights, after a seeded shuffle."""
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    order = np.random.default_rng(seed).permutation(len(samples))
    n_train = int(round(len(samples) * weights[0] / sum(weights)))
    n_valid = int(round(len(samples) * weights[1] / sum(weights)))
    train = [samples[i] for i in order[:n_train]]
    valid = [samples[i] for i in order[n_train : n_train + n_valid]]
    return train, valid


def build_sft_datasets(args, tokenizer, train_samples: int, eval_samples: int, paths=None, split=None):
    """(train, valid) PackedSFTDatasets from `paths` (default --data-path) split by `split`
    (default --split); valid is None when the split leaves no validation sample."""
    paths = paths or args.data_path
    samples = load_samples(paths, tokenizer)
    if not samples:
        raise BadInputError(f"{' '.join(paths)}: no samples")
    train, valid = split_samples(samples, split or args.split, args.seed)
    pad = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
    packing = not args.no_pack_sequences
    train_set = PackedSFTDataset(train, args.seq_length, pad, args.seed, train_samples, packing)
    valid_set = PackedSFTDataset(valid, args.seq_length, pad, args.seed + 1, eval_samples, packing) if valid else None
    return train_set, valid_set
