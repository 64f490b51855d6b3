import argparse
import re

import pytest

from megatron_r1.corpus.quality import (
    REASONS,
    QualityConfig,
    add_quality_arguments,
    check_quality,
    ngram_span,
    quality_config_from_args,
    remove_boilerplate_lines,
)

ENGLISH = (
    "The river that runs through the old town was once the main road for traders who carried salt, "
    "cloth and grain to the markets in the north. Today it is quiet, and most of the warehouses along "
    "its banks have been turned into small museums, cafes and workshops.\n\n"
    "Local historians have collected letters, maps and account books that show how the trade changed "
    "with the seasons. In winter the water was too low for heavy boats, so merchants stored their goods "
    "and waited for the spring floods before they set out again."
)
CHINESE = (
    "这座城市的老街保存了许多上世纪的建筑，沿街的店铺大多由同一个家族经营了几代人。每到周末，附近的居民会带着孩子来这里散步，"
    "买一些手工做的点心，也有游客专门来拍照。\n\n"
    "当地的历史学者整理了不少旧信件和账本，从中可以看出商人们如何根据季节调整生意。冬天河水太浅，货船无法通行，"
    "他们就把货物存放在仓库里，等到春天涨水以后再出发。这些资料现在陈列在河边的一座小博物馆中，免费向公众开放。"
)
CONFIG = QualityConfig()


def test_good_english_and_chinese_documents_pass():
    assert check_quality(ENGLISH, "en", CONFIG) is None
    assert check_quality(CHINESE, "zh", CONFIG) is None


@pytest.mark.parametrize(
    "text, language, reason",
    [
        ("A short note about the river and the town.", "en", "too_short"),
        (CHINESE[:60], "zh", "too_short"),  # 60 Chinese characters are not 100 units
        (ENGLISH + "\nLorem ipsum dolor sit amet.", "en", "lorem_ipsum"),
        (ENGLISH.replace("the", "#the"), "en", "symbol_ratio"),
        ("\n".join(f"- item {word} of the list" for word in ENGLISH.split()[:60]), "en", "bullet_lines"),
        (" ".join(f"{1000 + i} {7919 * i + 100} river" for i in range(40)), "en", "alpha_words"),
        (re.sub(r"\b(the|be|to|of|and|that|have|with)\b", "xq", ENGLISH), "en", "stopwords"),
        (
            CHINESE.replace("的", "")
            .replace("了", "")
            .replace("是", "")
            .replace("在", "")
            .replace("和", "")
            .replace("有", "")
            .replace("不", "")
            .replace("这", "")
            .replace("也", "")
            .replace("就", ""),
            "zh",
            "stopwords",
        ),
        (ENGLISH + "\n" + "\n".join(["Call the office for the details."] * 6), "en", "dup_lines"),
        (" ".join(["the river and the town"] * 20), "en", "top_ngram"),
        (CHINESE + CHINESE[:120], "zh", "dup_ngram"),
        ("Supercalifragilistic extraordinarily " * 40, "en", "mean_word_length"),
    ],
)
def test_each_rule_rejects_its_documents(text, language, reason):
    assert reason in REASONS
    assert check_quality(text, language, CONFIG) == reason


def test_garbled_ratio_and_code_rule():
    assert check_quality(ENGLISH, "en", CONFIG, garbled=len(ENGLISH) // 50) == "garbled"
    assert check_quality(ENGLISH + " {x}", "en", CONFIG) is None
    assert check_quality(ENGLISH + " {x}", "en", QualityConfig(drop_curly_brace=True)) == "curly_brace"


def test_chinese_repetition_uses_longer_character_ngrams():
    assert [ngram_span(n, "zh") for n in (2, 5, 10)] == [3, 8, 15]
    assert [ngram_span(n, "en") for n in (2, 5, 10)] == [2, 5, 10]


def test_boilerplate_lines_are_removed_in_both_languages():
    text = (
        ENGLISH
        + "\nWe use cookies to improve your experience.\n"
        + "All rights reserved 2024.\n点击这里下载APP\n扫码关注公众号"
    )
    assert remove_boilerplate_lines(text, "en", CONFIG) == ENGLISH
    long_line = "This line mentions the cookie jar in the kitchen" + " and goes on" * 20
    assert remove_boilerplate_lines(long_line, "en", CONFIG) == long_line  # longer than --boilerplate-max-line-chars
    assert (
        remove_boilerplate_lines("Ends well.\nno end", "en", QualityConfig(c4_terminal_punctuation=True))
        == "Ends well."
    )


def test_thresholds_are_command_line_flags():
    parser = argparse.ArgumentParser()
    add_quality_arguments(parser)
    short = "A short note about the river and the town."
    config = quality_config_from_args(
        parser.parse_args(["--min-words", "5", "--max-dup-line-chars", "0.5", "--no-drop-lorem-ipsum"])
    )
    assert config.min_words == 5 and config.max_dup_line_chars == 0.5 and not config.drop_lorem_ipsum
    assert check_quality(short, "en", CONFIG) == "too_short"
    assert check_quality(short, "en", config) is None
    assert quality_config_from_args(parser.parse_args([])) == CONFIG
