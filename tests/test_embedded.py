"""The embedded world: deterministic, and its tests never leak into training."""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from llmexp.data.embedded import QUESTIONS, TRAIN_TEMPLATES, build_world
from llmexp.data.tokenizer import word_level_tokenizer

from .conftest import REPO


def test_same_seed_same_world_and_text():
    a, b = build_world(3), build_world(3)
    assert a.facts == b.facts and a.heldout_triples == b.heldout_triples
    assert a.training_documents(50) == b.training_documents(50)
    assert a.multiple_choice_test() == b.multiple_choice_test()
    assert build_world(4).facts != a.facts


def test_world_shape():
    world = build_world(0)
    assert len(world.people) == 30 and len(set(world.people)) == 30
    assert len(world.facts) == 150
    assert len(world.word_problem_test()) == 150


def test_heldout_question_phrasing_never_trained():
    world = build_world(0)
    training = "\n".join(world.training_documents(20000))
    heldout = {QUESTIONS[f.relation][TRAIN_TEMPLATES].format(p=f.person) for f in world.facts}
    assert not [q for q in heldout if q in training]
    trained = {QUESTIONS[f.relation][0].format(p=f.person) for f in world.facts}
    assert sum(q in training for q in trained) > 100  # the trained phrasings do occur


def test_heldout_word_problem_numbers_never_trained():
    world = build_world(0)
    pattern = re.compile(r"has (\d+) \w+ \. \w+ buys (\d+) more and gives away (\d+)")
    trained = {tuple(map(int, m)) for m in pattern.findall("\n".join(world.training_documents(20000)))}
    assert len(trained) > 500
    assert not trained & world.heldout_triples
    assert all((p.answer == int(p.solution.split("#### ")[1])) for p in world.word_problem_test())


def test_multiple_choice_items_are_well_formed():
    world = build_world(0)
    values = {(f.person, f.relation): f.value for f in world.facts}
    for fact, item in zip(world.facts, world.multiple_choice_test()):
        assert item.choices[item.answer] == values[(fact.person, fact.relation)]
        assert len(set(item.choices)) == 4
        assert item.letter_prompt().endswith("\nD. " + item.choices[3] + "\nAnswer:")


def test_tokenizer_covers_every_generated_word_and_fits_the_model():
    world = build_world(0)
    tokenizer = word_level_tokenizer(world.vocabulary())
    texts = world.training_documents(3000) + world.heldout_documents(100)
    texts += [item.letter_prompt() for item in world.multiple_choice_test()]
    texts += [p.prompt + " " + p.solution for p in world.word_problem_test()]
    ids = [i for row in tokenizer(texts)["input_ids"] for i in row]
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) <= OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml").vocab_size
    sample = "Question: what pet ?\nAnswer: 4 + 9 = 13 . #### 13"
    assert tokenizer.decode(tokenizer(sample)["input_ids"], skip_special_tokens=True) == sample.replace("\n", " ")
