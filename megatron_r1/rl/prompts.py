"""GRPO prompts: the JSONL reader, the rendering of a prompt to token ids, and a shuffled stream of
prompts whose position a checkpoint saves.

Records (one JSON object per line), either

- ``{"prompt": "What is 37 + 48?", "answer": "85"}``: one user turn, or
- ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...], ...}``: chat
  turns as in the fine-tuning data (megatron_r1/data/sft.py), the last one a user turn;

every other field (``answer`` ...) is kept in :attr:`PromptRecord.fields` for the reward functions.
Bad lines are those of the other readers (not UTF-8, not a JSON object, a lone surrogate, over the
size limit ...) plus records with neither or both of ``prompt`` and ``messages``, an empty prompt, or
chat turns that do not end with a user turn; each is skipped and counted by reason with
``file:line`` in a :class:`~megatron_r1.data.jsonl.SkipCounter` (a strict one stops at the first),
and a file without one usable line is an error naming it.

Rendering (:class:`PromptRenderer`): ``chat`` is the fine-tuning chat template up to the opening of
the assistant turn (:meth:`ChatTemplate.render` with ``add_generation_prompt``); ``r1-zero`` is the
plain-text template of DeepSeek-R1-Zero (DeepSeek-R1, arXiv 2501.12948, Table 1) around the question,
after the tokenizer's bos. The model's response follows either.

:class:`PromptStream` yields the prompts epoch after epoch, each epoch in a new order drawn from the
seed and the epoch number alone, so that a run resumed from ``state_dict()`` continues with the
prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron_r1.data.jsonl import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    BadInputError,
    ByteRange,
    SkipCounter,
    load_json_object,
    read_lines,
)
from megatron_r1.data.sft import ChatTemplate, RecordError, _chat_messages, _TextFields

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
TEMPLATES = ("chat", "r1-zero")


@dataclass
class PromptRecord:
    """One prompt: its chat turns (the last a user turn), its other JSON fields, and ``file:line``."""

    messages: list[dict]
    fields: dict
    where: str

    @property
    def prompt(self) -> str:
        """The question: the last user turn's text (what reward functions receive as ``prompt``)."""
        return self.messages[-1]["content"]


def parse_prompt_record(record, where: str, replace_surrogates: bool = False) -> PromptRecord:
    """The prompt of one JSON record; RecordError naming ``where`` and the fault otherwise.
    ``replace_surrogates``: lone surrogates become U+FFFD instead of making the record bad."""
    if not isinstance(record, dict):
        raise RecordError(where, "invalid_json", f"a record must be a JSON object, got {type(record).__name__}")
    if ("prompt" in record) == ("messages" in record):
        detail = "has both 'prompt' and 'messages'" if "prompt" in record else "expected 'prompt' or 'messages'"
        raise RecordError(where, "invalid_record" if "prompt" in record else "missing_key", detail)
    text = _TextFields(where, replace_surrogates)
    if "prompt" in record:
        messages = [{"role": "user", "content": text(record["prompt"], "'prompt'")}]
    else:
        messages = _chat_messages(record, where, text)
        if messages[-1]["role"] != "user":
            raise RecordError(where, "invalid_record", f"the last message is {messages[-1]['role']!r}, not 'user'")
    if not messages[-1]["content"].strip():
        raise RecordError(where, "empty_document", "the prompt is empty")
    fields = {key: value for key, value in record.items() if key not in ("prompt", "messages")}
    return PromptRecord(messages, fields, where)


def read_prompt_file(path: str, skipped: SkipCounter | None = None, replace_surrogates: bool = False):
    """The usable prompts of one JSONL file (``.gz`` read through gzip). Bad lines go to ``skipped``;
    without it blank lines are passed over and any other bad line raises RecordError. BadInputError
    naming the file when no line is usable."""
    whole_file = ByteRange(path, 0, None, os.path.getsize(path))
    records, skipped_here = [], SkipCounter(strict=skipped is not None and skipped.strict)
    for line_number, (line, _) in enumerate(read_lines(whole_file, DEFAULT_MAX_DOCUMENT_BYTES), start=1):
        where = f"{path}:{line_number}"
        try:
            record, reason = (None, "too_large") if line is None else load_json_object(line)
            if reason is not None:
                raise RecordError(where, reason, f"over {DEFAULT_MAX_DOCUMENT_BYTES} bytes" if line is None else None)
            records.append(parse_prompt_record(record, where, replace_surrogates))
        except RecordError as error:
            if skipped is None and error.reason != "blank_line":
                raise
            skipped_here.add(error.reason, path, line_number, error.detail)
    if skipped is not None:
        skipped.merge(skipped_here)
    if not records:
        raise BadInputError("\n".join([f"{path}: no usable prompt", *skipped_here.table()]))
    return records


def read_prompts(paths: list[str], skipped: SkipCounter | None = None, replace_surrogates: bool = False):
    """The prompts of every file, in file and line order (see :func:`read_prompt_file`)."""
    return [record for path in paths for record in read_prompt_file(path, skipped, replace_surrogates)]


class PromptRenderer:
    """Renders prompt records to the token ids the model continues (see the module docstring)."""

    def __init__(self, tokenizer, template: str = "chat"):
        if template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")
        self.tokenizer, self.template = tokenizer, template
        self.chat = ChatTemplate(tokenizer) if template == "chat" else None

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a response: the end of the assistant turn (chat), or the end of the document."""
        if self.chat is not None:
            return self.chat.end_ids
        if self.tokenizer.eod is None:
            raise ValueError("the r1-zero template ends responses at the end-of-document id; this tokenizer has none")
        return [self.tokenizer.eod]

    def render(self, record: PromptRecord) -> list[int]:
        if self.chat is not None:
            return self.chat.render(record.messages, add_generation_prompt=True)[0]
        if len(record.messages) != 1:
            raise ValueError(
                f"{record.where}: the r1-zero template holds one user prompt; this record has "
                f"{len(record.messages)} messages (use the chat template)"
            )
        bos = [] if self.tokenizer.bos is None else [self.tokenizer.bos]
        return bos + self.tokenizer.tokenize(R1_ZERO_TEMPLATE.format(prompt=record.prompt))


class PromptStream:
    """Prompts without end: epoch after epoch, each in the order ``permutation(seed, epoch)``.
    ``state_dict()`` is the position, ``{"epoch", "index", "num_prompts"}``; ``load_state_dict``
    continues from it and refuses a position saved over a different number of prompts."""

    def __init__(self, records: list[PromptRecord], seed: int):
        if not records:
            raise ValueError("a prompt stream needs at least one prompt")
        self.records, self.seed = records, seed
        self.epoch = self.index = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        # Seeded by (seed, epoch) together: no two (seed, epoch) pairs share an order by construction.
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))

    def __iter__(self):
        return self

    def __next__(self) -> PromptRecord:
        if self.index == len(self.records):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        record = self.records[self._order[self.index]]
        self.index += 1
        return record

    def take(self, count: int) -> list[PromptRecord]:
        """The next ``count`` prompts (crossing into the next epoch when this one runs out)."""
        return [next(self) for _ in range(count)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_prompts": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != len(self.records):
            raise ValueError(
                f"the saved prompt position is over {state['num_prompts']} prompts, the prompt data now has "
                f"{len(self.records)}: resuming would not continue the same prompts"
            )
        if not (state["epoch"] >= 0 and 0 <= state["index"] <= len(self.records)):
            raise ValueError(f"invalid prompt position {state}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._epoch_order()
