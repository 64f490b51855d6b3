"""The tokenizer used by training and by every tool: :func:`build_tokenizer` is the one factory.

The types are named as in Megatron-LM's ``--tokenizer-type``:

``SentencePieceTokenizer`` (also ``GPTSentencePieceTokenizer``)
    ``--tokenizer-model`` is a SentencePiece ``.model`` file. Models trained by
    :func:`train_sentencepiece` (``tools/train_tokenizer.py``) follow these conventions:

    ======  ===================  ==========================================================
    id      piece                role
    ======  ===================  ==========================================================
    0       ``<pad>``            ``pad``: padding of batches
    1       ``<unk>``            unknown (never produced: byte fallback covers every input)
    2       ``<s>``              ``bos``
    3       ``</s>``             ``eod``: end of document, appended by ``--append-eod``
    4..10   SPECIAL_TOKENS       ``<think>`` ``</think>`` ``<|system|>`` ``<|user|>``
                                 ``<|assistant|>`` ``<|tool|>`` ``<|end|>`` (user-defined:
                                 matched verbatim anywhere in text, always as one id;
                                 ``--user-defined-symbols`` replaces the list)
    then    ``<0x00>``..``<0xFF>``  byte fallback, then the BPE vocabulary
    ======  ===================  ==========================================================

    Other SentencePiece models work too: ``eod`` is their eos piece, ``pad`` their pad piece or,
    when they have none, ``eod`` (padding is masked out, so any valid id serves). These are the
    semantics of Megatron-LM's ``GPTSentencePieceTokenizer``; its ``SentencePieceTokenizer`` (made
    for BERT/T5) instead appends ``<CLS>``/``<SEP>``/``<EOD>``/``<MASK>`` ids to the vocabulary and
    ends documents with that new ``<EOD>``.

``Llama2Tokenizer``
    A SentencePiece model as above whose pre-training documents start with the model's bos piece,
    as Megatron-LM's preprocessing writes them (chat samples and prompts are tokenized as above).

``HuggingFaceTokenizer``
    ``--tokenizer-model`` is a directory holding ``tokenizer.json`` (or that file itself), read
    with the optional ``tokenizers`` package (``pip install tokenizers``). ``eod``/``bos``/``pad``
    come from ``tokenizer_config.json``'s ``eos_token``/``bos_token``/``pad_token`` when that file
    is beside it, otherwise from well-known token names (``</s>``, ``<|endoftext|>``, DeepSeek's
    ``<｜end▁of▁sentence｜>`` ...); ``pad`` falls back to ``eod``; a role with no token is None.
    Text is encoded without the post-processor's added specials (no automatic bos/eos), as for
    pre-training data.

``NullTokenizer``
    No model: the text is already token ids, integers separated by spaces, and ``--vocab-size N``
    gives the vocabulary, ids ``0..N-1`` with ``N-1`` ending documents (Megatron-LM's). With
    ``--mock-data`` and no ``--tokenizer-model``, training uses it.

``vocab_size`` is the real vocabulary; :meth:`Tokenizer.padded_vocab_size` is the embedding size,
padded as Megatron-LM's ``_vocab_size_with_padding`` does.
"""

from __future__ import annotations

import argparse
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable

from megatron_r1.data.files import remove_if_exists, temporary_path

# The user-defined special tokens of models trained by tools/train_tokenizer.py, in id order from 4:
# the R1 reasoning delimiters and the chat-template role markers.
SPECIAL_TOKENS = ("<think>", "</think>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")

# Ids and pieces the trainer assigns (see the module docstring).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"

# Types that read a --tokenizer-model, and all types (NullTokenizer reads token ids, no model).
MODEL_TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
)
TOKENIZER_TYPES = (*MODEL_TOKENIZER_TYPES, "NullTokenizer")

# SentencePiece's own default limit on a training sentence (bytes); it ignores longer ones.
DEFAULT_MAX_SENTENCE_BYTES = 4192


