"""llmexp.data.gsm8k: the real JSONL format, and the strict '#### N' answer extraction."""

import json

import pytest

from llmexp.data.gsm8k import FLEXIBLE_EXTRACT, GSM8KProblem, extract_answer, load_gsm8k, parse_number
from llmexp.errors import UserError

# Written in GSM8K's layout: worked steps with <<calculator>> annotations, then "#### N".
PROBLEMS = [
    {
        "question": "A baker makes 48 rolls in the morning and half as many in the afternoon. How many rolls does he make?",
        "answer": "In the afternoon he makes 48/2 = <<48/2=24>>24 rolls.\nHe makes 48+24 = <<48+24=72>>72 rolls.\n#### 72",
    },
    {
        "question": "A shop sells 1,000 pens a day for 2 days, then 234 more. How many pens did it sell?",
        "answer": "In two days it sells 1,000*2 = <<1000*2=2000>>2,000 pens.\nThen 2,000+234 = <<2000+234=2234>>2,234.\n#### 2,234",
    },
    {
        "question": "The temperature was 3 degrees and fell by 8 degrees. What is it now?",
        "answer": "It is 3-8 = <<3-8=-5>>-5 degrees.\n#### -5",
    },
]


def write_gsm8k(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_loads_questions_solutions_and_numeric_answers(tmp_path):
    problems = load_gsm8k(write_gsm8k(tmp_path / "test.jsonl", PROBLEMS))
    assert [p.answer for p in problems] == [72, 2234, -5]
    assert all(isinstance(p.answer, int) for p in problems)
    assert problems[0] == GSM8KProblem(PROBLEMS[0]["question"], PROBLEMS[0]["answer"], 72)
    assert problems[1].prompt == f"Question: {PROBLEMS[1]['question']}\nAnswer:"


def test_limit_reads_only_the_first_problems(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", PROBLEMS + [{"broken": True}])
    assert [p.answer for p in load_gsm8k(path, limit=2)] == [72, 2234]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 72 in total.\n#### 72", 72),
        ("#### 1,234", 1234),
        ("#### -5", -5),
        ("#### 3.50", 3.5),
        ("####72.", 72),
        ("#### $1,000", 1000),
        ("first #### 3 then #### 4", 3),  # strict match takes the first
        ("#### 12 Question: next one #### 99", 12),
        ("the answer is 12", None),
        ("#### twelve", None),
        ("", None),
    ],
)
def test_strict_extraction(text, expected):
    assert extract_answer(text) == expected


def test_flexible_extraction_falls_back_to_the_last_number():
    assert extract_answer("5 apples and then 1,234 pears", FLEXIBLE_EXTRACT) == 1234
    assert extract_answer("#### 7 and later 9", FLEXIBLE_EXTRACT) == 7


def test_parse_number():
    assert parse_number("1,234") == 1234 and parse_number("-5") == -5 and parse_number("2.0") == 2
    assert parse_number("2.5") == 2.5 and parse_number("x") is None


@pytest.mark.parametrize(
    "record, message",
    [
        ({"answer": "#### 1"}, r"'question' field is missing \(keys on that line: answer\)"),
        ({"question": "q?"}, r"'answer' field is missing"),
        ({"question": "q?", "answer": 4}, r"'answer' field is 4, not text"),
        ({"question": "q?", "answer": "it is 4"}, r"answer does not contain '#### <number>'"),
    ],
)
def test_bad_problem_names_file_and_line(tmp_path, record, message):
    path = write_gsm8k(tmp_path / "test.jsonl", PROBLEMS[:2] + [record])
    with pytest.raises(UserError, match=rf"{path}:3: (the )?{message}"):
        load_gsm8k(path)


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", PROBLEMS[:1])
    with path.open("a") as handle:
        handle.write('{"question": "unterminated\n')
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON"):
        load_gsm8k(path)
