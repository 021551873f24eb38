"""The embedded instruction task: Text2SQL over the embedded world, scored by running the query.

Like the NeMo Text2SQL chapter, a question about one person becomes
``SELECT <column> FROM people WHERE name = <Person>`` on a table ``people`` with one row per
person and a column per relation. Training asks every fact with every training question
template; the test asks it with the held-out template, so a test question is never trained.
A prediction counts when it returns the gold query's rows from an in-memory sqlite3 copy of
the world, so ``WHERE name = X`` and ``WHERE name='X'`` score alike.
"""

from __future__ import annotations

import random
import re
import sqlite3
from dataclasses import dataclass
from typing import List, Optional, Tuple

from llmexp.data.embedded import QUESTIONS, RELATIONS, TRAIN_TEMPLATES, EmbeddedWorld, Fact
from llmexp.data.records import Example, PreferencePair

INSTRUCTION = "write the SQL query that answers the question ."
SQL_TEMPLATE = "SELECT {column} FROM people WHERE name = {person}"

# The tokenizer is word-level, so a model writes `name = Dorfen` with no quotes (a quote glued
# to a word would be an unknown token); quoting every bare value right of `=` makes it SQL.
_BARE_LITERAL = re.compile(r"=\s*([^\s'\"=;()]+)")
_READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}


@dataclass(frozen=True)
class Text2SqlItem:
    """A test question: ``prompt`` is the plain-text prompt (see ``format_prompt``), ``sql`` the gold query."""

    question: str
    prompt: str
    sql: str


def text2sql_prompt(question: str) -> str:
    """The user's side of an example: the constant instruction, then the question."""
    return f"{INSTRUCTION}\n{question}"


def gold_sql(fact: Fact) -> str:
    return SQL_TEMPLATE.format(column=fact.relation, person=fact.person)


def text2sql_examples(world: EmbeddedWorld) -> List[Example]:
    """Training examples: every fact asked with every training template (450 for 30 people)."""
    return [
        Example(text2sql_prompt(QUESTIONS[fact.relation][t].format(p=fact.person)), gold_sql(fact))
        for fact in world.facts
        for t in range(TRAIN_TEMPLATES)
    ]


def text2sql_test(world: EmbeddedWorld) -> List[Text2SqlItem]:
    """Every fact asked once with the held-out template, in fact order."""
    items = []
    for fact in world.facts:
        question = QUESTIONS[fact.relation][TRAIN_TEMPLATES].format(p=fact.person)
        items.append(Text2SqlItem(question, text2sql_prompt(question), gold_sql(fact)))
    return items


def text2sql_preference_pairs(world: EmbeddedWorld) -> List[PreferencePair]:
    """One pair per fact: a training question, its gold query, and a query that returns something else.

    The rejected query asks for another relation's column or names another person whose
    value differs, so by execution it is always wrong; choices are deterministic in the seed.
    """
    rng = random.Random(f"{world.seed}/text2sql_preference")
    values = {(f.person, f.relation): f.value for f in world.facts}
    pairs = []
    for fact in world.facts:
        question = QUESTIONS[fact.relation][rng.randrange(TRAIN_TEMPLATES)].format(p=fact.person)
        others = [p for p in world.people if values[(p, fact.relation)] != fact.value]
        if others and rng.random() < 0.5:
            wrong = Fact(rng.choice(others), fact.relation, "")
        else:
            wrong = Fact(fact.person, rng.choice([r for r in RELATIONS if r != fact.relation]), "")
        pairs.append(PreferencePair(text2sql_prompt(question), gold_sql(fact), gold_sql(wrong)))
    return pairs


def execute(sql: str, world: EmbeddedWorld) -> Optional[Tuple[tuple, ...]]:
    """The rows ``sql`` returns from the world's ``people`` table, sorted; None if it is not one valid SELECT.

    The table lives in a fresh in-memory database and an authorizer allows reading only, so
    a generated ``DROP`` or ``INSERT`` fails rather than runs; several statements fail too.
    """
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute(f"CREATE TABLE people (name TEXT, {', '.join(f'{r} TEXT' for r in RELATIONS)})")
        rows = {}
        for fact in world.facts:
            rows.setdefault(fact.person, {})[fact.relation] = fact.value
        connection.executemany(
            f"INSERT INTO people VALUES ({', '.join('?' * (len(RELATIONS) + 1))})",
            [(person, *(values[r] for r in RELATIONS)) for person, values in rows.items()],
        )
        connection.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ONLY else sqlite3.SQLITE_DENY)
        try:
            cursor = connection.execute(_BARE_LITERAL.sub(r"= '\1'", sql))
        except (sqlite3.Error, sqlite3.Warning):
            return None
        if cursor.description is None:  # no statement at all (empty text, a comment)
            return None
        return tuple(sorted(cursor.fetchall(), key=repr))
    finally:
        connection.close()


def sql_exact_match(prediction: str, gold: str) -> bool:
    """The same query text once runs of whitespace are collapsed."""
    return prediction.split() == gold.split()