def vocab_size_with_padding(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Smallest multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size`` >= vocab_size.

    The embedding table is split across tensor-parallel ranks, so every rank must get an equal,
    aligned share; this is Megatron-LM's ``_vocab_size_with_padding``.
    """
    if make_vocab_size_divisible_by < 1 or tensor_model_parallel_size < 1:
        raise ValueError(
            f"make_vocab_size_divisible_by ({make_vocab_size_divisible_by}) and tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) must be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


class Tokenizer(ABC):
    """Common interface: ids of the special roles, text <-> ids, special tokens by name."""

    vocab_size: int
    eod: int | None
    pad: int | None
    bos: int | None
    document_start: tuple[int, ...] = ()  # ids that begin every pre-training document (tools/preprocess_data.py)

    def padded_vocab_size(self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> int:
        return vocab_size_with_padding(self.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size)

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without added bos/eos."""

    @abstractmethod
    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """``tokenize`` of many texts in one native call (no per-text Python overhead)."""

    @abstractmethod
    def detokenize(self, ids) -> str:
        """Text of the token ids."""

    @abstractmethod
    def token_to_id(self, token: str) -> int:
        """The id of a single vocabulary entry such as ``"<think>"``; KeyError when it has none."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special tokens present in this vocabulary, by name."""


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str):
        import sentencepiece

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = _valid_id(self._sp.eos_id())
        self.bos = _valid_id(self._sp.bos_id())
        pad = _valid_id(self._sp.pad_id())
        self.pad = pad if pad is not None else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: callers parallelise with processes, and extra threads would oversubscribe.
        return self._sp.encode(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int:
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            raise KeyError(f"{token!r} is not a piece of {self.model_file}")
        return token_id

    @property
    def special_tokens(self) -> dict[str, int]:
        specials = {
            self._sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }
        for token in SPECIAL_TOKENS:
            try:
                specials[token] = self.token_to_id(token)
            except KeyError:
                pass
        return specials


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's Llama2Tokenizer: pre-training documents start with bos."""

    def __init__(self, model_file: str):
        super().__init__(model_file)
        if self.bos is None:
            raise ValueError(f"--tokenizer-type Llama2Tokenizer: {model_file} has no bos piece to start documents with")
        self.document_start = (self.bos,)


class NullTokenizer(Tokenizer):
    """Text that is already token ids ("17 4 2051"); ids 0..vocab_size-1, the last ends documents."""

    def __init__(self, vocab_size: int | None):
        if vocab_size is None or vocab_size < 2:
            raise ValueError(f"--tokenizer-type NullTokenizer needs --vocab-size N (at least 2), got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.bos = self.pad = None

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if not (word.isascii() and word.isdigit()) or int(word) >= self.vocab_size:
                raise ValueError(
                    f"NullTokenizer: {word[:40]!r} is not a token id below --vocab-size {self.vocab_size} "
                    f"(its input is integers separated by spaces)"
                )
            ids.append(int(word))
        return ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def token_to_id(self, token: str) -> int:
        raise KeyError(f"{token!r}: NullTokenizer has ids only, no named tokens")

    @property
    def special_tokens(self) -> dict[str, int]:
        return {}


# Well-known names, tried in order when tokenizer_config.json does not say.
_HF_ROLE_CANDIDATES = {
    "eos_token": ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>"),
    "bos_token": ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|bos|>"),
    "pad_token": ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]"),
}


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(
                "--tokenizer-type HuggingFaceTokenizer needs the optional 'tokenizers' package: pip install tokenizers"
            ) from error
        tokenizer_json = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.model_file = tokenizer_json
        self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_json)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        config = _read_tokenizer_config(os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json"))
        self.eod = self._role_id(config, "eos_token")
        self.bos = self._role_id(config, "bos_token")
        pad = self._role_id(config, "pad_token")
        self.pad = pad if pad is not None else self.eod

    def _role_id(self, config: dict, role: str) -> int | None:
        configured = config.get(role)
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str):
            return self.token_to_id(configured)
        for name in _HF_ROLE_CANDIDATES[role]:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary of {self.model_file}")
        return token_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return {
            added.content: token_id
            for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
            if added.special
        }


