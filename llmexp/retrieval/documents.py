"""The documents a retriever searches: read from the user's files, or the embedded world's biographies.

A ``.txt``/``.md`` file is one document whose id is its path relative to ``retriever.documents``
(the file's name when a single file is given), so a hit names the file a user can open. A ``.jsonl``
file gives one document per line, ``{"id": ..., "text": ...[, "title": ...]}``. The fingerprint of
the documents decides whether a cached index still describes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from llmexp.configuration.retrieval import DOCUMENT_SUFFIXES as SUFFIXES
from llmexp.data.knowledge import evaluated_world
from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.errors import UserError

FIELD = "retriever.documents"
_FIX = (f"Set {FIELD}=<a .txt/.md/.jsonl file or a folder of them> (JSONL lines: "
        '{"id": "...", "text": "..."}), or leave it unset for the data option\'s own documents.')


@dataclass(frozen=True)
class Document:
    """One source a hit can be traced back to; ``id`` is what retrieval metrics compare."""

    id: str
    text: str
    title: str = ""


def read_documents(path) -> List[Document]:
    """Every document in ``path`` (a file, or a folder searched recursively in sorted order); ids must be unique."""
    root = Path(str(path))
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.suffix in SUFFIXES and f.is_file())
    elif root.is_file():
        if root.suffix not in SUFFIXES:
            raise UserError(f"{FIELD}={path} is a {root.suffix or 'extensionless'} file, not one of "
                            f"{', '.join(SUFFIXES)}. {_FIX}")
        files = [root]
    else:
        raise UserError(f"{FIELD}={path} does not exist (relative paths are resolved against {Path.cwd()}). {_FIX}")
    documents: List[Document] = []
    for file in files:
        relative = file.name if file == root else file.relative_to(root).as_posix()
        documents += _READERS[file.suffix](file, relative)
    if not documents:
        raise UserError(f"{FIELD}={path} holds no documents (no non-empty {', '.join(SUFFIXES)} file). {_FIX}")
    seen: Dict[str, None] = {}
    for document in documents:
        if document.id in seen:
            raise UserError(f"{FIELD}={path}: two documents have the id {document.id!r}; give each its own id "
                            "(retrieval metrics and a hit's source are compared by id).")
        seen[document.id] = None
    return documents


def _whole_file(file: Path, relative: str) -> List[Document]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{FIELD}: {file} is not UTF-8 text. Save it as UTF-8.") from None
    return [Document(relative, text.strip())] if text.strip() else []


def _jsonl_lines(file: Path, relative: str) -> List[Document]:
    documents = []
    try:
        for line, record in read_jsonl_numbered(file):
            fields = {key: record.get(key) for key in ("id", "text", "title")}
            if not isinstance(fields["id"], (str, int)) or not isinstance(fields["text"], str) or \
                    not isinstance(fields["title"] or "", str):
                raise UserError(
                    f"{file}:{line}: a document needs a string \"id\" and \"text\" (and an optional string "
                    f"\"title\"); that line has the fields {sorted(record)}. Each line looks like "
                    '{"id": "doc-1", "text": "...", "title": "..."}.'
                )
            if fields["text"].strip():
                documents.append(Document(str(fields["id"]), fields["text"].strip(), fields["title"] or ""))
    except UserError as error:
        raise UserError(f"{FIELD}: {error}") from None
    return documents


_READERS: Dict[str, Callable[[Path, str], List[Document]]] = {".txt": _whole_file, ".md": _whole_file,
                                                               ".jsonl": _jsonl_lines}


def documents_for(cfg) -> List[Document]:
    """``retriever.documents`` when set, else the biographies (one per person, id = the name) of the world the
    evaluation asks about (``evaluated_world``: the embedded world, or under ``data=knowledge`` the second world).

    Every data option keeps the embedded world's settings (``data.seed``, ``data.num_people``), and the
    embedded evaluation tasks ask about that world, so its biographies are the documents those questions come from.
    """
    if cfg.retriever.documents:
        return read_documents(cfg.retriever.documents)
    world = evaluated_world(cfg.data)
    return [Document(person, text) for person, text in world.documents().items()]


def fingerprint(documents: List[Document]) -> str:
    """A hash of every document's id, title and text, in order: equal iff an index of them is still current."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(json.dumps([document.id, document.title, document.text]).encode())
    return digest.hexdigest()
