"""Bad input for the readers of outside input: a JSONL file with one line of each of the 14 kinds
of bad line that issue 18 found in the wild (for corpus documents or SFT records), with the skip
reason each kind gets; and hypothesis strategies that generate JSONL lines, records and texts."""

import json

from hypothesis import strategies as st

# kind -> (line, reason); {value} is where a record's text goes. The 8 MB document is one that the
# size limit admits: it must go through, not be skipped (the tools' default limit is 16 MiB).
BIG_DOCUMENT_BYTES = 8_000_000
LONE_SURROGATE = "lone \ud800 surrogate"


def bad_lines(wrap) -> list[tuple[bytes | None, str | None]]:
    """``(line, reason)`` of each kind; ``wrap(value)`` is the record holding ``value`` as its text.
    A reason of None is a line that must be kept (the 8 MB document)."""

    def record(value) -> bytes:
        return json.dumps(wrap(value)).encode()

    return [
        (record("unterminated")[:-1], "invalid_json"),
        (b"this is not JSON at all", "invalid_json"),
        (record(42), "not_a_string"),
        (record(None), "not_a_string"),
        (record({"nested": "object"}), "not_a_string"),
        (json.dumps({"wrong_key": "text"}).encode(), "missing_key"),
        (record(""), "empty_document"),
        (record("caf").replace(b'caf"', b'caf\xe9"'), "non_utf8"),
        (record("nul").replace(b'nul"', b'n\x00ul"'), "invalid_json"),
        (record("trailing") + b" garbage", "invalid_json"),
        (json.dumps([wrap("in an array")]).encode(), "invalid_json"),
        (b"", "blank_line"),
        (record("big document " * (BIG_DOCUMENT_BYTES // 13)), None),
        (record(LONE_SURROGATE), "lone_surrogate"),
    ]


def write_bad_line_file(path, wrap, good) -> dict:
    """Good lines ``good(i)`` with the 14 kinds between them; returns what a tool must account
    for: ``lines``, ``documents`` (lines kept), ``skipped`` (reason -> count), ``first_bad`` (line
    number of the first bad line)."""
    kinds = bad_lines(wrap)
    lines, skipped, first_bad = [], {}, None
    for index, (line, reason) in enumerate(kinds):
        lines.append(json.dumps(good(index)).encode())
        lines.append(line)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            first_bad = first_bad or len(lines)
    lines.append(json.dumps(good(len(kinds))).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    kept = len(lines) - sum(skipped.values())
    return {"path": str(path), "lines": len(lines), "documents": kept, "skipped": skipped, "first_bad": first_bad}


# ---------------------------------------------------------------- generated input (hypothesis)

# Text pieces that broke or could break a reader: lone and paired surrogates, NUL, line and
# paragraph separators, quotes and backslashes, special-token strings.
_PIECES = st.one_of(
    st.text(max_size=6),
    st.sampled_from(
        ["\ud800", "\udfff", "\ud83d\ude00", "\x00", "\u2028", "\x85", "\n", " ", "\\", '"', "<|end|>", "中文"]
    ),
)
texts = st.lists(_PIECES, min_size=1, max_size=5).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)
text_or_any = texts | texts | json_values


def _json_line(value, ensure_ascii: bool) -> bytes:
    # ensure_ascii=False leaves a lone surrogate as it is: its "surrogatepass" bytes are not UTF-8.
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def jsonl_lines(records: st.SearchStrategy, good_records: st.SearchStrategy) -> st.SearchStrategy:
    """Lines: half of them well-formed records (whose texts may still hold anything), the rest
    other records, any JSON, any bytes, cut records, blank lines and brackets nested deeper than
    Python's json recursion limit."""
    good = st.builds(_json_line, good_records, st.just(True))
    encoded = st.builds(_json_line, records, st.booleans())
    return st.one_of(
        *[good] * 6,
        encoded,
        st.builds(_json_line, json_values, st.booleans()),
        st.binary(max_size=30),
        st.builds(lambda line, cut: line[:cut], encoded, st.integers(0, 40)),
        st.sampled_from([b"", b"  \t", b"[" * 5000]),
    )


good_corpus_records = st.fixed_dictionaries({"text": texts}, optional={"id": json_values})
corpus_records = st.fixed_dictionaries({"text": text_or_any}) | st.dictionaries(texts, json_values, max_size=2)
_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]) | json_values,
            "content": text_or_any,
        },
        optional={"reasoning": text_or_any, "reasoning_content": text_or_any},
    )
    | json_values,
    max_size=4,
)
_instruction_fields = {"input": text_or_any, "system": text_or_any, "reasoning": text_or_any}
good_sft_records = st.one_of(
    st.fixed_dictionaries(
        {"instruction": texts, "output": texts}, optional={"input": texts, "system": texts, "reasoning": texts}
    ),
    st.fixed_dictionaries(
        {
            "messages": st.tuples(
                st.fixed_dictionaries({"role": st.just("user"), "content": texts}),
                st.fixed_dictionaries({"role": st.just("assistant"), "content": texts}, optional={"reasoning": texts}),
            ).map(list)
        }
    ),
)
sft_records = st.one_of(
    st.fixed_dictionaries({"messages": _messages}),
    st.fixed_dictionaries({"messages": json_values}),
    st.fixed_dictionaries({"instruction": text_or_any, "output": text_or_any}, optional=_instruction_fields),
    st.fixed_dictionaries({}, optional={"instruction": text_or_any, "output": text_or_any}),
)


def write_line_file(path, lines: list[bytes]) -> int:
    """Write the lines, one per line; returns how many lines a reader sees (a generated line may
    hold newlines of its own)."""
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(data)
    return data.count(b"\n")
