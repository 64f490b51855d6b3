"""Optional domain tags from keyword rules.

Rules file (JSON): ``{"domain name": ["keyword", ...], ...}``. A document gets the domain whose
keywords occur most often in it (case-insensitive; ASCII keywords match whole words only, other
keywords such as Chinese ones match as substrings), if that count reaches ``min_hits``; ties go
to the domain listed first; otherwise it gets the default domain.
"""

from __future__ import annotations

import json
import re


class DomainRulesError(ValueError):
    pass


def load_domain_rules(path: str) -> dict[str, list[str]]:
    try:
        with open(path, encoding="utf-8") as handle:
            rules = json.load(handle)
    except OSError as error:
        raise DomainRulesError(f"{path}: cannot read domain rules ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise DomainRulesError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise DomainRulesError(f"{path}: not UTF-8 text") from None
    if not isinstance(rules, dict) or not rules:
        raise DomainRulesError(f'{path}: expected a non-empty JSON object {{"domain": ["keyword", ...]}}')
    for domain, keywords in rules.items():
        if (
            not isinstance(keywords, list)
            or not keywords
            or not all(isinstance(k, str) and k.strip() for k in keywords)
        ):
            raise DomainRulesError(
                f"{path}: domain {domain!r} must map to a non-empty list of non-empty keyword strings"
            )
    return rules


class DomainTagger:
    def __init__(self, rules: dict[str, list[str]], default: str = "general", min_hits: int = 1):
        self.default = default
        self.min_hits = min_hits
        self.patterns = [(domain, self._compile(keywords)) for domain, keywords in rules.items()]

    @staticmethod
    def _compile(keywords: list[str]) -> re.Pattern:
        alternatives = []
        for keyword in sorted({k.strip() for k in keywords}, key=len, reverse=True):
            escaped = re.escape(keyword)
            alternatives.append(rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])" if keyword.isascii() else escaped)
        return re.compile("|".join(alternatives), re.IGNORECASE)

    def tag(self, text: str) -> str:
        best, best_hits = self.default, self.min_hits - 1
        for domain, pattern in self.patterns:
            hits = len(pattern.findall(text))
            if hits > best_hits:
                best, best_hits = domain, hits
        return best
