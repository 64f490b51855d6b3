"""Script-based language identification: ``zh``, ``en`` or ``other``; no model, no dependency.

The detector counts *units* per script with compiled regular expressions (so it runs in C):

* Han ideographs count 2/3 of a unit each (a Chinese word is 1.5 characters on average, so a
  unit is about one word in every script); Japanese kana and Korean Hangul count one unit each for
  their own scripts;
* Latin text counts one unit per word (a run of Latin letters);
* letters of any other script (Cyrillic, Arabic, Devanagari, Thai ...) count one unit per 4 letters.

Decision: no letters at all -> ``other``. If Han units are at least as many as every other script's
(ties go to Chinese, since Chinese text quoting English terms is far more common than the
reverse), the text is ``zh`` unless kana make up >= 10% of the Han+kana characters (then it is
Japanese -> ``other``). If Latin words dominate, the text is ``en`` when English stopwords
outnumber the stopwords of French/German/Spanish/Italian/Portuguese/Dutch in it; when neither
kind occurs (short texts) it is ``en`` if it has no non-ASCII Latin letters (accents), else
``other``. Anything else is ``other``.

Examples: "我喜欢用Python写代码" and "GPU 训练" are ``zh``; "I love 北京" and "你好 hello world"
are ``en``; "こんにちは世界" and "Привет, как дела?" are ``other``.

Known limits: very short Latin texts without stopwords or accents ("Hola mundo") read as English;
Chinese written without Han characters (pinyin) reads as Latin.
"""

from __future__ import annotations

import re

LANGUAGES = ("zh", "en", "other")

_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_KANA = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL = re.compile("[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
_LATIN_WORD = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]+")
_NON_ASCII_LATIN = re.compile("[\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")
_LETTER = re.compile(r"[^\W\d_]")

ENGLISH_STOPWORDS = frozenset(
    "a about after all also an and are as at be because been but by can could did do does for from had "
    "has have he her his how i if in into is it its just me more my no not of on one or our out she so "
    "some than that the their them then there these they this to up was we were what when which who "
    "will with would you your".split()
)
# Frequent function words of other Latin-script languages that are not English words.
_OTHER_LATIN_STOPWORDS = (
    frozenset(
        "le la les des du et est un une que qui dans pour pas sur avec ce il elle nous vous sont "  # fr
        "der die das und ist nicht ein eine zu den von mit sich auf dem für ich sie es auch wie "  # de
        "el los las y en del se por con para una es lo más pero su al como "  # es
        "il di che è per non della gli sono ma anche nel alla "  # it
        "os não uma com mais ao pela são também "  # pt
        "het een van zijn niet dat op te voor met ook maar ".split()  # nl
    )
    - ENGLISH_STOPWORDS
)


def script_units(text: str) -> dict[str, float]:
    """Units per script as described in the module docstring (``latin`` counts words)."""
    han = len(_HAN.findall(text))
    kana = len(_KANA.findall(text))
    hangul = len(_HANGUL.findall(text))
    latin_words = _LATIN_WORD.findall(text)
    latin_letters = sum(map(len, latin_words))
    other_letters = len(_LETTER.findall(text)) - han - kana - hangul - latin_letters
    return {
        "han": han * 2 / 3,
        "kana": kana,
        "hangul": hangul,
        "latin": len(latin_words),
        "other": max(other_letters, 0) // 4,
    }


def detect_language(text: str) -> str:
    units = script_units(text)
    if not any(units.values()):
        return "other"
    best = max(units.values())
    if units["han"] == best:
        han_characters = units["han"] * 3 / 2
        return "other" if units["kana"] * 10 >= han_characters + units["kana"] else "zh"
    if units["latin"] != best:
        return "other"
    words = _LATIN_WORD.findall(text.lower())
    english = sum(map(ENGLISH_STOPWORDS.__contains__, words))
    foreign = sum(map(_OTHER_LATIN_STOPWORDS.__contains__, words))
    if english or foreign:
        return "en" if english > foreign else "other"
    return "other" if _NON_ASCII_LATIN.search(text) else "en"
