"""llmexp.data.text: corpora from files and folders, with errors that name data.paths or file:line."""

import json

import pytest

from llmexp.data.text import read_text_documents
from llmexp.errors import UserError


def test_a_text_file_gives_one_document_per_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\ufeffFirst paragraph\nstill first.\n\n  \n  Second.  \n\n\n\nThird\n", encoding="utf-8")
    assert read_text_documents([str(path)]) == ["First paragraph\nstill first.", "Second.", "Third"]


def test_a_folder_is_read_recursively_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("b one\n\nb two\n")
    (corpus / "a.md").write_text("# A title\n\nA body.\n")
    (corpus / "sub" / "c.jsonl").write_text(json.dumps({"text": "c one", "id": 1}) + "\n\n" + '{"text": " "}\n')
    (corpus / "skip.csv").write_text("not,a,document\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("extra\n")
    documents = read_text_documents([str(corpus), str(extra)])
    assert documents == ["# A title", "A body.", "b one", "b two", "c one", "extra"]


def test_a_jsonl_line_without_text_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "wrong key"}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: no text in a \"text\" field \(fields on that line: \['body'\]\)"):
        read_text_documents([str(path)])
    path.write_text('{"text": 7}\n')
    with pytest.raises(UserError, match=rf"^{path}:1: no text"):
        read_text_documents([str(path)])


def test_a_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match=rf"^{path}:2: not valid JSON"):
        read_text_documents([str(path)])


def test_missing_and_unsupported_paths_name_data_paths(tmp_path):
    with pytest.raises(UserError, match=rf"data.paths: {tmp_path / 'absent'} does not exist"):
        read_text_documents([str(tmp_path / "absent")])
    table = tmp_path / "table.csv"
    table.write_text("a,b\n")
    with pytest.raises(UserError, match=r"data.paths: .*table.csv is a .csv file; text corpora are .txt, .md, .jsonl"):
        read_text_documents([str(table)])
    with pytest.raises(UserError, match=r"data=text needs data.paths"):
        read_text_documents([])


def test_no_documents_at_all_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "other.csv").write_text("ignored in a folder\n")
    with pytest.raises(UserError, match=r"data.paths=\[.*\] holds no documents"):
        read_text_documents([str(tmp_path)])


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=rf"{path} is not UTF-8"):
        read_text_documents([str(path)])


def test_the_text_of_a_jsonl_record_comes_from_data_text_field(tmp_path):
    corpus = tmp_path / "crawl.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": n, "content": f"page {n}"}) for n in range(3)) + "\n")
    assert read_text_documents([str(corpus)], "content") == ["page 0", "page 1", "page 2"]
    with pytest.raises(UserError, match='no text in a "text" field .* data.text_field names the field'):
        read_text_documents([str(corpus)])