def _valid_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _read_tokenizer_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as config_file:
        try:
            return json.load(config_file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from error


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of the given ``--tokenizer-type`` loaded from ``--tokenizer-model`` (NullTokenizer:
    sized by ``--vocab-size``, no model)."""
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type in MODEL_TOKENIZER_TYPES and not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def tokenizer_type_for_model(requested: str | None, saved: str | None) -> str:
    """The type of a --tokenizer-model handed to a tool for a checkpoint: the requested one, else
    the checkpoint's unless that reads no model (NullTokenizer), else the default."""
    if requested:
        return requested
    return saved if saved in MODEL_TOKENIZER_TYPES else "SentencePieceTokenizer"


def train_sentencepiece(
    sentences: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    character_coverage: float = 0.9999,
    user_defined_symbols: Iterable[str] = SPECIAL_TOKENS,
    max_sentence_bytes: int = DEFAULT_MAX_SENTENCE_BYTES,
    num_threads: int = 1,
    verbose: bool = False,
) -> SentencePieceTokenizer:
    """Train a BPE model with this module's conventions on ``sentences`` (one training line each;
    longer than ``max_sentence_bytes`` is ignored by SentencePiece) and publish
    ``output_prefix.model``/``.vocab``, each only when complete. RuntimeError from SentencePiece
    when the settings are impossible (e.g. fewer pieces than required characters)."""
    import sentencepiece

    temporary_prefix = temporary_path(output_prefix)
    sample_path = temporary_prefix + ".sample.txt"
    try:
        with open(sample_path, "w", encoding="utf-8") as sample:
            for sentence in sentences:
                # One sentence per line: line breaks inside would split it.
                sample.write(sentence.replace("\r", " ").replace("\n", " ") + "\n")
        sentencepiece.SentencePieceTrainer.train(
            input=sample_path,
            model_prefix=temporary_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            user_defined_symbols=list(user_defined_symbols),
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=PAD_PIECE,
            unk_piece=UNK_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            # Keep text exactly (no NFKC, whitespace kept): detokenize(tokenize(x)) == x, code indentation survives.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # A small corpus may not support the requested size; train what it supports.
            hard_vocab_limit=False,
            max_sentence_length=max_sentence_bytes,
            input_sentence_size=0,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
        os.replace(temporary_prefix + ".vocab", output_prefix + ".vocab")
        os.replace(temporary_prefix + ".model", output_prefix + ".model")
    finally:
        for path in (sample_path, temporary_prefix + ".model", temporary_prefix + ".vocab"):
            remove_if_exists(path)
    return SentencePieceTokenizer(output_prefix + ".model")


def add_tokenizer_arguments(parser: argparse.ArgumentParser, required: bool = True, types=TOKENIZER_TYPES) -> None:
    """``--tokenizer-type`` and ``--tokenizer-model`` (and, where NullTokenizer is among ``types``,
    its ``--vocab-size``), spelled as in Megatron-LM. ``required``: a tokenizer must be given; with
    NullTokenizer allowed the model is then checked after parsing (:func:`tokenizer_arguments_error`)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        default="SentencePieceTokenizer",
        choices=types,
        help="Tokenizer implementation (default: %(default)s).",
    )
    group.add_argument(
        "--tokenizer-model",
        required=required and "NullTokenizer" not in types,
        help="SentencePiece .model file, or for HuggingFaceTokenizer a directory with tokenizer.json.",
    )
    if "NullTokenizer" in types:
        group.add_argument(
            "--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary: ids 0..N-1, N-1 ends documents"
        )


def tokenizer_arguments_error(args) -> str | None:
    """What is missing for the parsed tokenizer flags to name a tokenizer, or None."""
    if args.tokenizer_type == "NullTokenizer":
        return None if args.vocab_size else "--tokenizer-type NullTokenizer needs --vocab-size N"
    return None if args.tokenizer_model else f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model"
