import numpy as np
import pytest

from megatron_r1.corpus.mixture import (
    MixtureError,
    SourceCounts,
    interleave_order,
    iter_selected_lines,
    normalize_weights,
    plan_quotas,
    select_documents,
)
from megatron_r1.corpus.tokens import TokenCounter, proxy_count


def test_weights_are_normalized_and_must_be_positive():
    assert normalize_weights({"zh": 45, "en": 35, "other": 20}) == pytest.approx({"zh": 0.45, "en": 0.35, "other": 0.2})
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(MixtureError, match="positive"):
            normalize_weights({"zh": 1, "en": bad})


def test_quota_plan_uses_the_limiting_source_and_refuses_silent_upsampling():
    available = {"zh": 900, "en": 2000, "other": 100}
    quotas, total = plan_quotas(available, {"zh": 45, "en": 35, "other": 20}, None, False)
    assert total == 500  # "other" limits: 100 tokens are 20%
    assert quotas == pytest.approx({"zh": 225, "en": 175, "other": 100})
    with pytest.raises(MixtureError, match="needs 200 tokens of source 'other' but it has 100"):
        plan_quotas(available, {"zh": 45, "en": 35, "other": 20}, 1000, False)
    quotas, total = plan_quotas(available, {"zh": 45, "en": 35, "other": 20}, 1000, True)
    assert total == 1000 and quotas["other"] == pytest.approx(200)
    with pytest.raises(MixtureError, match="no usable documents"):
        plan_quotas({"zh": 0, "en": 10}, {"zh": 1, "en": 1}, None, False)


def test_selection_hits_the_quota_without_replacement_and_repeats_whole_passes():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 150, size=400)
    counts = select_documents(tokens, 0.3 * tokens.sum(), np.random.default_rng(1))
    assert set(counts.tolist()) <= {0, 1}
    assert abs(int((counts * tokens).sum()) - 0.3 * tokens.sum()) <= tokens.max() / 2
    counts = select_documents(tokens, 2.5 * tokens.sum(), np.random.default_rng(1))
    assert set(counts.tolist()) <= {2, 3}
    assert abs(int((counts * tokens).sum()) - 2.5 * tokens.sum()) <= tokens.max() / 2
    again = select_documents(tokens, 2.5 * tokens.sum(), np.random.default_rng(1))
    assert np.array_equal(counts, again)  # seeded


def test_interleaving_keeps_the_line_counts(tmp_path):
    order = interleave_order([5, 0, 3], np.random.default_rng(0))
    assert np.bincount(order, minlength=3).tolist() == [5, 0, 3]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "three"}')
    source = SourceCounts("a", [str(path)], np.zeros(3, np.uint16), np.array([1, 2, 3], np.uint32), np.array([1, 1, 1]))
    lines = list(iter_selected_lines(source, np.array([2, 0, 1], np.uint32)))
    assert lines == [b'{"text": "one"}\n', b'{"text": "three"}\n', b'{"text": "one"}\n']  # one pass per repetition


def test_token_proxies():
    assert proxy_count("你好世界", "approx") == 4
    assert proxy_count("hello world!", "approx") == 3  # 12 bytes / 4
    assert proxy_count("你好 abcd", "approx") == 2 + 2  # 2 CJK + ceil(5 bytes / 4)
    assert proxy_count("你好", "bytes") == 6 and proxy_count("你好", "chars") == 2
    assert TokenCounter(proxy="chars").count(["ab", "你好吗"]) == [2, 3]
    with pytest.raises(ValueError, match="unknown token proxy"):
        TokenCounter(proxy="words")
