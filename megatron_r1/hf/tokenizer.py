"""Our SentencePiece model as Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``)
that ``AutoTokenizer.from_pretrained`` loads as a fast tokenizer, alike under transformers 4.57 and 5.x.

The files are built here with the ``tokenizers`` library, not by transformers' converter (which 5.x no
longer runs from a ``vocab_file``), and name the generic ``PreTrainedTokenizerFast`` class: both
versions then take ``tokenizer.json`` as it is, where a Llama tokenizer class would rebuild it (4.57
from the SentencePiece model, 5.x with a Metaspace pre-tokenizer that adds no "▁" before leading spaces).

The BPE model holds the SentencePiece pieces with their ids and, as merges, every split of a piece into
two pieces, those of higher-scoring pieces first (then of longer left parts): the order in which
SentencePiece's BPE merges (transformers 4.57's converter made the same merges). Unknown characters
fall back to bytes. Our symbols (``<think>``, ``<|user|>`` ...) and the control pieces are matched in
the raw text first; each text between them is encoded as SentencePiece encodes a text alone (spaces as
"▁", the dummy prefix "▁" at its start). That is how the fine-tuning chat template
(megatron_r1/data/sft.py) renders a conversation, symbol ids around each turn's encoded text, so a
served model gets the ids it was trained on from the rendered string. Plain text encodes exactly as
SentencePiece encodes it; a text with a symbol inside differs from SentencePiece's encoding of the whole
text next to the symbol (a "▁" after it, none before it at the start), and decodes with a space after a
symbol.
"""

import json
import os

from megatron_r1.tokenizer import SentencePieceTokenizer


def _vocab_and_merges(model_file: str) -> tuple[dict, list]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, piece_id in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, sp.get_score(piece_id)) for left, right in splits]
    # Stable: ties keep the order above.
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return vocab, [(left, right) for left, right, _ in merges]


def _fast_tokenizer(model_file: str, unk_token: str | None, roles: set, symbols: list):
    """The ``tokenizers.Tokenizer``: `roles` (bos, eos, pad, unk) special, `symbols` plain; both are
    matched in the raw text first, and each text between them gets SentencePiece's dummy prefix."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges(model_file)
    fast = Tokenizer(BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # Pre-training documents carry no bos (eod ends them): no post-processor adds one.
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in sorted(roles)])
    fast.add_tokens([AddedToken(name, normalized=False) for name in symbols])
    return fast


def save_hf_tokenizer(tokenizer: SentencePieceTokenizer, directory: str, model_max_length: int) -> None:
    specials = tokenizer.special_tokens
    piece = {token_id: name for name, token_id in specials.items()}
    roles = {
        "bos_token": piece.get(tokenizer.bos),
        "eos_token": piece.get(tokenizer.eod),
        "pad_token": piece.get(tokenizer.pad),
        "unk_token": "<unk>" if "<unk>" in specials else None,
    }
    role_names = {name for name in roles.values() if name is not None}
    symbols = [name for name in specials if name not in role_names]
    fast = _fast_tokenizer(tokenizer.model_file, roles["unk_token"], role_names, symbols)
    fast.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **{role: name for role, name in roles.items() if name}}  # fmt: skip
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
