"""The embedded default's data: a made-up world generated from one seed, with checkable tasks.

Thirty people with five attributes each give 150 facts. Training text states the facts
(biographies), asks about them (multiple choice in MMLU's letter layout, free answer) and
poses GSM8K-style word problems whose worked answers end in ``#### N``. The test sets ask
every fact with a question template never used in training, and word problems whose
number triples were never trained, so a score measures what the model learned rather than
what it memorised. Everything is a pure function of the seed: no network, no files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

LETTERS = "ABCD"

_SYLLABLES = ["ka", "lo", "mi", "ren", "ta", "vo", "shi", "bel", "dor", "ya", "fen", "gu", "ri", "sol", "an", "te"]
_TOWN_ENDINGS = ["ville", "ford", "holm", "stead", "mouth", "gate"]

VALUES: Dict[str, List[str]] = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"],
    "pet": ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "pony", "lizard", "ferret"],
    "job": ["baker", "doctor", "pilot", "farmer", "teacher", "painter", "sailor", "miner", "tailor", "judge"],
    "food": ["rice", "soup", "bread", "cheese", "apples", "noodles", "beans", "honey", "fish", "pears"],
}
# "town" values are invented names, made per seed like the people's names.
RELATIONS = ["town", "colour", "pet", "job", "food"]

STATEMENTS: Dict[str, List[str]] = {
    "town": ["{p} lives in {v} .", "{p} comes from {v} .", "the home town of {p} is {v} .", "{p} has a house in {v} ."],
    "colour": ["{p} likes the colour {v} .", "the favourite colour of {p} is {v} .", "{p} always wears {v} .", "{p} loves {v} things ."],
    "pet": ["{p} has a {v} .", "the pet of {p} is a {v} .", "{p} owns a {v} .", "{p} walks a {v} every day ."],
    "job": ["{p} works as a {v} .", "{p} is a {v} .", "the job of {p} is {v} .", "{p} earns money as a {v} ."],
    "food": ["{p} eats {v} .", "the favourite food of {p} is {v} .", "{p} cooks {v} for dinner .", "{p} likes to eat {v} ."],
}
# The last template of each relation is held out: test questions use it, training never does.
QUESTIONS: Dict[str, List[str]] = {
    "town": ["where does {p} live ?", "what is the home town of {p} ?", "which town does {p} come from ?", "in which town is the house of {p} ?"],
    "colour": ["what colour does {p} like ?", "what is the favourite colour of {p} ?", "which colour does {p} wear ?", "what colour is loved by {p} ?"],
    "pet": ["what pet does {p} have ?", "what is the pet of {p} ?", "which animal does {p} own ?", "what animal does {p} walk ?"],
    "job": ["what is the job of {p} ?", "what does {p} work as ?", "what is {p} by trade ?", "how does {p} earn money ?"],
    "food": ["what does {p} eat ?", "what is the favourite food of {p} ?", "what does {p} cook for dinner ?", "which food does {p} like ?"],
}
TRAIN_TEMPLATES = 3
# Words of the Text2SQL set (llmexp.data.text2sql) that the texts above lack. They come after
# the sorted words, never merged into them, so every older token id (and checkpoint) stays valid.
TEXT2SQL_WORDS = ("write", "SQL", "query", "that", "answers", "question", "SELECT", "FROM", "WHERE", "people", "name")
# Words of the knowledge study (llmexp.data.knowledge), after those: the word that opens a retrieved context, and
# names no text of this world mentions (people the base model never saw). A fixed count, so the vocabulary
# grows with num_people exactly as before.
CONTEXT_WORD = "Context:"
UNSEEN_NAMES = 45

ITEMS = ["apples", "pens", "coins", "stamps", "books", "shells", "cards", "marbles"]
WORD_PROBLEM_MAX = 12  # a, b in 1..12; c in 1..a+b-1
MIXTURE = {"biography": 0.3, "multiple_choice": 0.25, "free_answer": 0.25, "word_problem": 0.2}


@dataclass(frozen=True)
class Fact:
    person: str
    relation: str
    value: str


@dataclass(frozen=True)
class MultipleChoice:
    """A question with four options; ``answer`` indexes ``choices``."""

    question: str
    choices: Tuple[str, ...]
    answer: int

    def letter_prompt(self) -> str:
        """MMLU's layout: the question, lettered options, then ``Answer:`` (the target is `` B``)."""
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, self.choices))
        return f"Question: {self.question}\n{options}\nAnswer:"

    def cloze_prompt(self) -> str:
        """The question alone; each option's text is scored as its continuation."""
        return f"Question: {self.question}\nAnswer:"


@dataclass(frozen=True)
class FreeAnswer:
    prompt: str
    answer: str


