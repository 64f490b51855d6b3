import pytest

from megatron_r1.corpus.langid import LANGUAGES, detect_language, script_units


@pytest.mark.parametrize(
    "text, language",
    [
        ("今天天气很好", "zh"),
        ("我喜欢用Python写代码", "zh"),
        ("这是一个test", "zh"),
        ("GPU 训练", "zh"),
        ("使用 PyTorch 和 Megatron-LM 训练 MoE 模型", "zh"),
        ("北京 Beijing", "zh"),
        ("「繁體中文」也算中文。", "zh"),
        ("The cat sat on the mat.", "en"),
        ("Hello world", "en"),
        ("I love 北京", "en"),
        ("你好 hello world, this is English", "en"),
        ("See https://example.com for the docs", "en"),
        ("Bonjour, je suis à Paris", "other"),
        ("Der Hund ist nicht hier und die Katze auch nicht", "other"),
        ("El perro es grande y la casa es blanca", "other"),
        ("こんにちは世界", "other"),
        ("東京は日本の首都です", "other"),
        ("안녕하세요 세계", "other"),
        ("Привет, как дела?", "other"),
        ("مرحبا بالعالم", "other"),
        ("12345 !!! ???", "other"),
        ("", "other"),
    ],
)
def test_short_and_mixed_texts(text, language):
    assert detect_language(text) == language
    assert language in LANGUAGES


def test_units_weigh_han_characters_as_words():
    units = script_units("我喜欢猫 and dogs")
    assert units["han"] == pytest.approx(4 * 2 / 3) and units["latin"] == 2
    # A long English document quoting a few Chinese characters stays English, and vice versa.
    assert detect_language("This paper studies the dataset (数据集) and the model in detail. " * 3) == "en"
    assert detect_language("我们在这篇论文中研究了 dataset 的构建方法以及模型训练的细节。" * 3) == "zh"
