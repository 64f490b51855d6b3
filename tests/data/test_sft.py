"""megatron_r1.data.sft: template and loss mask, record errors, packing, indexed round trip."""

import json

import numpy as np
import pytest
import torch
from bad_input import good_sft_records, jsonl_lines, sft_records, write_line_file
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sft_task import task_records, train_task_tokenizer, write_jsonl

from megatron_r1.data.jsonl import SKIP_REASONS, BadInputError, SkipCounter
from megatron_r1.data.sft import (
    ChatTemplate,
    PackedSFTDataset,
    RecordError,
    load_samples,
    pack,
    packed_attention_inputs,
    parse_record,
    read_conversations,
    read_sft_dataset,
    render_sample,
    write_sft_dataset,
)
from megatron_r1.tokenizer import SentencePieceTokenizer


class CharTokenizer:
    """One id per character (offset 10), no special tokens: the plain-text fallback markers."""

    bos, eod, pad, vocab_size = 1, 2, 0, 300

    def tokenize(self, text):
        return [10 + ord(c) % 256 for c in text]

    def token_to_id(self, token):
        raise KeyError(token)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return SentencePieceTokenizer(train_task_tokenizer(tmp_path_factory.mktemp("tok")))


def test_loss_mask_covers_exactly_the_responses(tokenizer):
    template = ChatTemplate(tokenizer)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy a b"},
                {"role": "assistant", "content": "a b", "reasoning": "easy"},
                {"role": "user", "content": "reverse a b"}, {"role": "assistant", "content": "b a"}]  # fmt: skip
    tokens, mask = template.render(messages)
    end, think, think_end = (tokenizer.token_to_id(t) for t in ("<|end|>", "<think>", "</think>"))
    expected_response = (
        [think]
        + tokenizer.tokenize("easy")
        + [think_end]
        + tokenizer.tokenize("a b")
        + [end]
        + tokenizer.tokenize("b a")
        + [end, tokenizer.eod]
    )
    assert [t for t, m in zip(tokens, mask) if m] == expected_response
    assert tokens[0] == tokenizer.bos and tokens[1] == tokenizer.token_to_id("<|system|>")
    assert tokenizer.token_to_id("<|assistant|>") in [t for t, m in zip(tokens, mask) if not m]
    assert len(tokens) == len(mask)


def test_plain_text_markers_without_special_tokens():
    tokens, mask = ChatTemplate(CharTokenizer()).render(parse_record({"instruction": "hi", "output": "yo"}, "x:1"))
    text = "".join(chr(t - 10) for t in tokens[1:-1])
    assert text == "User: hi\n\nAssistant: yo\n\n"
    assert "".join(chr(t - 10) for t, m in zip(tokens, mask) if m and t >= 10) == "yo\n\n" and mask[-1] == 1


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x"}', "lacks 'output'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "content is a number"),
    ('not json', "invalid_json"),
])  # fmt: skip
def test_malformed_record_names_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n\n" + line + "\n")
    with pytest.raises(BadInputError, match=rf"{path}:3: .*{message}"):
        load_samples([str(path)], tokenizer)


def test_packing_keeps_labels_masks_and_attention_within_samples(tmp_path, tokenizer):
    samples = load_samples([write_jsonl(tmp_path / "d.jsonl", task_records("copy", 30, 1))], tokenizer)
    dataset = PackedSFTDataset(samples, seq_length=64, pad_id=0, seed=3)
    assert len(dataset.bins) < len(samples) and sorted(i for b in dataset.bins for i in b) == list(range(len(samples)))
    order = np.random.default_rng(3).permutation(len(dataset.bins))
    for position in range(len(dataset.bins)):
        item = dataset[position]
        seg = torch.as_tensor(item["segment_ids"])[None]
        mask, positions = packed_attention_inputs(seg)
        allowed = ~mask[0, 0]
        start = 0
        for index in dataset.bins[order[position]]:
            tokens, response = samples[index]
            n = len(tokens) - 1
            assert list(item["tokens"][start : start + n]) == list(tokens[:-1])
            # the masked labels are exactly this sample's response tokens
            labels = item["labels"][start : start + n][item["loss_mask"][start : start + n] == 1]
            assert list(labels) == [t for t, m in zip(tokens, response) if m]
            assert list(positions[0, start : start + n]) == list(range(n))
            block = allowed[start : start + n]
            assert torch.equal(block[:, start : start + n], torch.ones(n, n, dtype=torch.bool).tril())
            assert not block[:, :start].any() and not block[:, start + n :].any()
            start += n
        assert not item["loss_mask"][start:].any()


def test_first_fit_packing_fills_bins():
    assert pack([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]


def test_indexed_round_trip(tmp_path, tokenizer):
    samples = load_samples([write_jsonl(tmp_path / "d.jsonl", task_records("reverse", 20, 2))], tokenizer)
    assert write_sft_dataset(samples, str(tmp_path / "sft"), tokenizer.vocab_size) == (
        20,
        sum(len(t) for t, _ in samples),
    )
    again = read_sft_dataset(str(tmp_path / "sft"))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(samples, again))


LONE_SURROGATE_CHAT = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a \\ud800"}]}'


@settings(max_examples=40, derandomize=True, deadline=None)
@given(lines=st.lists(jsonl_lines(sft_records, good_sft_records), max_size=8), replace_surrogates=st.booleans())
@example(lines=[LONE_SURROGATE_CHAT], replace_surrogates=False)  # issue 18's crash in the tokenizer
@example(lines=[LONE_SURROGATE_CHAT], replace_surrogates=True)
def test_any_sft_input_renders_or_is_counted_and_fails_only_with_file_and_line(
    tmp_path_factory, tokenizer, lines, replace_surrogates
):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    expected_lines = write_line_file(path, lines)
    template, skipped = ChatTemplate(tokenizer), SkipCounter()
    rendered = [
        render_sample(template, messages)
        for _, messages, _ in read_conversations(str(path), skipped, replace_surrogates)
    ]
    assert len(rendered) + skipped.total == expected_lines and set(skipped.counts) <= set(SKIP_REASONS)
    assert not (replace_surrogates and "lone_surrogate" in skipped.counts)
    # Without a counter (finetune_r1.py's .jsonl --data-path) the first bad line is one error naming it.
    try:
        for _ in read_conversations(str(path), replace_surrogates=replace_surrogates):
            pass
    except RecordError as error:
        assert str(error).startswith(f"{path}:") and error.reason != "blank_line"
