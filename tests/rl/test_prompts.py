"""megatron_r1.rl.prompts: records, bad lines counted by reason with file:line (or fatal under
--strict), a file without a usable line, rendering in both templates, and the resumable stream."""

import json

import pytest
from bad_input import LONE_SURROGATE, write_bad_line_file
from sft_task import train_task_tokenizer

from megatron_r1.data.jsonl import SKIP_REASONS, BadInputError, SkipCounter, StrictModeError
from megatron_r1.data.sft import ChatTemplate, RecordError
from megatron_r1.rl.prompts import (
    R1_ZERO_TEMPLATE,
    PromptRecord,
    PromptRenderer,
    PromptStream,
    parse_prompt_record,
    read_prompt_file,
    read_prompts,
)
from megatron_r1.tokenizer import SentencePieceTokenizer

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "copy a"},
        {"role": "assistant", "content": "a", "reasoning": "easy"},
        {"role": "user", "content": "copy b"},
    ],
    "answer": "b",
}


def _question(i: int) -> dict:
    return {"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3}


def test_records_of_both_formats_keep_their_other_fields():
    plain = parse_prompt_record(_question(4), "f:1")
    assert plain == PromptRecord([{"role": "user", "content": "What is 4 + 1?"}], {"answer": "5", "level": 1}, "f:1")
    chat = parse_prompt_record(CHAT, "f:2")
    assert chat.messages[2] == {"role": "assistant", "content": "a", "reasoning": "easy"}
    assert chat.prompt == "copy b" and chat.fields == {"answer": "b"}


@pytest.mark.parametrize(
    "record, reason, detail",
    [
        ({"answer": "1"}, "missing_key", "expected 'prompt' or 'messages'"),
        ({"prompt": "q", "messages": []}, "invalid_record", "has both 'prompt' and 'messages'"),
        ({"prompt": " \n"}, "empty_document", "the prompt is empty"),
        ({"prompt": 7}, "not_a_string", "'prompt' is a number"),
        ({"messages": CHAT["messages"][:3]}, "invalid_record", "the last message is 'assistant', not 'user'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_record", "messages[0] has role 'robot'"),
        ({"prompt": LONE_SURROGATE}, "lone_surrogate", "in 'prompt'"),
    ],
)
def test_bad_records_name_their_reason(record, reason, detail):
    with pytest.raises(RecordError) as error:
        parse_prompt_record(record, "f:3")
    assert error.value.reason == reason and detail in error.value.detail
    assert str(error.value).startswith("f:3: ")


def test_lone_surrogates_can_be_replaced():
    assert (
        parse_prompt_record({"prompt": LONE_SURROGATE}, "f:1", replace_surrogates=True).prompt
        == "lone \ufffd surrogate"
    )


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "bad.jsonl"
    return write_bad_line_file(path, lambda value: {"prompt": value, "answer": "1"}, _question)


def test_every_bad_line_is_counted_by_reason_with_file_and_line(bad_file):
    skipped = SkipCounter()
    records = read_prompt_file(bad_file["path"], skipped)
    assert len(records) == bad_file["documents"]
    assert skipped.counts == bad_file["skipped"]
    assert records[0].where == f"{bad_file['path']}:1" and records[0].fields == {"answer": "1", "level": 0}
    count, first = bad_file["skipped"]["invalid_json"], f"{bad_file['path']}:{bad_file['first_bad']}"
    assert f"  invalid_json ({SKIP_REASONS['invalid_json']}): {count}  e.g. {first}," in "\n".join(skipped.table())


def test_strict_stops_at_the_first_bad_line(bad_file):
    with pytest.raises(StrictModeError, match=f"^{bad_file['path']}:{bad_file['first_bad']}: invalid_json"):
        read_prompt_file(bad_file["path"], SkipCounter(strict=True))


def test_without_a_counter_blank_lines_pass_and_others_raise(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_question(0)) + "\n\n" + json.dumps(_question(1)) + "\n")
    assert [r.prompt for r in read_prompt_file(str(path))] == ["What is 0 + 1?", "What is 1 + 1?"]
    path.write_text(json.dumps(_question(0)) + "\n[1]\n")
    with pytest.raises(RecordError, match=f"^{path}:2: invalid_json"):
        read_prompt_file(str(path))