@dataclass(frozen=True)
class WordProblem:
    """A GSM8K-style problem; ``solution`` is the worked answer ending in ``#### <answer>``."""

    question: str
    solution: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"


@dataclass
class EmbeddedWorld:
    """The world and every text made from it; see the module docstring."""

    seed: int
    people: List[str]
    towns: List[str]
    facts: List[Fact]
    heldout_triples: frozenset
    unseen: List[str] = field(default_factory=list)  # names in the vocabulary that no text of this world uses

    # -- text a model trains on -------------------------------------------------------
    def training_documents(self, count: int, word_problem_weight: float = 1.0, stream: int = 0) -> List[str]:
        """``count`` documents in the training mixture, deterministic in (seed, stream)."""
        rng = random.Random(f"{self.seed}/train/{stream}")
        weights = dict(MIXTURE, word_problem=MIXTURE["word_problem"] * word_problem_weight)
        kinds, probs = zip(*weights.items())
        makers = {
            "biography": self._biography,
            "multiple_choice": self._train_multiple_choice,
            "free_answer": self._train_free_answer,
            "word_problem": self._train_word_problem,
        }
        return [makers[kind](rng) for kind in rng.choices(kinds, probs, k=count)]

    def heldout_documents(self, count: int) -> List[str]:
        """Fresh biographies and word problems (held-out numbers) for perplexity."""
        rng = random.Random(f"{self.seed}/heldout")
        docs = []
        for i in range(count):
            if i % 2 == 0:
                docs.append(self._biography(rng))
            else:
                a, b, c = rng.choice(sorted(self.heldout_triples))
                problem = self._word_problem(rng, a, b, c)
                docs.append(f"{problem.prompt} {problem.solution}")
        return docs

    def documents(self) -> Dict[str, str]:
        """One biography per person, by name: each of the person's facts stated once, with its relation's first
        statement template, in ``RELATIONS`` order. What a retriever over the world searches; deterministic."""
        return {
            person: " ".join(STATEMENTS[f.relation][0].format(p=f.person, v=f.value) for f in self.facts if f.person == person)
            for person in self.people
        }

    # -- tests ------------------------------------------------------------------------
    def multiple_choice_test(self) -> List[MultipleChoice]:
        rng = random.Random(f"{self.seed}/mc_test")
        return [self._multiple_choice(rng, fact, QUESTIONS[fact.relation][TRAIN_TEMPLATES]) for fact in self.facts]

    def free_answer_test(self) -> List[FreeAnswer]:
        return [
            FreeAnswer(f"Question: {QUESTIONS[f.relation][TRAIN_TEMPLATES].format(p=f.person)}\nAnswer:", f.value)
            for f in self.facts
        ]

    def word_problems(self, count: int, stream: int = 0) -> List[WordProblem]:
        """``count`` word problems as training poses them (number triples never held out), deterministic in
        (seed, stream): what fine-tuning and reinforcement learning on the skill read."""
        rng = random.Random(f"{self.seed}/wp_train/{stream}")
        return [self._trained_problem(rng) for _ in range(count)]

    def word_problem_test(self, count: int = 150) -> List[WordProblem]:
        rng = random.Random(f"{self.seed}/wp_test")
        triples = sorted(self.heldout_triples)
        rng.shuffle(triples)
        return [self._word_problem(rng, *triple) for triple in triples[:count]]

    def vocabulary(self) -> List[str]:
        """Every word any generated text can contain, in a fixed order."""
        words = set(self.people) | set(self.towns) | set(ITEMS) | set(LETTERS)
        words.update(f"{letter}." for letter in LETTERS)
        for values in VALUES.values():
            words.update(values)
        texts = [t for templates in (*STATEMENTS.values(), *QUESTIONS.values()) for t in templates]
        for text in texts + [_WP_TEMPLATE, _WP_SOLUTION, "Question: Answer:"]:
            words.update(w for w in text.split() if "{" not in w)
        words.update(str(n) for n in range(0, 2 * WORD_PROBLEM_MAX + 1))
        return sorted(words) + list(TEXT2SQL_WORDS) + [CONTEXT_WORD] + self.unseen

    # -- makers -----------------------------------------------------------------------
    def _values(self, relation: str) -> List[str]:
        return _relation_values(relation, self.towns)

    def _statement(self, rng: random.Random, fact: Fact) -> str:
        return rng.choice(STATEMENTS[fact.relation]).format(p=fact.person, v=fact.value)

    def _biography(self, rng: random.Random) -> str:
        person = rng.choice(self.people)
        facts = [f for f in self.facts if f.person == person]
        rng.shuffle(facts)
        return " ".join(self._statement(rng, f) for f in facts)

    def _train_question(self, rng: random.Random, fact: Fact) -> str:
        return QUESTIONS[fact.relation][rng.randrange(TRAIN_TEMPLATES)].format(p=fact.person)

    def _multiple_choice(self, rng: random.Random, fact: Fact, template: str) -> MultipleChoice:
        distractors = rng.sample([v for v in self._values(fact.relation) if v != fact.value], 3)
        answer = rng.randrange(4)
        choices = distractors[:answer] + [fact.value] + distractors[answer:]
        return MultipleChoice(template.format(p=fact.person), tuple(choices), answer)

    def _train_multiple_choice(self, rng: random.Random) -> str:
        fact = rng.choice(self.facts)
        item = self._multiple_choice(rng, fact, QUESTIONS[fact.relation][rng.randrange(TRAIN_TEMPLATES)])
        text = f"{item.letter_prompt()} {LETTERS[item.answer]}"
        # Sometimes the fact precedes the question, so reading and answering are tied together.
        return f"{self._statement(rng, fact)} {text}" if rng.random() < 0.3 else text

    def _train_free_answer(self, rng: random.Random) -> str:
        fact = rng.choice(self.facts)
        return f"Question: {self._train_question(rng, fact)}\nAnswer: {fact.value}"

    def _train_word_problem(self, rng: random.Random) -> str:
        problem = self._trained_problem(rng)
        return f"{problem.prompt} {problem.solution}"

    def _trained_problem(self, rng: random.Random) -> WordProblem:
        while True:
            triple = _random_triple(rng)
            if triple not in self.heldout_triples:
                return self._word_problem(rng, *triple)

    def _word_problem(self, rng: random.Random, a: int, b: int, c: int) -> WordProblem:
        person, item = rng.choice(self.people), rng.choice(ITEMS)
        question = _WP_TEMPLATE.format(p=person, a=a, b=b, c=c, i=item)
        total, answer = a + b, a + b - c
        solution = _WP_SOLUTION.format(a=a, b=b, c=c, t=total, r=answer)
        return WordProblem(question, solution, answer)


