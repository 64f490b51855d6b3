"""Clean raw JSONL text for pre-training: normalize, identify language, filter, anonymize, tag.

Per document: Unicode NFKC + removal of control / garbled characters + whitespace normalization;
C4-style boilerplate line removal; language identification (zh / en / other, script-based, no
model: see megatron_r1/corpus/langid.py); Gopher / C4 quality rules with the thresholds below
(Chinese-aware: lengths and n-grams count Han characters for zh); PII replaced by the
placeholders <EMAIL> <PHONE> <IP_ADDRESS> <ID_NUMBER> <BANK_CARD> (megatron_r1/corpus/pii.py);
optional domain tag from keyword rules. Output records keep all input fields, with the text
replaced by the cleaned text and a language field added (and a domain field with --domain-rules).

Streaming with --workers processes; output order = input order. Every dropped document is counted
by reason (the first rule it fails); unusable lines (broken JSON, not UTF-8, missing or empty text,
lone surrogates, over 16 MiB) are counted with file:line examples, or stop the run with --strict
(exit status 2). --keep-rejects writes dropped documents with
"reject_reason" and "reject_location" (file:line).

Example:
    python tools/clean_corpus.py --input raw/*.jsonl --output clean.jsonl --keep-rejects rejects.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from tqdm import tqdm

from megatron_r1.corpus.clean import CleanConfig, clean_batch, init_worker
from megatron_r1.corpus.domain import DomainRulesError, load_domain_rules
from megatron_r1.corpus.jsonl import (
    InputError,
    atomic_output,
    check_output_not_input,
    expand_inputs,
    iter_line_batches,
    total_bytes,
)
from megatron_r1.corpus.langid import LANGUAGES
from megatron_r1.corpus.normalize import prepare
from megatron_r1.corpus.parallel import ordered_map
from megatron_r1.corpus.pii import PLACEHOLDERS
from megatron_r1.corpus.quality import REASONS, add_quality_arguments, quality_config_from_args
from megatron_r1.data.jsonl import SkipCounter, StrictModeError, add_bad_line_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files (plain or .gz) or glob patterns")
    parser.add_argument("--output", required=True, help="JSONL of the kept, cleaned documents")
    parser.add_argument(
        "--keep-rejects", metavar="FILE", help="also write every dropped document / bad line with its reason"
    )
    parser.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    parser.add_argument(
        "--language-key", default="lang", help="field added with the language zh/en/other (default: lang)"
    )
    parser.add_argument(
        "--languages",
        help=f"comma-separated languages to keep, of {','.join(LANGUAGES)} (default: all); others are dropped as 'language'",
    )
    parser.add_argument("--no-pii", dest="mask_pii", action="store_false", help="do not anonymize PII")
    parser.add_argument(
        "--domain-rules",
        metavar="FILE",
        help='JSON {"domain": ["keyword", ...]}: add a domain field (the domain with most keyword hits)',
    )
    parser.add_argument("--domain-key", default="domain", help="field added with the domain (default: domain)")
    parser.add_argument(
        "--default-domain", default="general", help="domain of documents matching no rule (default: general)"
    )
    parser.add_argument(
        "--domain-min-hits", type=int, default=1, help="keyword occurrences needed for a domain (default: 1)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2; 1 = in-process)")
    add_bad_line_arguments(parser)
    add_quality_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    languages = None
    if args.languages:
        languages = tuple(language.strip() for language in args.languages.split(",") if language.strip())
        unknown = sorted(set(languages) - set(LANGUAGES))
        if unknown or not languages:
            parser.error(f"--languages: unknown language(s) {unknown}; choose from {', '.join(LANGUAGES)}")
    try:
        paths = expand_inputs(args.input)
        for output, flag in ((args.output, "--output"), (args.keep_rejects, "--keep-rejects")):
            if output:
                check_output_not_input(output, paths, flag)
        domain_rules = load_domain_rules(args.domain_rules) if args.domain_rules else None
    except (InputError, DomainRulesError) as error:
        parser.error(str(error))
    config = CleanConfig(
        paths=tuple(paths),
        json_key=args.json_key,
        language_key=args.language_key,
        languages=languages,
        quality=quality_config_from_args(args),
        mask_pii=args.mask_pii,
        domain_rules=domain_rules,
        domain_key=args.domain_key,
        default_domain=args.default_domain,
        domain_min_hits=args.domain_min_hits,
        keep_rejects=bool(args.keep_rejects),
        replace_surrogates=args.replace_lone_surrogates,
    )

    started = time.perf_counter()
    prepare()
    input_bytes = total_bytes(paths)
    bad = SkipCounter(strict=args.strict)
    try:
        totals, documents, kept, rejected_lines = _clean_files(args, config, paths, input_bytes, bad)
    except StrictModeError as error:  # (the outputs' temporary files are gone)
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started

    print(
        f"clean summary: {len(paths)} input file(s), {input_bytes / 1e6:.1f} MB, {elapsed:.1f} s ({input_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s)"
    )
    print(
        f"  documents: {documents}, kept: {kept} ({100.0 * kept / max(documents, 1):.1f}%), dropped: {documents - kept}"
    )
    reasons = totals["reasons"]
    for reason in ("language", *REASONS):
        if reasons[reason]:
            print(f"    dropped {reason}: {reasons[reason]}")
    print("\n".join(bad.table(indent="  ")))
    print("  kept by language: " + ", ".join(f"{language}={totals['languages'][language]}" for language in LANGUAGES))
    print(
        "  PII replaced: "
        + (
            ", ".join(f"{placeholder}={totals['pii'][placeholder]}" for placeholder in PLACEHOLDERS)
            if args.mask_pii
            else "off"
        )
    )
    if domain_rules:
        print(
            "  kept by domain: " + ", ".join(f"{domain}={count}" for domain, count in totals["domains"].most_common())
        )
    print(
        f"  output: {args.output}"
        + (f"; rejects ({rejected_lines} lines): {args.keep_rejects}" if args.keep_rejects else "")
    )
    return 0


def _clean_files(args, config: CleanConfig, paths: list[str], input_bytes: int, bad: SkipCounter):
    """Clean every input line into --output (and --keep-rejects); bad lines go to ``bad``.
    Returns (counters of reasons / languages / pii / domains, documents, kept, reject lines)."""
    totals = {name: Counter() for name in ("reasons", "languages", "pii", "domains")}
    documents = kept = rejected_lines = 0
    with atomic_output(args.output) as output, _optional_output(args.keep_rejects) as rejects:
        with tqdm(total=input_bytes, unit="B", unit_scale=True, desc="clean") as progress:
            batches = iter_line_batches(paths, batch_lines=256, progress=progress)
            for result in ordered_map(clean_batch, batches, args.workers, init_worker, (config,)):
                output.writelines(result.kept)
                if rejects is not None:
                    rejects.writelines(result.rejects)
                    rejected_lines += len(result.rejects)
                for reason, file_index, line_number in result.bad:
                    bad.add(reason, paths[file_index], line_number)
                for name, counter in totals.items():
                    counter.update(getattr(result, name))
                documents += result.documents
                kept += len(result.kept)
    return totals, documents, kept, rejected_lines


class _optional_output:
    """``atomic_output(path)`` when a path is given, else a context yielding None."""

    def __init__(self, path: str | None):
        self._context = atomic_output(path) if path else None

    def __enter__(self):
        return self._context.__enter__() if self._context else None

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info) if self._context else False


if __name__ == "__main__":
    sys.exit(main())
