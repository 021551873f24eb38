"""The ``retrieval`` task type: how well the run's retriever finds the documents questions come from.

It scores the ``retriever`` option itself, not the model: each question is searched, the ranked passages'
documents (each counted once, at its best passage) are compared with the question's sources, and
``llmexp.sdk.retrieval_metrics`` gives ``recall_at_1``, ``recall_at_5``, ``recall_at_10``, ``mrr`` and
``ndcg_at_10``. A row lists the documents retrieved; its ``correct`` flag (every source among the first 5)
makes the headline ``recall_at_5`` when, as in the embedded questions, each question has one source.

* ``retrieval`` (bare): the embedded world's free-answer test questions (the held-out template), each
  sourced from its person's biography (``retriever.documents`` unset: the world's biographies).
* ``{type: retrieval, path: questions.jsonl}``: the user's questions, a line each,
  ``{"question": "...", "sources": ["<document id>", ...]}``, over ``retriever.documents``.

The index is the stage's ``retrieval_index/`` (``INDEX_DIRECTORY``), shared with the rag condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Set, Tuple

from llmexp.data.embedded import QUESTIONS, TRAIN_TEMPLATES
from llmexp.data.jsonl import read_jsonl_numbered
from llmexp.sdk import INDEX_DIRECTORY, Metric, MetricKind, TaskInputs, TaskResult, TaskType, UserError, declared
from llmexp.sdk import build_retriever, retrieval_metrics

KS = (1, 5, 10)
HEADLINE_K = 5
_LAYOUT = '{"question": "...", "sources": ["<document id>", ...]}'


def read_questions(path: Any) -> List[Tuple[str, List[str]]]:
    """``(question, sources)`` of each line of ``path``; a malformed line is a ``UserError`` at ``file:line``."""
    questions = []
    for line, record in read_jsonl_numbered(path):
        question, sources = record.get("question"), record.get("sources")
        if not isinstance(question, str) or not question.strip() or not isinstance(sources, list) or not sources \
                or not all(isinstance(source, str) for source in sources):
            raise UserError(f"{path}:{line}: a retrieval question is {_LAYOUT} with at least one source; that "
                            f"line has the fields {sorted(record)}.")
        questions.append((question, sources))
    return questions


def embedded_questions(world) -> List[Tuple[str, List[str]]]:
    """The world's free-answer test questions (asked with the held-out template), each sourced from its person."""
    return [(QUESTIONS[fact.relation][TRAIN_TEMPLATES].format(p=fact.person), [fact.person]) for fact in world.facts]


def run(spec: Mapping[str, Any], inputs: TaskInputs, scorer) -> TaskResult:
    items = inputs.first(read_questions(spec["path"]) if spec.get("path") else embedded_questions(inputs.world))
    retriever = build_retriever(inputs.config, Path(inputs.stage_dir) / INDEX_DIRECTORY)
    known = {passage.document for passage in retriever.passages}
    for question, sources in items:
        missing = [source for source in sources if source not in known]
        if missing:
            raise UserError(f"{spec.get('path', 'retrieval')}: the question {question!r} names source(s) "
                            f"{', '.join(map(repr, missing))}, which retriever.documents does not hold; its sources "
                            "are document ids (a .txt/.md file's path relative to retriever.documents, a JSONL "
                            "line's id).")
    hits = retriever.search([question for question, _ in items], k=max(KS) * 4)
    ranked = [list(dict.fromkeys(hit.passage.document for hit in row))[: max(KS)] for row in hits]
    relevant: List[Set[str]] = [set(sources) for _, sources in items]
    rows = [
        {"question": question, "sources": sources, "retrieved": documents,
         "passages": [hit.passage.id for hit in row][: max(KS)],
         "correct": set(sources) <= set(documents[:HEADLINE_K])}
        for (question, sources), documents, row in zip(items, ranked, hits)
    ]
    metrics = retrieval_metrics(ranked, relevant, KS)
    return TaskResult({name: metrics[name] for name in _METRICS}, rows)


def problems(spec: Mapping[str, Any], field: str) -> List[str]:
    if not spec.get("path"):
        return []
    try:
        if not read_questions(spec["path"]):
            return [f"{field}.path={spec['path']} holds no questions; add lines {_LAYOUT}."]
    except UserError as error:
        return [f"{field}.path: {error}"]
    return []


_METRICS = (*(f"recall_at_{k}" for k in KS), "mrr", "ndcg_at_10")
RETRIEVAL = TaskType(
    "retrieval", run, problems, keys=("path",), headline=f"recall_at_{HEADLINE_K}", embedded=True,
    metrics=declared(*(Metric(name, True, name, MetricKind.QUALITY if name == f"recall_at_{HEADLINE_K}" else MetricKind.INFO)
                       for name in _METRICS)),
)
