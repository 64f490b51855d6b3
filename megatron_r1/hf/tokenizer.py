"""Our SentencePiece model as Hugging Face tokenizer files (``tokenizer.json`` and friends) that
``AutoTokenizer.from_pretrained`` loads as a fast tokenizer.

transformers' Llama converter reads the SentencePiece BPE model (byte fallback, dummy-prefix "▁")
and gives the same ids on ordinary text and the same text back from any ids. One difference stays:
SentencePiece matches our user-defined symbols (``<think>``, ``<|user|>`` ...) inside its own
segmentation, transformers splits the text at them first, so the pieces right next to such a symbol
can differ (e.g. a "▁" before a symbol at the very start).
"""

from megatron_r1.tokenizer import SentencePieceTokenizer


def save_hf_tokenizer(tokenizer: SentencePieceTokenizer, directory: str, model_max_length: int) -> None:
    from transformers import LlamaTokenizerFast

    specials = tokenizer.special_tokens
    piece = {token_id: name for name, token_id in specials.items()}
    fast = LlamaTokenizerFast(
        vocab_file=tokenizer.model_file,
        from_slow=True,
        legacy=True,
        add_prefix_space=True,
        add_bos_token=False,  # pre-training documents carry no bos; eod ends them
        add_eos_token=False,
        bos_token=piece.get(tokenizer.bos),
        eos_token=piece.get(tokenizer.eod),
        pad_token=piece.get(tokenizer.pad),
        unk_token="<unk>" if "<unk>" in specials else None,
        model_max_length=model_max_length,
    )
    user_defined = [name for name, token_id in specials.items() if name not in fast.all_special_tokens]
    fast.add_tokens(user_defined, special_tokens=False)
    fast.save_pretrained(directory)
