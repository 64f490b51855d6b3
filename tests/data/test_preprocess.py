import json
import os

import pytest
import sentencepiece
from bad_input import corpus_records, good_corpus_records, jsonl_lines, write_line_file
from hypothesis import example, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_r1.data.indexed import IndexedDatasetWriter
from megatron_r1.data.jsonl import BadInputError
from megatron_r1.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
from megatron_r1.tokenizer import SentencePieceTokenizer, train_sentencepiece

CORPUS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "megatron_r1", "assets", "tiny_corpus.jsonl"
)


@pytest.fixture(scope="module")
def corpus_texts():
    with open(CORPUS, encoding="utf-8") as corpus:
        return [json.loads(line)["text"] for line in corpus]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus_texts):
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "sp")
    train_sentencepiece(
        (line for text in corpus_texts[:400] for line in text.split("\n") if line.strip()),
        prefix,
        vocab_size=2500,
        character_coverage=0.999,
    )
    return prefix + ".model"


@pytest.fixture()
def two_key_input(tmp_path, corpus_texts):
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as output:
        for index, text in enumerate(corpus_texts[:300]):
            output.write(json.dumps({"text": text, "title": f"<|user|> document {index}"}, ensure_ascii=False) + "\n")
    return str(path)


def files_of(prefix):
    return {suffix: open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")}


def config(input_path, output_prefix, model, **overrides):
    return PreprocessConfig([input_path], output_prefix, "SentencePieceTokenizer", model, **overrides)


def test_two_workers_and_small_ranges_give_the_same_bytes_as_one_worker(tmp_path, sp_model, two_key_input):
    one = preprocess(
        config(two_key_input, str(tmp_path / "one"), sp_model, json_keys=["text", "title"], append_eod=True),
        show_progress=False,
    )
    two = preprocess(
        config(
            two_key_input,
            str(tmp_path / "two"),
            sp_model,
            json_keys=["text", "title"],
            append_eod=True,
            workers=2,
            range_bytes=4096,
        ),
        show_progress=False,
    )
    assert (one.documents, one.tokens) == (two.documents, two.tokens) == (300, one.tokens)
    for key in ("text", "title"):
        assert files_of(output_prefix_for(str(tmp_path / "one"), key)) == files_of(
            output_prefix_for(str(tmp_path / "two"), key)
        )
    titles = IndexedDataset(output_prefix_for(str(tmp_path / "two"), "title"))
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert list(titles[7]) == processor.encode("<|user|> document 7") + [processor.eos_id()]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary files left


def test_partitions_write_contiguous_shards_and_the_same_merged_dataset(tmp_path, sp_model, two_key_input):
    preprocess(config(two_key_input, str(tmp_path / "whole"), sp_model, append_eod=True), show_progress=False)
    result = preprocess(
        config(two_key_input, str(tmp_path / "parts"), sp_model, append_eod=True, partitions=3, workers=2),
        show_progress=False,
    )
    shard_prefixes = [output_prefix_for(str(tmp_path / "parts"), "text", partition) for partition in range(3)]
    assert result.output_prefixes == shard_prefixes + [output_prefix_for(str(tmp_path / "parts"), "text")]
    assert files_of(output_prefix_for(str(tmp_path / "parts"), "text")) == files_of(
        output_prefix_for(str(tmp_path / "whole"), "text")
    )
    whole = IndexedDataset(output_prefix_for(str(tmp_path / "whole"), "text"))
    shards = [IndexedDataset(prefix) for prefix in shard_prefixes]
    assert all(len(shard) > 0 for shard in shards)
    flattened = [list(shard[i]) for shard in shards for i in range(len(shard))]
    assert flattened == [list(whole[i]) for i in range(len(whole))]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_mid_run_leaves_no_output_and_keeps_the_previous_one(
    tmp_path, sp_model, two_key_input, monkeypatch, workers
):
    prefix = str(tmp_path / "out")
    preprocess(config(two_key_input, prefix, sp_model), show_progress=False)
    before = files_of(output_prefix_for(prefix, "text"))
    calls = []
    real_add_documents = IndexedDatasetWriter.add_documents

    def add_documents_then_interrupt(self, lengths):
        calls.append(len(lengths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_add_documents(self, lengths)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", add_documents_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(
            config(two_key_input, prefix, sp_model, append_eod=True, workers=workers, range_bytes=8192),
            show_progress=False,
        )
    assert files_of(output_prefix_for(prefix, "text")) == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_append_eod_needs_a_tokenizer_with_an_end_of_document_token(tmp_path, two_key_input):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf_config = PreprocessConfig(
        [two_key_input], str(tmp_path / "hf"), "HuggingFaceTokenizer", str(tmp_path), append_eod=True
    )
    with pytest.raises(ValueError, match="--append-eod: .* has no end-of-document token"):
        preprocess(hf_config, show_progress=False)
    hf_config.append_eod = False
    result = preprocess(hf_config, show_progress=False)
    assert (
        result.documents == 300
        and IndexedDataset(output_prefix_for(str(tmp_path / "hf"), "text"))[0].dtype.name == "uint16"
    )


def test_documents_that_tokenize_to_nothing_are_skipped_as_empty(tmp_path, monkeypatch, sp_model):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["one", "DROP", "three"]))
    real_tokenize_batch = SentencePieceTokenizer.tokenize_batch

    def tokenize_batch_dropping(self, texts):
        return [[] if text == "DROP" else ids for text, ids in zip(texts, real_tokenize_batch(self, texts))]

    monkeypatch.setattr(SentencePieceTokenizer, "tokenize_batch", tokenize_batch_dropping)
    result = preprocess(config(str(path), str(tmp_path / "out"), sp_model), show_progress=False)
    assert result.documents == 2 and result.skipped.counts == {"empty_document": 1}
    assert result.skipped.examples["empty_document"] == [(str(path), 2)]


@settings(max_examples=25, derandomize=True, deadline=None)
@given(lines=st.lists(jsonl_lines(corpus_records, good_corpus_records), max_size=8), replace_surrogates=st.booleans())
@example(lines=[b'{"text": "lone \\ud800"}', b'{"text": "fine"}'], replace_surrogates=False)  # issue 18's crash
def test_any_input_gives_a_dataset_accounting_for_every_line_or_one_error(
    tmp_path_factory, sp_model, lines, replace_surrogates
):
    directory = tmp_path_factory.mktemp("fuzz")
    expected_lines = write_line_file(directory / "in.jsonl", lines)
    run = config(
        str(directory / "in.jsonl"),
        str(directory / "out"),
        sp_model,
        append_eod=True,
        replace_surrogates=replace_surrogates,
    )
    try:
        result = preprocess(run, show_progress=False)
    except BadInputError as error:
        assert str(error).startswith("no documents to write") and os.listdir(directory) == ["in.jsonl"]
        return
    assert result.documents + result.skipped.total == expected_lines
    assert len(IndexedDataset(output_prefix_for(str(directory / "out"), "text"))) == result.documents
