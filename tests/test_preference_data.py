"""llmexp.data.preference: pair files, their errors, and both sides padded to one length."""

import json
from types import SimpleNamespace

import pytest

from llmexp.data.embedded import build_world
from llmexp.data.instructions import encode_example
from llmexp.data.preference import encode_pair, pair_collate, preference_data, read_preference_file
from llmexp.data.records import Example, PreferencePair
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError


def write_records(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def data_cfg(**overrides):
    values = dict(name="preference", seed=0, num_people=30, path=None, validation_path=None, validation_split=0.1)
    return SimpleNamespace(**{**values, **overrides})


def pair_record(i):
    return {"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"}


def test_reads_pairs_in_file_order(tmp_path):
    path = write_records(tmp_path / "pairs.jsonl", pair_record(0), {**pair_record(1), "source": "ignored"})
    assert read_preference_file(path) == [PreferencePair("q0", "good0", "bad0"), PreferencePair("q1", "good1", "bad1")]


def test_a_record_without_the_three_text_fields_names_file_line_and_fields(tmp_path):
    path = write_records(
        tmp_path / "pairs.jsonl", pair_record(0), {"prompt": "q", "chosen": "a", "rejected": None}
    )
    with pytest.raises(UserError) as error:
        read_preference_file(path)
    assert str(error.value).startswith(f"{path}:2: has fields ['chosen', 'prompt', 'rejected']; a preference pair needs")
    path = write_records(tmp_path / "pairs.jsonl", {"prompt": "q", "response": "a"})
    with pytest.raises(UserError, match=rf"^{path}:1: has fields \['prompt', 'response'\]"):
        read_preference_file(path)


def test_a_pair_whose_sides_are_the_same_text_is_refused(tmp_path):
    same = {"prompt": "q", "chosen": " same\n", "rejected": "same"}
    path = write_records(tmp_path / "pairs.jsonl", pair_record(0), pair_record(1), same)
    with pytest.raises(UserError, match=rf"^{path}:3: chosen and rejected are the same text; a pair must differ"):
        read_preference_file(path)


def test_preference_data_from_a_file_split_or_with_a_validation_file(tmp_path):
    train_path = write_records(tmp_path / "pairs.jsonl", *map(pair_record, range(10)))
    train, validation = preference_data(data_cfg(path=str(train_path)))
    assert (len(train), len(validation)) == (9, 1)
    assert set(train) | set(validation) == set(read_preference_file(train_path))
    valid_path = write_records(tmp_path / "valid.jsonl", pair_record(99))
    train, validation = preference_data(data_cfg(path=str(train_path), validation_path=str(valid_path)))
    assert (len(train), validation) == (10, [PreferencePair("q99", "good99", "bad99")])


def test_without_a_path_the_embedded_pairs_serve_and_other_options_are_refused():
    embedded = preference_data(data_cfg(name="embedded"))
    assert preference_data(data_cfg()) == embedded
    assert (len(embedded[0]), len(embedded[1])) == (135, 15)
    with pytest.raises(UserError, match=r"^data=jsonl holds no preference pairs. .*data=preference data.path="):
        preference_data(data_cfg(name="jsonl", path="train.jsonl"))


def test_encode_pair_encodes_each_side_as_an_example_and_collate_pads_both_to_one_length():
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    pair = PreferencePair("where does Dorfen live ?", "SELECT town FROM people WHERE name = Dorfen", "SELECT pet")
    encoded = encode_pair(pair, tokenizer, max_len=64)
    for side in ("chosen", "rejected"):
        expected = encode_example(Example(pair.prompt, getattr(pair, side)), tokenizer, 64)
        assert (encoded[f"{side}_input_ids"], encoded[f"{side}_labels"]) == expected
    assert encoded["rejected_labels"][-3:] == tokenizer.convert_tokens_to_ids(["SELECT", "pet", "</s>"])
    assert encoded["rejected_labels"][:-3] == [-100] * 6

    short = {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2],
             "rejected_input_ids": [1, 3, 4], "rejected_labels": [-100, 3, 4]}
    longer = {"chosen_input_ids": [1, 5, 6, 7], "chosen_labels": [-100, -100, 6, 7],
              "rejected_input_ids": [1, 8], "rejected_labels": [-100, 8]}
    batch = {k: v.tolist() for k, v in pair_collate(pad_id=0)([short, longer]).items()}
    assert batch == {
        "chosen_input_ids": [[1, 2, 0, 0], [1, 5, 6, 7]],
        "chosen_labels": [[-100, 2, -100, -100], [-100, -100, 6, 7]],
        "chosen_attention_mask": [[1, 1, 0, 0], [1, 1, 1, 1]],
        "rejected_input_ids": [[1, 3, 4, 0], [1, 8, 0, 0]],
        "rejected_labels": [[-100, 3, 4, -100], [-100, 8, -100, -100]],
        "rejected_attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0]],
    }