_WP_TEMPLATE = "{p} has {a} {i} . {p} buys {b} more and gives away {c} . how many {i} does {p} have now ?"
_WP_SOLUTION = "{a} + {b} = {t} . {t} - {c} = {r} . #### {r}"


def _relation_values(relation: str, towns: List[str]) -> List[str]:
    """The values a relation can take: the world's invented towns, or a fixed pool."""
    return towns if relation == "town" else VALUES[relation]


def _random_triple(rng: random.Random) -> Tuple[int, int, int]:
    a, b = rng.randint(1, WORD_PROBLEM_MAX), rng.randint(1, WORD_PROBLEM_MAX)
    return a, b, rng.randint(1, a + b - 1)


def _invent_names(rng: random.Random, count: int, parts: int, endings: Sequence[str] = ("",)) -> List[str]:
    names: List[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts)) + rng.choice(endings)
        name = name.capitalize()
        if name not in names:
            names.append(name)
    return names


def build_world(seed: int = 0, num_people: int = 30) -> EmbeddedWorld:
    """The world for ``seed``: same seed, same people, facts, held-out split and texts."""
    rng = random.Random(f"{seed}/world")
    people = _invent_names(rng, num_people, parts=2)
    towns = [t for t in _invent_names(rng, 10 + num_people, parts=2, endings=_TOWN_ENDINGS) if t not in people][:10]
    facts = [
        Fact(person, relation, rng.choice(_relation_values(relation, towns)))
        for person in people
        for relation in RELATIONS
    ]
    all_triples = [
        (a, b, c)
        for a in range(1, WORD_PROBLEM_MAX + 1)
        for b in range(1, WORD_PROBLEM_MAX + 1)
        for c in range(1, a + b)
    ]
    heldout = frozenset(rng.sample(all_triples, k=len(all_triples) // 5))
    # a stream of its own, so the world above is drawn exactly as before these names existed
    unseen = [n for n in _invent_names(random.Random(f"{seed}/unseen"), UNSEEN_NAMES + len(people), parts=2)
              if n not in people][:UNSEEN_NAMES]
    return EmbeddedWorld(seed, people, towns, facts, heldout, unseen)


def embedded_token_stream(world: EmbeddedWorld, tokenizer, word_problem_weight: float = 1.0, chunk: int = 4096):
    """Endless training documents as token ids, each ``<s> ... </s>``; deterministic in the world's seed."""
    stream = 0
    while True:
        documents = world.training_documents(chunk, word_problem_weight, stream=stream)
        for ids in tokenizer(documents)["input_ids"]:
            yield ids + [tokenizer.eos_token_id]
        stream += 1
