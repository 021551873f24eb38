"""The corpus as shards: read record by record from byte offsets, written back in the input's format.

A shard is a run of up to ``shard_records`` consecutive records of one file, found by one streaming
scan that notes where each shard starts (``plan_shards``). Any process (a Dask worker included)
reads a shard on its own by seeking there (``read_shard``), so no step holds the corpus in memory.
Records keep their input order and a global index, which makes every decision deterministic.

JSONL keeps one record per line: a kept record is written back as the very line it was read from,
or, when redaction changed its text, as the same object with only the text field replaced, so
every other field (an ``id``) passes through. ``.txt``/``.md`` files hold a document per paragraph;
their kept paragraphs are written joined by blank lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, List, Optional, Sequence, Tuple

from llmexp.data.text import READERS, text_files
from llmexp.sdk import UserError, replace_atomically

_FIX = "Give text files or folders of them, e.g. data.paths=[corpus/] or data.paths=[notes.md,more.jsonl]."


@dataclass(frozen=True)
class Shard:
    """Records ``first`` .. ``first + count - 1`` (global indices), read from ``source`` at byte ``start``."""

    number: int
    source: str
    start: int
    first: int
    count: int

    @property
    def output_name(self) -> str:
        return f"part-{self.number:05d}{Path(self.source).suffix}"


@dataclass
class Record:
    """One document: its global index, its text, and for JSONL the object and raw line it came from."""

    index: int
    text: str
    line: Optional[bytes] = None  # JSONL: the line as read, written back unchanged when the text is
    fields: Optional[dict] = None  # JSONL: the parsed object


def corpus_files(paths: Sequence[str]) -> List[Path]:
    """The corpus files under ``paths``, as data=text reads them (``text_files``); at least one."""
    files = text_files(paths)
    if not files:
        raise UserError(f"data.paths={list(paths)} holds no {', '.join(READERS)} file. {_FIX}")
    return files


def _decode(raw: bytes, path: Path, line: int, offset: int) -> str:
    """A line's text; a byte-order mark is dropped only at the start of the file."""
    try:
        return raw.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {error.start + 1} of the line). Save the file as UTF-8."
        ) from None


def _jsonl_records(handle: IO[bytes], path: Path, text_field: str) -> Iterator[Tuple[int, str, bytes, dict]]:
    """``(offset, text, raw line, object)`` for each non-blank line from the handle's position on."""
    offset = handle.tell()
    for line, raw in enumerate(handle, start=1):
        text = _decode(raw, path, line, offset)
        if text.strip():
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line}: not JSON ({error.msg}). Each line of a JSONL corpus is one object.")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(
                    f'{path}:{line}: no text in a "{text_field}" field (fields on that line: {fields}). Each line '
                    f'of a text corpus in JSONL looks like {{"{text_field}": "..."}}; data.text_field names the '
                    "field that holds the text."
                )
            yield offset, record[text_field], raw.rstrip(b"\r\n"), record
        offset += len(raw)


def _paragraphs(handle: IO[bytes], path: Path) -> Iterator[Tuple[int, str]]:
    """``(offset, paragraph)`` for each paragraph (lines up to a blank one) from the handle's position on."""
    offset = start = handle.tell()
    lines: List[bytes] = []
    for line, raw in enumerate(handle, start=1):
        if _decode(raw, path, line, offset).strip():
            if not lines:
                start = offset
            lines.append(raw)
        elif lines:
            yield start, b"".join(lines).decode("utf-8-sig" if start == 0 else "utf-8").strip()
            lines = []
        offset += len(raw)
    if lines:
        yield start, b"".join(lines).decode("utf-8-sig" if start == 0 else "utf-8").strip()


def _records_at(path: Path, text_field: str, start: int) -> Iterator[Tuple[int, Record]]:
    """``(offset, record)`` for the file's records from byte ``start`` on; indices count from 0 there.

    Line numbers in errors count from ``start``: the scan that finds the shards reads from 0 and meets them first.
    """
    with path.open("rb") as handle:
        handle.seek(start)
        if path.suffix == ".jsonl":
            for n, (offset, text, raw, fields) in enumerate(_jsonl_records(handle, path, text_field)):
                yield offset, Record(n, text, raw, fields)
        else:
            for n, (offset, text) in enumerate(_paragraphs(handle, path)):
                yield offset, Record(n, text)


def plan_shards(paths: Sequence[str], text_field: str, shard_records: int) -> List[Shard]:
    """One streaming scan of the corpus: where each shard of ``shard_records`` records starts (absolute paths:
    a Dask worker reads its shard from another directory)."""
    shards: List[Shard] = []
    first = 0
    for path in corpus_files(paths):
        starts, count = [], 0
        for offset, _ in _records_at(path, text_field, 0):
            if count % shard_records == 0:
                starts.append(offset)
            count += 1
        for k, start in enumerate(starts):
            done = k * shard_records
            shards.append(Shard(len(shards), str(path.resolve()), start, first + done, min(shard_records, count - done)))
        first += count
    if not first:
        raise UserError(f"data.paths={list(paths)} holds no documents (every file is empty). {_FIX}")
    return shards


def read_shard(shard: Shard, text_field: str) -> Iterator[Record]:
    """The shard's records, with their global indices."""
    for n, (_, record) in zip(range(shard.count), _records_at(Path(shard.source), text_field, shard.start)):
        record.index = shard.first + n
        yield record


def write_shard(shard: Shard, kept: Iterable[Tuple[Record, str]], folder: Path, text_field: str) -> Path:
    """Write the kept ``(record, its final text)`` of ``shard`` to ``folder/<part>`` atomically."""
    jsonl = Path(shard.source).suffix == ".jsonl"

    def write(handle: IO[bytes]) -> None:
        for n, (record, text) in enumerate(kept):
            if jsonl:
                handle.write(record.line if text == record.text else json.dumps(
                    {**record.fields, text_field: text}, ensure_ascii=False).encode("utf-8"))
                handle.write(b"\n")
            else:
                handle.write((b"\n\n" if n else b"") + text.encode("utf-8"))
        if not jsonl:
            handle.write(b"\n")

    return replace_atomically(folder / shard.output_name, write, binary=True)
