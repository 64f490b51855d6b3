"""PII anonymization: matches are replaced by typed placeholders.

Placeholders (applied in this order, so an e-mail's digits are never read as a phone number):

* ``<EMAIL>``      local@domain.tld
* ``<IP_ADDRESS>`` IPv6 (full, ``::``-compressed, with embedded IPv4 or ``%zone``; validated by
  :mod:`ipaddress`, at least two non-empty groups and a decimal digit, so that C++ / Ruby scopes
  such as ``a::b`` or ``Dead::Beef`` survive) and IPv4 (four dotted octets 0-255). A dotted
  quad that is a valid address *is* masked, even if it was meant as a version number; "v1.2.3.4",
  "1.2.3", "1.2.3.4.5", "256.1.1.1" and "3.14159" survive.
* ``<ID_NUMBER>``  Chinese resident identity number: 18 characters, region code starting 1-8, a
  real birth date between 1900 and 2099, and the ISO 7064 MOD 11-2 check character (0-9 or X).
* ``<BANK_CARD>``  13-19 digits, optionally grouped by single spaces or dashes, first digit 2-6
  (the Visa / Mastercard / Amex / JCB / Discover / UnionPay issuer ranges) and a valid Luhn
  checksum. Order numbers and millisecond timestamps (leading 1) survive, as do numbers failing Luhn
  and ungrouped 18-digit numbers shaped like a resident ID (region code, birth date) whose ID
  checksum failed.
* ``<PHONE>``      Chinese mobile numbers ``1[3-9]x xxxx xxxx`` with optional ``+86``/``0086``/
  ``(+86)`` prefix and space/dash separators; Chinese landlines ``0xx(x)-xxxxxxx(x)`` (the dash or
  parentheses are required); North-American ``(xxx) xxx-xxxx`` / ``xxx-xxx-xxxx`` / ``xxx.xxx.xxxx``
  (area code and exchange start with 2-9); and international ``+CC ...`` numbers with 8-15 digits.
  Dates (2024-01-15), times (12:30:45) and plain long digit runs without a mobile prefix survive.

Every pattern requires the match not to touch ASCII letters/digits, so substrings of longer
numbers or identifiers are not masked, while Chinese text may touch a match ("电话13812345678").
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter

PLACEHOLDERS = ("<EMAIL>", "<IP_ADDRESS>", "<ID_NUMBER>", "<BANK_CARD>", "<PHONE>")

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9_-])"
)
_IPV6_CANDIDATE = re.compile(
    r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?:%[0-9A-Za-z]+)?(?![A-Za-z0-9_:]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![A-Za-z0-9_.])(?:{_OCTET}\.){{3}}{_OCTET}(?![A-Za-z0-9_]|\.\d)")
_CHINESE_ID = re.compile(
    r"(?<![0-9A-Za-z])[1-8]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])"
)
_BANK_CARD = re.compile(r"(?<![A-Za-z0-9_-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![A-Za-z0-9_]|-\d)")
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_+])(?:"
    r"(?:(?:\+|00)86[ -]?|\(\+?86\)[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}"  # Chinese mobile
    r"|(?:\(0\d{2,3}\)[ -]?|0\d{2,3}-)\d{7,8}"  # Chinese landline
    r"|(?:\(\s*[2-9]\d{2}\s*\)\s?|[2-9]\d{2}[-.])[2-9]\d{2}[-.]\d{4}"  # North American
    r"|\+[1-9]\d{0,2}(?:[ -]?\(?\d{1,4}\)?){2,5}"  # international, +CC
    r")(?![A-Za-z0-9_]|[-.]\d)"
)

_ID_WEIGHTS = [pow(2, 17 - position, 11) for position in range(17)]


def chinese_id_is_valid(number: str) -> bool:
    """ISO 7064 MOD 11-2 check character and a real birth date (YYYYMMDD at positions 7-14)."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    try:
        datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    remainder = sum(int(digit) * weight for digit, weight in zip(number[:17], _ID_WEIGHTS)) % 11
    check = (12 - remainder) % 11
    return number[17].upper() == ("X" if check == 10 else str(check))


def luhn_is_valid(digits: str) -> bool:
    total = 0
    for index, character in enumerate(reversed(digits)):
        digit = int(character)
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _ipv6(match: re.Match) -> str | None:
    candidate = match.group(0)
    address = candidate.split("%")[0]
    if sum(1 for group in address.split(":") if group) < 2 or not any(character.isdigit() for character in address):
        return None
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    return "<IP_ADDRESS>"


def _chinese_id(match: re.Match) -> str | None:
    return "<ID_NUMBER>" if chinese_id_is_valid(match.group(0)) else None


def _bank_card(match: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", match.group(0))
    if digits == match.group(0) and _CHINESE_ID.fullmatch(digits):
        return None  # shaped like a resident ID whose checksum failed (a typo), not a card number
    return "<BANK_CARD>" if 13 <= len(digits) <= 19 and luhn_is_valid(digits) else None


def _phone(match: re.Match) -> str | None:
    digits = sum(character.isdigit() for character in match.group(0))
    return "<PHONE>" if 8 <= digits <= 15 else None


# (placeholder, pattern, validator or None); a validator returning None keeps the original text.
_RULES = (
    ("<EMAIL>", _EMAIL, None),
    ("<IP_ADDRESS>", _IPV6_CANDIDATE, _ipv6),
    ("<IP_ADDRESS>", _IPV4, None),
    ("<ID_NUMBER>", _CHINESE_ID, _chinese_id),
    ("<BANK_CARD>", _BANK_CARD, _bank_card),
    ("<PHONE>", _PHONE, _phone),
)


def mask_pii(text: str) -> tuple[str, Counter]:
    """Replace PII by placeholders; returns the new text and the count of replacements per placeholder."""
    counts: Counter = Counter()
    for placeholder, pattern, validator in _RULES:
        if validator is None:
            text, replaced = pattern.subn(placeholder, text)
            counts[placeholder] += replaced
            continue

        def replace(match: re.Match, validator=validator) -> str:
            replacement = validator(match)
            if replacement is None:
                return match.group(0)
            counts[replacement] += 1
            return replacement

        text = pattern.sub(replace, text)
    return text, +counts
