"""Token counts for mixture building: a real tokenizer, or a documented proxy.

With a tokenizer (``--tokenizer-type`` / ``--tokenizer-model``, the same as preprocessing) the
count is ``len(tokenizer.tokenize(text))``. Without one, a proxy:

* ``approx`` (default): one token per CJK character (Han, kana, Hangul) plus one token per 4 UTF-8
  bytes of all other text, rounded up: the typical rate of BPE vocabularies trained on Chinese
  + English (about 1 token per Chinese character and ~4 bytes per English token);
* ``bytes``: UTF-8 bytes;
* ``chars``: Unicode characters.

Proportions computed with a proxy are proportions of that proxy; pass the tokenizer when the
mixture must match token counts exactly.
"""

from __future__ import annotations

import re

TOKEN_PROXIES = ("approx", "bytes", "chars")
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f]")


def proxy_count(text: str, proxy: str) -> int:
    if proxy == "chars":
        return len(text)
    size = len(text.encode("utf-8", "surrogatepass"))
    if proxy == "bytes":
        return size
    if proxy == "approx":
        cjk = _CJK.findall(text)
        other_bytes = size - sum(len(character.encode("utf-8")) for character in cjk)
        return len(cjk) + (other_bytes + 3) // 4
    raise ValueError(f"unknown token proxy {proxy!r}; expected one of {TOKEN_PROXIES}")


class TokenCounter:
    """Counts tokens of batches of texts, with the tokenizer when one is given, else the proxy."""

    def __init__(self, tokenizer_type: str | None = None, tokenizer_model: str | None = None, proxy: str = "approx"):
        if proxy not in TOKEN_PROXIES:
            raise ValueError(f"unknown token proxy {proxy!r}; expected one of {TOKEN_PROXIES}")
        self.proxy = proxy
        self.tokenizer = None
        if tokenizer_model:
            from megatron_r1.tokenizer import build_tokenizer  # only needed (and loaded) with a tokenizer

            self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)

    def count(self, texts: list[str]) -> list[int]:
        if self.tokenizer is not None:
            return [len(ids) for ids in self.tokenizer.tokenize_batch(texts)]
        return [proxy_count(text, self.proxy) for text in texts]
