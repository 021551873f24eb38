"""Plain-text corpora for continued pretraining: files and folders of documents.

A paragraph is the natural document of prose and Markdown (blank lines separate them); a
JSONL corpus, the usual export of a scraped or filtered set, gives one ``"text"`` per line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from llmexp.data import noisy_web
from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.errors import UserError

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_FIX = "Give text files or folders of them, e.g. data.paths=[corpus/] or data.paths=[notes.md,more.jsonl]."


def _paragraphs(path: Path, text_field: str) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"data.paths: {path} is not UTF-8 text. Save it as UTF-8.") from None
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _jsonl_texts(path: Path, text_field: str) -> List[str]:
    texts = []
    for line, record in read_jsonl_numbered(path):
        if not isinstance(record.get(text_field), str):
            raise UserError(
                f'{path}:{line}: no text in a "{text_field}" field (fields on that line: {sorted(record)}). '
                f'Each line of a text corpus in JSONL looks like {{"{text_field}": "..."}}; data.text_field names '
                "the field that holds the text."
            )
        if record[text_field].strip():
            texts.append(record[text_field])
    return texts


# a file's documents; the JSONL reader takes them from the field data.text_field names
READERS: Dict[str, Callable[[Path, str], List[str]]] = {".txt": _paragraphs, ".md": _paragraphs, ".jsonl": _jsonl_texts}


def text_files(paths: Sequence[str]) -> List[Path]:
    """The corpus files under ``paths`` (files, or folders searched recursively in sorted order)."""
    if not paths:
        raise UserError(f"data=text needs data.paths: the files or folders of the corpus. {_FIX}")
    files: List[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(f for f in entry.rglob("*") if f.suffix in READERS and f.is_file())
        elif entry.is_file():
            if entry.suffix not in READERS:
                raise UserError(
                    f"data.paths: {entry} is a {entry.suffix or 'extensionless'} file; "
                    f"text corpora are {', '.join(READERS)} files. {_FIX}"
                )
            files.append(entry)
        else:
            raise UserError(
                f"data.paths: {entry} does not exist (relative paths are resolved against {Path.cwd()}). {_FIX}"
            )
    return files


def read_text_documents(paths: Sequence[str], text_field: str = "text") -> List[str]:
    """Every document under ``paths`` (``text_files``)."""
    documents: List[str] = []
    for file in text_files(paths):
        documents.extend(READERS[file.suffix](file, text_field))
    if not documents:
        raise UserError(
            f"data.paths={list(paths)} holds no documents (no non-empty paragraph "
            f"in a {', '.join(READERS)} file). {_FIX}"
        )
    return documents


RAW_TEXT_DATA = ("embedded", "text", "noisy_web", "knowledge")  # what pretraining, calibration and distillation read


def text_corpus(data) -> Tuple[List[str], str]:
    """``(paths, text_field)`` of a corpus on disk: ``data=text``'s files, or ``data=noisy_web``'s shards (generated
    when not cached yet)."""
    if data.name == "noisy_web":
        return noisy_web.shard_paths(data), noisy_web.TEXT_FIELD
    return list(data.paths), data.text_field


def raw_text_refusal(technique: str, data: str) -> str:
    """Why ``technique`` (pretrain, cpt, distill) cannot train on ``data=<data>``."""
    return (f"technique={technique} trains on raw text: data=embedded or data=text (data.paths=[...]); data={data} "
            "holds instructions or pairs (technique=sft, lora or dpo read those).")


def raw_text_problems(data, refusal: str) -> List[str]:
    """Problems of a run reading raw text: ``[refusal]`` for other data, and unreadable ``data=text`` files."""
    if data.name not in RAW_TEXT_DATA:
        return [refusal]
    if data.name == "noisy_web":
        return noisy_web.problems(data)
    if data.name == "text":
        try:
            read_text_documents(data.paths, data.text_field)
        except UserError as error:
            return [str(error)]
    return []
