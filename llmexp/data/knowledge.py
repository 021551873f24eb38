"""The knowledge study's data (``data=knowledge``): facts the base model never saw, and a model taught to read.

"Fine-tune or retrieve?" only means something about facts a model cannot already know. The
second world is a world of new people (``EmbeddedWorld.unseen``: names in the embedded
tokenizer that no text of the first world uses) whose five attributes are drawn from the same
relations and values as the first world's, so every word of its texts but the names is one the
base model knows. Its questions use the first world's held-out template, so no technique trains
on a test question's wording.

Every stage of the study reads one data option; ``data.instructions`` says which instructions
fine-tuning reads (a pipeline sets it per stage with ``pipeline.data_fields``):

* ``reading`` (the reader): "Context: <biographies>\\nQuestion: ...\\nAnswer:" -> the answer,
  in exactly the layout the retrieval condition builds (``context_prompt``), the answer followed by
  ``data.questions_per_context - 1`` more questions about the same context and their answers. The
  biographies are of practice people (the first world's people and the unseen names the second world
  leaves out) with facts drawn afresh for each example, so an answer can only come from reading: memory
  of the first world is wrong nine times in ten, and the practice names have no facts of their own. A context holds
  up to ``data.context_passages`` biographies, one of them the answer's; a share of the examples
  (``data.closed_book_share``) has no context and asks the first world's true facts, so a reader
  still answers from memory when nothing is retrieved. No second-world name or fact is in them.
* ``questions`` (fine-tuning on the new facts): every second-world fact asked with every training
  template, answered.

Continued pretraining reads the second world's biographies as raw text, each written
``data.paraphrases`` times in freshly drawn wordings (one copy of a fact is rarely learned; Ovadia
et al. 2023 found paraphrases needed for fine-tuning to inject knowledge). A retriever reads
the second world's ``EmbeddedWorld.documents()``: one biography per person, each fact stated once.
"""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

from llmexp.data.embedded import (
    CONTEXT_WORD, QUESTIONS, RELATIONS, STATEMENTS, TRAIN_TEMPLATES, EmbeddedWorld, Fact, _relation_values,
    build_world,
)
from llmexp.data.records import Example
from llmexp.data.splits import split_validation
from llmexp.errors import UserError

SECOND_WORLD_PEOPLE = 20  # of the world's unseen names; the others are the reader's practice names
INSTRUCTIONS = ("reading", "questions")


def context_prompt(passages: Sequence[str], prompt: str) -> str:
    """A prompt with passages before it: the layout a reader is trained on and retrieval-augmented evaluation asks."""
    return f"{CONTEXT_WORD} " + " ".join(passages) + "\n" + prompt


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def build_second_world(seed: int = 0, num_people: int = 30) -> EmbeddedWorld:
    """The people of the first world's unseen names and their facts, drawn from the first world's values (its
    towns among them); its held-out word-problem triples are the first world's. Deterministic in ``seed``."""
    first = build_world(seed, num_people)
    rng = random.Random(f"{seed}/second_world")
    people = first.unseen[:SECOND_WORLD_PEOPLE]
    facts = [Fact(p, r, rng.choice(_relation_values(r, first.towns))) for p in people for r in RELATIONS]
    return EmbeddedWorld(seed, people, first.towns, facts, first.heldout_triples)


def practice_names(first: EmbeddedWorld) -> List[str]:
    """Names the reader practises on: the first world's people and the unseen names the second world leaves out."""
    return first.people + first.unseen[SECOND_WORLD_PEOPLE:]


def biography(rng: random.Random, facts: Sequence[Fact]) -> str:
    """Every fact of ``facts`` stated once, in a drawn order and wording."""
    facts = list(facts)
    rng.shuffle(facts)
    return " ".join(rng.choice(STATEMENTS[f.relation]).format(p=f.person, v=f.value) for f in facts)


def pretraining_documents(world: EmbeddedWorld, paraphrases: int) -> List[str]:
    """Each person's biography ``paraphrases`` times, each time in a fresh order and wording."""
    rng = random.Random(f"{world.seed}/paraphrases")
    return [biography(rng, _facts_of(world, person)) for _ in range(paraphrases) for person in world.people]


