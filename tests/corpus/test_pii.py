import pytest

from megatron_r1.corpus.pii import PLACEHOLDERS, chinese_id_is_valid, luhn_is_valid, mask_pii

# GB 11643-1999 weights and check characters, written out rather than derived, so that the test
# does not share the implementation's formula.
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def resident_id(first17: str) -> str:
    return first17 + _ID_CHECK[sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS)) % 11]


def with_luhn_digit(payload: str) -> str:
    for check in "0123456789":
        digits = [int(d) for d in payload + check]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
        if total % 10 == 0:
            return payload + check
    raise AssertionError("unreachable")


VALID_ID = resident_id("11010519491231002")  # ends in X
VALID_ID_DIGIT = resident_id("44030419900307123")
VISA = with_luhn_digit("411111111111111")
UNIONPAY_19 = with_luhn_digit("622202123456789012")


def wrong_last(number: str) -> str:
    return number[:-1] + ("1" if number[-1] != "1" else "2")


def test_independent_checksums_agree_with_the_validators():
    assert VALID_ID.endswith("X") and chinese_id_is_valid(VALID_ID) and chinese_id_is_valid(VALID_ID_DIGIT)
    assert not chinese_id_is_valid(wrong_last(VALID_ID_DIGIT))
    assert luhn_is_valid(VISA) and luhn_is_valid(UNIONPAY_19) and not luhn_is_valid(wrong_last(VISA))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("联系邮箱 zhang.san@example.com.cn 谢谢", "联系邮箱 <EMAIL> 谢谢"),
        ("mail me: john_doe+tag@mail.co.uk.", "mail me: <EMAIL>."),
        ("电话13812345678，欢迎来电", "电话<PHONE>，欢迎来电"),
        ("手机：+86 138 1234 5678", "手机：<PHONE>"),
        ("tel 0086-138-1234-5678 ok", "tel <PHONE> ok"),
        ("(+86)13912345678", "<PHONE>"),
        ("手机 159-1234-5678。", "手机 <PHONE>。"),
        ("座机 010-12345678", "座机 <PHONE>"),
        ("座机 (0755) 8765-432", "座机 (0755) 8765-432"),  # landline needs 7-8 digits after the area code
        ("call (415) 555-2671 now", "call <PHONE> now"),
        ("call 415-555-2671", "call <PHONE>"),
        ("London +44 20 7946 0958", "London <PHONE>"),
        ("server 192.168.1.1 down", "server <IP_ADDRESS> down"),
        ("subnet 10.0.0.1/24", "subnet <IP_ADDRESS>/24"),
        ("v6 2001:db8::1 up", "v6 <IP_ADDRESS> up"),
        ("link fe80::1%eth0 up", "link <IP_ADDRESS> up"),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "<IP_ADDRESS>"),
        ("mapped ::ffff:192.0.2.1", "mapped <IP_ADDRESS>"),
        (f"身份证号{VALID_ID}，请核对", "身份证号<ID_NUMBER>，请核对"),
        (f"ID {VALID_ID.lower()}", "ID <ID_NUMBER>"),
        (f"ID {VALID_ID_DIGIT}", "ID <ID_NUMBER>"),
        (f"card {VISA}", "card <BANK_CARD>"),
        (f"card {' '.join(VISA[i : i + 4] for i in range(0, 16, 4))}.", "card <BANK_CARD>."),
        (f"card {'-'.join(VISA[i : i + 4] for i in range(0, 16, 4))}", "card <BANK_CARD>"),
        (f"银行卡{UNIONPAY_19}", "银行卡<BANK_CARD>"),
    ],
)
def test_pii_is_replaced_by_typed_placeholders(text, expected):
    masked, counts = mask_pii(text)
    assert masked == expected
    assert sum(counts.values()) == sum(masked.count(placeholder) for placeholder in PLACEHOLDERS)


@pytest.mark.parametrize(
    "text",
    [
        f"ID {wrong_last(VALID_ID_DIGIT)}",  # checksum fails
        "ID 110105194902301234",  # February 30th: no such birth date
        "ID 910105194912310021",  # region code starting with 9
        f"card {wrong_last(VISA)}",  # fails Luhn
        f"card {wrong_last(UNIONPAY_19)}",
        "order 1234567890123",  # leading 1: no card issuer
        "timestamp 1700000000000 ms",
        "version 1.2.3.4.5",
        "release v1.2.3.4",
        "Python 3.11.7 and numpy 2.1",
        "256.1.1.1 is not an address",
        "pi is 3.14159",
        "date 2024-01-15, time 12:30:45",
        "2024.01.15 and 2024/01/15",
        "ratio 3:4:5 and 1:2:3:4",
        "C++ a::b and Dead::Beef and std::vector<int>",
        "loopback ::1",
        "hash deadbeef:cafe:babe",
        "ISBN 978-3-16-148410-0",
        "邮编 100084，北京",
        "price 1,234,567.89 元",
        "account 12345678901234567890123",  # too long for a card, no separators
        "user@localhost has no domain suffix",
        "phone-like 12345678901 with a 12 prefix",
    ],
)
def test_look_alikes_survive(text):
    assert mask_pii(text) == (text, {})


def test_counts_per_placeholder_and_email_digits_are_not_phones():
    text = f"a 13812345678@qq.com b 13812345678 c 8.8.8.8 d {VISA} e {VALID_ID} f 13900001111"
    masked, counts = mask_pii(text)
    assert masked == "a <EMAIL> b <PHONE> c <IP_ADDRESS> d <BANK_CARD> e <ID_NUMBER> f <PHONE>"
    assert counts == {"<EMAIL>": 1, "<PHONE>": 2, "<IP_ADDRESS>": 1, "<BANK_CARD>": 1, "<ID_NUMBER>": 1}