def test_a_file_without_a_usable_line_is_one_error_naming_it(tmp_path):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text(json.dumps(_question(0)) + "\n")
    empty.write_text('{"prompt": ""}\nnot json\n')
    skipped = SkipCounter()
    with pytest.raises(BadInputError) as error:
        read_prompts([str(good), str(empty)], skipped)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{empty}: no usable prompt" and lines[1] == "skipped lines: 2"
    assert skipped.total == 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return SentencePieceTokenizer(train_task_tokenizer(tmp_path_factory.mktemp("tok")))


def test_chat_rendering_is_the_fine_tuning_template_up_to_the_assistant_turn(tokenizer):
    record = parse_prompt_record(CHAT, "f:1")
    tokens = PromptRenderer(tokenizer).render(record)
    assert tokens == ChatTemplate(tokenizer).render(record.messages, add_generation_prompt=True)[0]
    assert tokens[0] == tokenizer.bos and tokens[-1] == tokenizer.token_to_id("<|assistant|>")


def test_r1_zero_rendering_is_the_plain_text_template(tokenizer):
    tokens = PromptRenderer(tokenizer, "r1-zero").render(parse_prompt_record(_question(36), "f:1"))
    text = R1_ZERO_TEMPLATE.format(prompt="What is 36 + 1?")
    assert text.endswith("<answer> answer here </answer>. User: What is 36 + 1?. Assistant:")
    assert tokens == [tokenizer.bos] + tokenizer.tokenize(text)
    assert tokenizer.token_to_id("<think>") in tokens  # the special token, not its letters
    with pytest.raises(ValueError, match="f:2: the r1-zero template holds one user prompt; this record has 4"):
        PromptRenderer(tokenizer, "r1-zero").render(parse_prompt_record(CHAT, "f:2"))
    with pytest.raises(ValueError, match="unknown prompt template"):
        PromptRenderer(tokenizer, "zero")


def _records(count):
    return [parse_prompt_record(_question(i), f"f:{i + 1}") for i in range(count)]


def test_stream_visits_every_prompt_once_per_epoch_in_a_new_seeded_order():
    stream = PromptStream(_records(10), seed=3)
    first, second = stream.take(10), stream.take(10)
    assert sorted(r.where for r in first) == sorted(r.where for r in second) == sorted(f"f:{i}" for i in range(1, 11))
    assert [r.where for r in first] != [r.where for r in second]
    assert stream.state_dict() == {"epoch": 1, "index": 10, "num_prompts": 10}
    assert [r.where for r in PromptStream(_records(10), seed=3).take(20)] == [r.where for r in first + second]
    assert [r.where for r in PromptStream(_records(10), seed=4).take(10)] != [r.where for r in first]


def test_a_resumed_stream_continues_with_the_same_prompts():
    straight = PromptStream(_records(7), seed=1)
    expected = [r.where for r in straight.take(30)]
    interrupted = PromptStream(_records(7), seed=1)
    before = [r.where for r in interrupted.take(12)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint keeps it
    resumed = PromptStream(_records(7), seed=1)
    resumed.load_state_dict(state)
    assert before + [r.where for r in resumed.take(18)] == expected


def test_a_position_saved_over_other_prompt_data_is_refused():
    stream = PromptStream(_records(7), seed=1)
    with pytest.raises(ValueError, match="over 8 prompts, the prompt data now has 7"):
        stream.load_state_dict({"epoch": 0, "index": 1, "num_prompts": 8})
    with pytest.raises(ValueError, match="invalid prompt position"):
        stream.load_state_dict({"epoch": 0, "index": 9, "num_prompts": 7})
