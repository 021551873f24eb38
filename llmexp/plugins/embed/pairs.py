"""What ``technique=embed`` trains on and scores: (query, positive[, negative]) pairs and held-out queries.

``data=embedded``: every fact of the world asked with the training question templates, against its
person's biography (``EmbeddedWorld.documents``); held out, every fact asked with the template the
evaluation asks, ranked against all biographies. ``data=jsonl``: the user's lines
``{"query", "positive"[, "negative"]}`` (a hard negative on every line or on none); the held-out
records come from ``data.validation_path`` or ``data.validation_split``, and each held-out query is
ranked against every distinct positive and negative text of both files, so the training records'
texts are the distractors a deployed retriever would meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set

from llmexp.data.embedded import build_world
from llmexp.data.jsonl import PathLike, read_jsonl_numbered, require_text
from llmexp.data.splits import read_train_and_validation
from llmexp.sdk import Pair, UserError, embedded_held_out, embedded_pairs

FIELDS = ("query", "positive")
NEGATIVE = "negative"
DATA = ("embedded", "jsonl")  # the data options it reads


@dataclass
class PairData:
    """Training pairs, and held-out queries with the ids of their relevant documents among ``documents``."""

    train: List[Pair]
    queries: List[str]
    relevant: List[Set[str]]
    documents: Dict[str, str]  # id -> text

    @property
    def hard_negatives(self) -> bool:
        return bool(self.train) and len(self.train[0]) == 3


def pair_data(data_cfg) -> PairData:
    """The pairs and held-out queries of the ``data`` option (``DATA``); another is a ``UserError``."""
    if data_cfg.name == "embedded":
        world = build_world(data_cfg.seed, data_cfg.num_people)
        queries, relevant = embedded_held_out(world)
        return PairData(embedded_pairs(world), queries, relevant, world.documents())
    if data_cfg.name == "jsonl" and data_cfg.path:
        train, held_out = read_train_and_validation(data_cfg, read_pair_file)
        if not held_out:
            raise UserError(
                f"technique=embed scores its encoder on held-out pairs, and data.path={data_cfg.path} leaves none "
                f"(data.validation_split={data_cfg.validation_split}); set data.validation_split=0.1 or give "
                "data.validation_path=<pairs.jsonl>.")
        if {len(pair) for pair in train + held_out} != {len(train[0])}:
            raise UserError(
                f"data.path={data_cfg.path} and data.validation_path={data_cfg.validation_path}: one has a "
                f"{NEGATIVE!r} on every line and the other on none; give hard negatives in both or in neither.")
        texts = dict.fromkeys(text for pair in train + held_out for text in pair[1:])
        return PairData(train, [pair[0] for pair in held_out], [{pair[1]} for pair in held_out],
                        {text: text for text in texts})
    raise UserError(
        f"technique=embed trains on (query, positive) pairs: data=embedded (the embedded world's questions and "
        f"biographies) or data=jsonl data.path=<pairs.jsonl> with lines {{\"query\", \"positive\"[, \"negative\"]}}"
        f"; data={data_cfg.name}{' without data.path' if data_cfg.name == 'jsonl' else ''} holds none.")


def read_pair_file(path: PathLike) -> List[Pair]:
    """The (query, positive[, negative]) of each line of ``path``; a bad line is a ``UserError`` at ``file:line``."""
    fix = ('A line is {"query": "...", "positive": "..."}, with an optional "negative": a text that does not '
           "answer the query, on every line or on none.")
    pairs: List[Pair] = []
    first_line = None
    for line, record in read_jsonl_numbered(path):
        require_text(path, line, record, FIELDS + ((NEGATIVE,) if NEGATIVE in record else ()), fix)
        pair = tuple(record[key] for key in FIELDS + ((NEGATIVE,) if NEGATIVE in record else ()))
        if pairs and len(pair) != len(pairs[0]):
            has = "has" if len(pairs[0]) == 3 else "has no"
            raise UserError(f"{path}:{line}: line {first_line} {has} {NEGATIVE!r} and this one "
                            f"{'does' if len(pair) == 3 else 'does not'}. {fix}")
        if any(not text.strip() for text in pair):
            raise UserError(f"{path}:{line}: an empty text. {fix}")
        if len(pair) == 3 and pair[2].strip() == pair[1].strip():
            raise UserError(f"{path}:{line}: the negative is the positive's text. {fix}")
        first_line = first_line or line
        pairs.append(pair)
    return pairs