def question_examples(world: EmbeddedWorld) -> List[Example]:
    """Every fact of ``world`` asked with every training template (never the held-out one the test asks)."""
    return [
        Example(question_prompt(QUESTIONS[f.relation][t].format(p=f.person)), f.value)
        for f in world.facts
        for t in range(TRAIN_TEMPLATES)
    ]


def reading_examples(first: EmbeddedWorld, count: int, passages: int, closed_book_share: float,
                     questions: int = 1) -> List[Example]:
    """``count`` reading examples (see the module docstring), deterministic in the world's seed."""
    rng = random.Random(f"{first.seed}/reading")
    names = practice_names(first)
    examples = []
    for _ in range(count):
        if rng.random() < closed_book_share:
            fact = rng.choice(first.facts)
            examples.append(Example(question_prompt(_train_question(rng, fact)), fact.value))
            continue
        people = rng.sample(names, rng.randint(1, passages))
        facts = {p: [Fact(p, r, rng.choice(_relation_values(r, first.towns))) for r in RELATIONS] for p in people}
        asked = [rng.choice(facts[people[0]])] + [rng.choice(facts[rng.choice(people)]) for _ in range(questions - 1)]
        rng.shuffle(people)
        context = [biography(rng, facts[p]) for p in people]
        first_question, *more = [question_prompt(_train_question(rng, fact)) for fact in asked]
        # the later questions and answers follow the first answer, as a reading-comprehension set asks several
        # questions of one passage: each answer a training signal for one read of the context (an evaluation
        # stops at the next "Question:")
        response = " ".join([asked[0].value] + [f"{q} {fact.value}" for q, fact in zip(more, asked[1:])])
        examples.append(Example(context_prompt(context, first_question), response))
    return examples


def knowledge_examples(data_cfg) -> Tuple[List[Example], List[Example]]:
    """(train, validation) instructions of ``data=knowledge``: ``data.instructions`` says which."""
    if data_cfg.instructions == "reading":
        first = build_world(data_cfg.seed, data_cfg.num_people)
        examples = reading_examples(first, data_cfg.reading_examples, data_cfg.context_passages,
                                    data_cfg.closed_book_share, data_cfg.questions_per_context)
        return split_validation(examples, data_cfg)
    if data_cfg.instructions == "questions":
        return split_validation(question_examples(second_world(data_cfg)), data_cfg)
    raise UserError(
        f"data.instructions={data_cfg.instructions}: data=knowledge fine-tunes on one of {', '.join(INSTRUCTIONS)} "
        "(reading: answering from a context, for the reader; questions: the second world's facts asked)."
    )


def second_world(data_cfg) -> EmbeddedWorld:
    return build_second_world(data_cfg.seed, data_cfg.num_people)


def evaluated_world(data_cfg) -> EmbeddedWorld:
    """The world whose questions an evaluation asks: the second world under ``data=knowledge`` (the new facts are
    what the study measures), else the embedded world of the data's settings."""
    if data_cfg.get("name") == "knowledge":
        return second_world(data_cfg)
    return build_world(data_cfg.seed, data_cfg.num_people)


def knowledge_corpus(data_cfg) -> List[str]:
    """The raw text continued pretraining reads: the second world's biographies, ``data.paraphrases`` times each."""
    if data_cfg.paraphrases < 1:
        raise UserError(f"data.paraphrases={data_cfg.paraphrases}: write each biography at least once "
                        "(data.paraphrases=1 or more).")
    return pretraining_documents(second_world(data_cfg), data_cfg.paraphrases)


def _facts_of(world: EmbeddedWorld, person: str) -> List[Fact]:
    return [f for f in world.facts if f.person == person]


def _train_question(rng: random.Random, fact: Fact) -> str:
    return QUESTIONS[fact.relation][rng.randrange(TRAIN_TEMPLATES)].format(p=fact.person)
