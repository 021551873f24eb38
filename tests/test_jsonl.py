"""llmexp.data.jsonl: reading reports bad lines by file:line; writing is atomic."""

import json

import pytest

from llmexp.data.jsonl import read_jsonl, read_jsonl_numbered, write_jsonl
from llmexp.errors import UserError
from tests.conftest import run_llmexp


def write_lines(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_objects_in_order_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", '{"a": 1}', "", "   ", '{"a": 2, "b": "ü"}')
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2, "b": "ü"}]
    assert [number for number, _ in read_jsonl_numbered(path)] == [1, 4]


def test_tolerates_a_byte_order_mark_and_no_final_newline(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"a": 1}\n{"a": 2}'.encode("utf-8"))
    assert list(read_jsonl(path)) == [{"a": 1}, {"a": 2}]


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", '{"a": 1}', "", '{"a": 2,}')
    with pytest.raises(UserError, match=rf"{path}:3: not valid JSON .*fix or delete that line"):
        list(read_jsonl(path))


@pytest.mark.parametrize("line, kind", [("[1, 2]", "array"), ('"text"', "string"), ("7", "number"), ("null", "null")])
def test_a_line_that_is_not_an_object_names_file_and_line(tmp_path, line, kind):
    path = write_lines(tmp_path / "bad.jsonl", '{"a": 1}', line)
    with pytest.raises(UserError, match=rf"{path}:2: a JSON {kind}, not an object"):
        list(read_jsonl(path))


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: not UTF-8"):
        list(read_jsonl(path))


def test_a_line_nested_too_deeply_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "deep.jsonl", '{"a": 1}', '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match=rf"{path}:2: JSON nested deeper than Python's parser follows"):
        list(read_jsonl(path))


@pytest.mark.slow
def test_training_on_a_file_with_such_a_line_exits_2_before_writing_anything(tiny_checkpoint, tmp_path):
    path = write_lines(tmp_path / "train.jsonl", '{"prompt": "a", "completion": "b"}',
                       '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "b"}')
    done = run_llmexp("technique=sft", "data=jsonl", f"data.path={path}", f"model.path={tiny_checkpoint}",
                      cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{path}:2: JSON nested deeper" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_file_and_directory_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(read_jsonl(tmp_path / "absent.jsonl"))
    with pytest.raises(UserError, match="is a directory"):
        list(read_jsonl(tmp_path))


def test_write_round_trips_and_leaves_no_temporary_file(tmp_path):
    records = [{"prompt": "Question: x\nAnswer:", "scores": [-1.5, -2.0], "correct": True}, {"n": None}]
    path = write_jsonl(tmp_path / "sub" / "out.jsonl", records)
    assert list(read_jsonl(path)) == records
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [{"old": 1}])

    def broken():
        yield {"new": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert list(read_jsonl(path)) == [{"old": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
