"""llmexp.data.instructions: record layouts, validation split, prompt formatting, loss masking, padding."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from llmexp.data.embedded import build_world
from llmexp.data.instructions import (
    Example,
    encode_example,
    format_prompt,
    instruction_data,
    pad_collate,
    read_instruction_file,
)
from llmexp.data.splits import split_validation
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError


def write_records(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def data_cfg(**overrides):
    values = dict(name="jsonl", seed=0, num_people=30, path=None, validation_path=None, validation_split=0.1)
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(build_world(0).vocabulary())


def ids(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(text.split())


def test_every_record_layout_reads_to_prompt_and_response(tmp_path):
    path = write_records(
        tmp_path / "train.jsonl",
        {"prompt": "p1", "completion": "c1"},
        {"input": "i2", "output": "o2"},
        {"instruction": "do this", "input": "with that", "output": "o3"},
        {"instruction": "do this", "input": "", "output": "o4"},
        {"instruction": "only this", "output": "o5", "id": 17},
    )
    assert read_instruction_file(path) == [
        Example("p1", "c1"),
        Example("i2", "o2"),
        Example("do this\nwith that", "o3"),
        Example("do this", "o4"),
        Example("only this", "o5"),
    ]


def test_a_record_matching_no_layout_names_file_line_and_fields(tmp_path):
    path = write_records(
        tmp_path / "train.jsonl", {"prompt": "p", "completion": "c"}, "", {"question": "q", "answer": "a"}
    )
    with pytest.raises(UserError) as error:
        read_instruction_file(path)
    assert str(error.value) == (
        f"{path}:3: has fields ['answer', 'question']; "
        "expected one of: instruction+(input)+output, prompt+completion, input+output."
    )


def test_a_malformed_line_names_file_and_line(tmp_path):
    path = write_records(tmp_path / "train.jsonl", {"prompt": "p", "completion": "c"}, '{"prompt": "p",')
    with pytest.raises(UserError, match=rf"^{path}:2: not valid JSON"):
        read_instruction_file(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completion": 3}, "the 'completion' field is not text"),
        ({"input": ["x"], "output": "o"}, "the 'input' field is not text"),
        ({"prompt": "p", "completion": "  "}, "the 'completion' text is empty"),
        ({"instruction": "", "input": "", "output": "o"}, "the 'instruction/input' text is empty"),
    ],
)
def test_bad_field_values_name_file_and_line(tmp_path, record, message):
    path = write_records(tmp_path / "train.jsonl", {"prompt": "p", "completion": "c"}, record)
    with pytest.raises(UserError, match=rf"^{path}:2: {message}"):
        read_instruction_file(path)


def test_validation_split_sizes_and_determinism():
    records = list(range(20))
    train, validation = split_validation(records, data_cfg(validation_split=0.25))
    assert (len(train), len(validation)) == (15, 5)
    assert sorted(train + validation) == records and train == sorted(train) and validation == sorted(validation)
    assert split_validation(records, data_cfg(validation_split=0.25)) == (train, validation)
    assert split_validation(records, data_cfg(validation_split=0.25, seed=1))[1] != validation
    sizes = [len(split_validation(list(range(n)), data_cfg(validation_split=0.1))[1]) for n in (1, 2, 5, 10, 25)]
    assert sizes == [0, 1, 1, 1, 2]
    assert split_validation(records, data_cfg(validation_split=0.0)) == (records, [])


@pytest.mark.parametrize("share", [1.0, -0.1, 1.5])
def test_a_split_outside_zero_one_is_a_user_error(share):
    with pytest.raises(UserError, match=rf"data.validation_split={share} is outside \[0, 1\)"):
        split_validation([1, 2, 3], data_cfg(validation_split=share))


def test_jsonl_data_splits_or_reads_a_validation_file(tmp_path):
    train_path = write_records(tmp_path / "train.jsonl", *({"input": f"q{i}", "output": f"a{i}"} for i in range(10)))
    train, validation = instruction_data(data_cfg(path=str(train_path)))
    assert (len(train), len(validation)) == (9, 1)
    assert sorted(train + validation, key=lambda e: int(e.prompt[1:])) == read_instruction_file(train_path)
    valid_path = write_records(tmp_path / "valid.jsonl", {"prompt": "vq", "completion": "va"})
    train, validation = instruction_data(data_cfg(path=str(train_path), validation_path=str(valid_path)))
    assert (len(train), validation) == (10, [Example("vq", "va")])


def test_jsonl_data_needs_a_path_and_a_nonempty_file(tmp_path):
    with pytest.raises(UserError, match=r"^data=jsonl needs data.path=<train.jsonl>"):
        instruction_data(data_cfg())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match=rf"^{empty} holds no records"):
        instruction_data(data_cfg(path=str(empty)))


def test_embedded_data_is_the_text2sql_set_and_other_options_are_refused():
    train, validation = instruction_data(data_cfg(name="embedded"))
    assert (len(train), len(validation)) == (405, 45)
    assert train[0].response.startswith("SELECT ")
    with pytest.raises(UserError, match=r"^data=text holds no instruction data. .*data=embedded .*data=jsonl"):
        instruction_data(data_cfg(name="text"))


def test_encode_example_masks_exactly_the_prompt(tokenizer):
    example = Example("where does Dorfen live ?", "SELECT town FROM people WHERE name = Dorfen")
    input_ids, labels = encode_example(example, tokenizer, max_len=64)
    prompt = [tokenizer.bos_token_id] + ids(tokenizer, example.prompt)
    response = ids(tokenizer, example.response) + [tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in input_ids
    assert input_ids == prompt + response
    assert labels == [-100] * len(prompt) + response


def test_encode_example_drops_prompt_tokens_from_the_left_and_keeps_bos(tokenizer):
    example = Example("where does Dorfen live ?", "SELECT town")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    input_ids, labels = encode_example(example, tokenizer, max_len=6)
    assert input_ids == [bos] + ids(tokenizer, "live ? SELECT town") + [eos]
    assert labels == [-100] * 3 + ids(tokenizer, "SELECT town") + [eos]
    # A response longer than the whole budget keeps BOS and loses its own end (EOS included).
    input_ids, labels = encode_example(Example("where ?", "SELECT town FROM people WHERE"), tokenizer, max_len=4)
    assert input_ids == [bos] + ids(tokenizer, "SELECT town FROM")
    assert labels == [-100] + ids(tokenizer, "SELECT town FROM")


def test_format_prompt_without_and_with_a_chat_template(tokenizer):
    assert format_prompt("where ?", tokenizer) == "where ?\n"
    templated = word_level_tokenizer(build_world(0).vocabulary())
    templated.chat_template = (
        "{{ bos_token }} {% for m in messages %}Question: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} Answer:{% endif %}"
    )
    assert format_prompt("where does Dorfen live ?", templated) == "<s> Question: where does Dorfen live ? Answer:"
    input_ids, labels = encode_example(Example("where does Dorfen live ?", "Tesolmouth"), templated, max_len=64)
    prompt = ids(templated, "<s> Question: where does Dorfen live ? Answer:")  # one BOS: the template's
    assert input_ids == prompt + ids(templated, "Tesolmouth") + [templated.eos_token_id]
    assert labels == [-100] * len(prompt) + input_ids[len(prompt):]


def test_pad_collate_right_pads_to_the_longest_row():
    batch = pad_collate(pad_id=0)([([5, 6, 7], [-100, 6, 7]), ([5, 8, 9, 10, 11], [-100, -100, 9, 10, 11])])
    assert {k: v.tolist() for k, v in batch.items()} == {
        "input_ids": [[5, 6, 7, 0, 0], [5, 8, 9, 10, 11]],
        "labels": [[-100, 6, 7, -100, -100], [-100, -100, 9, 10, 11]],
        "attention_mask": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
    }
    assert {str(v.dtype) for v in batch.values()} == {"torch.int64"}


def test_data_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys, llmexp.data.text, llmexp.data.instructions, llmexp.data.preference, llmexp.data.text2sql\n"
        "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
