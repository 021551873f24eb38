"""llmexp.data.text2sql: the embedded Text2SQL sets, their vocabulary, and scoring by execution."""

import hashlib

from omegaconf import OmegaConf

from llmexp.data.embedded import TEXT2SQL_WORDS, build_world
from llmexp.data.instructions import encode_example, format_prompt
from llmexp.data.text2sql import (
    execute,
    sql_exact_match,
    text2sql_examples,
    text2sql_preference_pairs,
    text2sql_test,
)
from llmexp.data.tokenizer import word_level_tokenizer

from .conftest import REPO

# sha256 of the seed-0 vocabulary before the Text2SQL words (190 words, sorted): changing
# any of those ids would silently re-number every embedded checkpoint saved so far.
OLD_SEED0_VOCABULARY = "e8bdcd54f5851dc2c2a8d4cc38bdea8bc7954553a6f12df3053468d46f479b53"


def test_text2sql_words_are_appended_so_older_ids_stay():
    vocabulary = build_world(0).vocabulary()
    old, new = vocabulary[:190], vocabulary[190:190 + len(TEXT2SQL_WORDS)]  # the knowledge study's words follow
    assert old == sorted(old)
    assert hashlib.sha256(" ".join(old).encode()).hexdigest() == OLD_SEED0_VOCABULARY
    assert new == list(TEXT2SQL_WORDS)
    tokenizer = word_level_tokenizer(vocabulary)
    assert tokenizer.convert_tokens_to_ids(old) == list(range(4, 194))
    assert len(tokenizer) == 205 + 1 + 45 <= OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml").vocab_size
    for seed in range(5):
        assert len(set(build_world(seed).vocabulary())) == len(build_world(seed).vocabulary())


def test_every_generated_text_is_in_the_vocabulary():
    world = build_world(0)
    tokenizer = word_level_tokenizer(world.vocabulary())
    texts = [e.prompt + "\n" + e.response for e in text2sql_examples(world)]
    texts += [item.prompt + "\n" + item.sql for item in text2sql_test(world)]
    texts += [f"{p.prompt}\n{p.chosen}\n{p.rejected}" for p in text2sql_preference_pairs(world)]
    ids = [i for row in tokenizer(texts)["input_ids"] for i in row]
    assert tokenizer.unk_token_id not in ids


def test_sizes_and_test_questions_never_trained():
    world = build_world(0)
    train, test, pairs = text2sql_examples(world), text2sql_test(world), text2sql_preference_pairs(world)
    assert (len(train), len(set(train)), len(test), len(pairs)) == (450, 450, 150, 150)
    trained = "\n".join(e.prompt for e in train) + "\n".join(p.prompt for p in pairs)
    assert not [item.question for item in test if item.question in trained]
    assert {item.sql for item in test} == {e.response for e in train}  # same queries, new phrasings
    example = train[0]
    assert example.prompt == "write the SQL query that answers the question .\n" + example.prompt.split("\n")[1]
    assert example.response == f"SELECT town FROM people WHERE name = {world.people[0]}"
    assert test[0].prompt.endswith("\n" + test[0].question)


def test_sets_are_deterministic_in_the_seed():
    assert text2sql_preference_pairs(build_world(2)) == text2sql_preference_pairs(build_world(2))
    assert text2sql_examples(build_world(2)) != text2sql_examples(build_world(3))


def test_gold_sql_returns_the_fact_and_a_wrong_column_does_not():
    world = build_world(0)
    values = {(f.person, f.relation): f.value for f in world.facts}
    for fact, item in zip(world.facts, text2sql_test(world)):
        assert execute(item.sql, world) == ((values[(fact.person, fact.relation)],),)
    person = world.people[0]
    town, colour = values[(person, "town")], values[(person, "colour")]
    assert execute(f"SELECT colour FROM people WHERE name = {person}", world) == ((colour,),) != ((town,),)
    assert execute(f"select  town from people where name='{person}' ;", world) == ((town,),)
    assert execute("SELECT town FROM people WHERE name = Nobody", world) == ()
    assert execute("SELECT name FROM people", world) == tuple((p,) for p in sorted(world.people))


def test_anything_but_one_valid_select_gives_none():
    world = build_world(0)
    for sql in [
        "DROP TABLE people",
        "SELECT town FROM people; DROP TABLE people",
        "SELECT town FROM people; SELECT pet FROM people",
        "DELETE FROM people",
        "INSERT INTO people VALUES (1, 2, 3, 4, 5, 6)",
        "DELETE FROM people RETURNING name",  # returns rows like a SELECT: only the authorizer stops it
        "UPDATE people SET town = Nowhere RETURNING name",
        "SELECT town FROM people WHERE name = Dorfen Dorfen",
        "SELECT shoe FROM people",
        "town FROM people",
        "",
        "-- SELECT town FROM people",
        "PRAGMA table_info(people)",
    ]:
        assert execute(sql, world) is None, sql


def test_rejected_queries_are_valid_but_return_something_else():
    world = build_world(0)
    pairs = text2sql_preference_pairs(world)
    for pair in pairs:
        chosen, rejected = execute(pair.chosen, world), execute(pair.rejected, world)
        assert chosen and rejected and chosen != rejected
    column_swaps = sum(p.chosen.split()[-1] == p.rejected.split()[-1] for p in pairs)
    assert 30 < column_swaps < 120  # both kinds of wrong query occur


def test_exact_match_ignores_whitespace_only():
    gold = "SELECT town FROM people WHERE name = Dorfen"
    assert sql_exact_match("  SELECT town\nFROM people  WHERE name = Dorfen ", gold)
    assert not sql_exact_match("SELECT town FROM people WHERE name = 'Dorfen'", gold)


def test_examples_fit_the_default_block_and_train_only_on_the_query():
    world = build_world(0)
    tokenizer = word_level_tokenizer(world.vocabulary())
    example = text2sql_examples(world)[0]
    input_ids, labels = encode_example(example, tokenizer, max_len=64)
    prompt_length = len(tokenizer(format_prompt(example.prompt, tokenizer))["input_ids"])
    assert len(input_ids) < 64
    assert labels[:prompt_length] == [-100] * prompt_length
    assert tokenizer.decode(labels[prompt_length:]) == example.response + " </s>"
