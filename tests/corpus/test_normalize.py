from megatron_r1.corpus.normalize import dedup_key, normalize_text, word_characters


def test_nfkc_folds_full_width_and_compatibility_forms():
    assert normalize_text("ＡＢＣ１２３，ﬁne！")[0] == "ABC123,fine!"
    assert normalize_text("中文。、「引号」")[0] == "中文。、「引号」"  # no compatibility mapping


def test_control_and_invisible_characters_are_removed_but_zwj_kept():
    text, garbled = normalize_text("a\x00b\x07c\u200bd\ufeffe\u00adf\u200dg\x7f")
    assert text == "abcdef\u200dg" and garbled == 0


def test_garbled_characters_are_removed_and_counted():
    text, garbled = normalize_text("ok\ufffd \ud800x \U000f0000y \U000e0080z \U00050000w")
    assert text == "ok x y z w"
    assert garbled == 5


def test_mojibake_is_counted_not_rewritten():
    # "café" and "it’s" and "à" written as UTF-8 and read as Latin-1 / cp1252.
    text, garbled = normalize_text("cafÃ© itâ€™s Ã\u00a0 bientôt")
    assert garbled == 3
    assert text == "cafÃ© itâ€TMs Ã bientôt"  # (NFKC spells the ™ of the mojibake as TM)


def test_whitespace_normalization_keeps_paragraphs():
    raw = "  first\tline  with   spaces \r\nsecond\u3000line\u00a0x\r\n\r\n\r\n\n third\u2028fourth\u2029\x0bfifth  "
    assert normalize_text(raw) == ("first line with spaces\nsecond line x\n\nthird\nfourth\n\nfifth", 0)
    assert normalize_text(" \n\t \u200b ") == ("", 0)


def test_dedup_key_and_word_characters():
    assert dedup_key("Hello\n  WORLD\t!") == "hello world !"
    assert word_characters("Hello, World! 你好——世界_x") == "hello world 你好 世界 x"
