"""The per-document cleaning pipeline behind tools/clean_corpus.py.

For each input line, in order: parse (bad lines are counted, never raised) -> normalize
(NFKC, control / garbled characters, whitespace) -> remove boilerplate lines -> identify the
language -> language filter -> quality rules -> PII anonymization -> domain tag. A kept document is
the input record with its text replaced by the cleaned text and a language field (and a domain
field) added. A rejected document is written to the rejects file (when asked) as the record with
its cleaned, PII-masked text plus ``reject_reason`` and ``reject_location`` (``file:line``; its own
name so that an input field such as ``source`` is kept); an unparsable line as
``{"reject_location", "reject_reason", "raw"}`` with the PII-masked raw line (first 10 kB; empty
for a line over the size limit).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from megatron_r1.corpus.domain import DomainTagger
from megatron_r1.corpus.jsonl import RawLine, dump_line, parse_text
from megatron_r1.corpus.langid import detect_language
from megatron_r1.corpus.normalize import normalize_text
from megatron_r1.corpus.pii import mask_pii
from megatron_r1.corpus.quality import QualityConfig, check_quality, remove_boilerplate_lines

_MAX_RAW_REJECT_BYTES = 10_000


@dataclass(frozen=True)
class CleanConfig:
    paths: tuple[str, ...]
    json_key: str = "text"
    language_key: str = "lang"
    languages: tuple[str, ...] | None = None  # None keeps every language
    quality: QualityConfig = field(default_factory=QualityConfig)
    mask_pii: bool = True
    domain_rules: dict | None = None
    domain_key: str = "domain"
    default_domain: str = "general"
    domain_min_hits: int = 1
    keep_rejects: bool = False
    replace_surrogates: bool = False  # lone surrogates -> U+FFFD instead of a bad line


@dataclass
class CleanBatch:
    kept: list[bytes] = field(default_factory=list)
    rejects: list[bytes] = field(default_factory=list)
    bad: list[tuple[str, int, int]] = field(default_factory=list)  # (reason, file index, line number)
    reasons: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    domains: Counter = field(default_factory=Counter)
    documents: int = 0


_config: CleanConfig | None = None
_tagger: DomainTagger | None = None


def init_worker(config: CleanConfig) -> None:
    global _config, _tagger
    _config = config
    _tagger = (
        DomainTagger(config.domain_rules, config.default_domain, config.domain_min_hits)
        if config.domain_rules
        else None
    )


def clean_batch(batch: list[RawLine]) -> CleanBatch:
    config = _config
    result = CleanBatch()
    for file_index, line_number, _, raw in batch:
        location = f"{config.paths[file_index]}:{line_number}"
        text, reason = parse_text(raw, config.json_key, config.replace_surrogates)
        if reason is not None:
            result.bad.append((reason, file_index, line_number))
            if config.keep_rejects and reason != "blank_line":
                raw_text = raw[:_MAX_RAW_REJECT_BYTES].decode("utf-8", "replace") if raw is not None else ""
                raw_text = mask_pii(raw_text)[0] if config.mask_pii else raw_text
                result.rejects.append(
                    dump_line({"reject_location": location, "reject_reason": reason, "raw": raw_text})
                )
            continue
        result.documents += 1
        text, garbled = normalize_text(text)
        language = detect_language(text)
        text = remove_boilerplate_lines(text, language, config.quality)
        if config.languages is not None and language not in config.languages:
            reason = "language"
        else:
            reason = check_quality(text, language, config.quality, garbled)
        if reason is not None:
            result.reasons[reason] += 1
            if config.keep_rejects:
                text = mask_pii(text)[0] if config.mask_pii else text
                record = json.loads(raw)
                record.update(
                    {
                        config.json_key: text,
                        config.language_key: language,
                        "reject_reason": reason,
                        "reject_location": location,
                    }
                )
                result.rejects.append(dump_line(record))
            continue
        if config.mask_pii:
            text, found = mask_pii(text)
            result.pii.update(found)
        record = json.loads(raw)
        record[config.json_key] = text
        record[config.language_key] = language
        if _tagger is not None:
            domain = _tagger.tag(text)
            record[config.domain_key] = domain
            result.domains[domain] += 1
        result.languages[language] += 1
        result.kept.append(dump_line(record))
    return result
