import json
import os
import sys

import pytest
import sentencepiece

from megatron_r1.tokenizer import SPECIAL_TOKENS, build_tokenizer, train_sentencepiece, vocab_size_with_padding

CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "megatron_r1", "assets", "tiny_corpus.jsonl")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    with open(CORPUS, encoding="utf-8") as corpus:
        lines = [line for record in corpus for line in json.loads(record)["text"].split("\n") if line.strip()]
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "sp")
    train_sentencepiece(lines, prefix, vocab_size=3000)
    return prefix + ".model"


@pytest.mark.parametrize(
    "vocab_size, divisible_by, tensor_parallel, expected",
    [
        (4000, 128, 1, 4096),
        (4096, 128, 1, 4096),
        (4097, 128, 2, 4352),
        (50257, 128, 8, 51200),
        (1, 1, 1, 1),
        (129280, 128, 4, 129536),
    ],
)
def test_vocab_padding_is_the_next_multiple_of_divisible_by_times_tp(
    vocab_size, divisible_by, tensor_parallel, expected
):
    assert vocab_size_with_padding(vocab_size, divisible_by, tensor_parallel) == expected


def test_vocab_padding_rejects_nonpositive_settings():
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by"):
        vocab_size_with_padding(100, 0, 1)


def test_trained_model_follows_the_documented_special_token_conventions(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    assert [processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eod) == (0, 2, 3)
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert tokenizer.special_tokens["<think>"] == 4 and tokenizer.special_tokens["</s>"] == 3
    assert tokenizer.vocab_size == processor.get_piece_size() == 3000
    assert tokenizer.padded_vocab_size(128, 2) == 3072


def test_special_tokens_are_single_tokens_in_text_and_text_round_trips_exactly(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    text = "<|user|>2+2?<|end|><|assistant|><think>四 = 4 🙂 \tdef f():\n    return 1</think>"
    ids = tokenizer.tokenize(text)
    for token in ("<|user|>", "<|end|>", "<|assistant|>", "<think>", "</think>"):
        assert tokenizer.token_to_id(token) in ids
    assert 1 not in ids  # byte fallback: nothing is unknown, not even the emoji
    assert tokenizer.detokenize(ids) == text
    digits = tokenizer.tokenize("x 12345")
    assert [tokenizer.detokenize([i]).strip() for i in digits[-5:]] == list("12345")  # digits are split


def test_tokenize_batch_equals_tokenize(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    texts = ["hello world", "你好，世界", "  indented\ncode", "<think>"]
    assert tokenizer.tokenize_batch(texts) == [tokenizer.tokenize(text) for text in texts]


def test_megatron_lm_sentencepiece_type_names_follow_its_bos_and_eod_conventions(sp_model):
    """GPTSentencePieceTokenizer is this SentencePieceTokenizer; Llama2Tokenizer's pre-training
    documents start with bos (tests/tools/test_preprocess_data.py), its texts tokenize alike."""
    plain = build_tokenizer("SentencePieceTokenizer", sp_model)
    gpt = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    llama = build_tokenizer("Llama2Tokenizer", sp_model)
    texts = ["hello world", "你好"]
    assert gpt.tokenize_batch(texts) == plain.tokenize_batch(texts) == llama.tokenize_batch(texts)
    assert (plain.document_start, gpt.document_start, llama.document_start) == ((), (), (plain.bos,))
    assert (llama.eod, llama.vocab_size) == (plain.eod, plain.vocab_size)


def test_a_tool_given_a_model_reads_it_with_the_requested_or_saved_type():
    from megatron_r1.tokenizer import tokenizer_type_for_model

    assert tokenizer_type_for_model("Llama2Tokenizer", "HuggingFaceTokenizer") == "Llama2Tokenizer"
    assert tokenizer_type_for_model(None, "HuggingFaceTokenizer") == "HuggingFaceTokenizer"
    assert tokenizer_type_for_model(None, "NullTokenizer") == "SentencePieceTokenizer"  # a mock-data checkpoint


def test_null_tokenizer_reads_ids_and_ends_documents_with_the_last_id():
    tokenizer = build_tokenizer("NullTokenizer", None, vocab_size=100)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (100, 99, None)
    assert tokenizer.tokenize("17 4  2\n51") == [17, 4, 2, 51]
    assert tokenizer.detokenize([17, 4]) == "17 4"
    for text in ("17 x", "100", "-3", "²"):
        with pytest.raises(ValueError, match="not a token id below --vocab-size 100"):
            tokenizer.tokenize(text)
    with pytest.raises(ValueError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer", None)


def test_unknown_token_type_and_missing_model_are_clear_errors(sp_model, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type Llama2Tokenizer needs --tokenizer-model"):
        build_tokenizer("Llama2Tokenizer", None)
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer' is not supported"):
        build_tokenizer("GPT2BPETokenizer", sp_model)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(KeyError, match="<nope>"):
        build_tokenizer("SentencePieceTokenizer", sp_model).token_to_id("<nope>")


def test_impossible_training_settings_fail_and_leave_no_files(tmp_path):
    lines = [f"字{chr(0x4E00 + i)}{chr(0x4E00 + 2 * i)} word{i}" for i in range(600)]
    with pytest.raises(RuntimeError, match="required_chars"):
        train_sentencepiece(lines, str(tmp_path / "tiny"), vocab_size=300)
    assert os.listdir(tmp_path) == []


def _write_hf_tokenizer(directory, with_config):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["[UNK]", "<|endoftext|>", "<pad>", "<think>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(
        ["hello world, hello tokens", "the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer
    )
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    if with_config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": {"content": "<think>"}, "pad_token": "<pad>"})
        )
    return tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))


def test_hugging_face_tokenizer_json_directory(tmp_path):
    reference = _write_hf_tokenizer(tmp_path / "hf", with_config=False)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    text = "hello brown fox<think>"
    assert tokenizer.tokenize(text) == reference.encode(text, add_special_tokens=False).ids
    assert tokenizer.tokenize_batch([text, "dog"]) == [tokenizer.tokenize(text), tokenizer.tokenize("dog")]
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    # Without tokenizer_config.json the roles come from well-known names; there is no bos token.
    assert tokenizer.eod == reference.token_to_id("<|endoftext|>")
    assert tokenizer.pad == reference.token_to_id("<pad>")
    assert tokenizer.bos is None
    assert tokenizer.special_tokens["<think>"] == reference.token_to_id("<think>")
    assert (
        tokenizer.padded_vocab_size(64, 2) % 128 == 0
        and 0 <= tokenizer.padded_vocab_size(64, 2) - tokenizer.vocab_size < 128
    )
    # The tokenizer.json file itself is accepted too.
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf" / "tokenizer.json")).tokenize(
        text
    ) == tokenizer.tokenize(text)


def test_hugging_face_roles_come_from_tokenizer_config_when_present(tmp_path):
    reference = _write_hf_tokenizer(tmp_path / "hf", with_config=True)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    assert tokenizer.eod == reference.token_to_id("<think>")
    assert tokenizer.pad == reference.token_to_id("<pad>")


def test_hugging_face_without_the_tokenizers_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
