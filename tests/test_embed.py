"""Dense-retrieval encoders: the embedded encoder (trained once, cached), technique=embed, and stages that name one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmexp.data.embedded import build_world
from llmexp.errors import UserError
from llmexp.retrieval.encoders import (
    embedded_directory, embedded_held_out, load_encoder, new_embedded_encoder, ranking_metrics, resolve_encoder,
    resolved_encoder_config,
)

from .conftest import read_results, run_llmexp

WORLD = OmegaConf.create({"data": {"seed": 0, "num_people": 30}})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder holding the embedded encoder of the default world, trained here once for the module."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["LLMEXP_CACHE_DIR"] = str(folder)
    try:
        load_encoder(None, WORLD)
        yield folder
    finally:
        os.environ.pop("LLMEXP_CACHE_DIR")


def held_out_ranking(encoder):
    world = build_world(0, 30)
    return ranking_metrics(encoder, *embedded_held_out(world), world.documents())


def test_the_embedded_encoder_is_cached_once_and_another_process_loads_the_same_weights(cache):
    path = embedded_directory(build_world(0, 30))
    assert path.parent.parent == cache and (path / "modules.json").is_file()
    record = json.loads((path / "encoder.json").read_text())
    saved = path.stat().st_mtime_ns
    here = load_encoder(None, WORLD)
    assert path.stat().st_mtime_ns == saved  # found, not trained again
    assert held_out_ranking(here) == record["held_out"]
    probe = ("import json, sys; from omegaconf import OmegaConf; from llmexp.retrieval.encoders import load_encoder; "
             "e = load_encoder(None, OmegaConf.create({'data': {'seed': 0, 'num_people': 30}})); "
             "print(json.dumps(e.encode('where does Kalo live ?').tolist()))")
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LLMEXP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert other.returncode == 0, other.stderr[-2000:]
    assert "training the embedded encoder" not in other.stderr
    assert json.loads(other.stdout) == pytest.approx(here.encode("where does Kalo live ?").tolist(), abs=1e-6)


def test_contrastive_training_ranks_the_held_out_questions_biography_first(cache):
    """Questions in the template training never used: the trained encoder finds their biography among 30 nearly
    always, the same architecture untrained about half the time."""
    untrained = held_out_ranking(new_embedded_encoder(build_world(0, 30).vocabulary(), seed=0))
    trained = held_out_ranking(load_encoder(None, WORLD))
    assert untrained["recall_at_1"] < 0.75 and untrained["mrr"] < 0.85
    assert trained["recall_at_1"] >= 0.95 and trained["recall_at_5"] == 1.0 and trained["mrr"] >= 0.97
    assert trained["mrr"] - untrained["mrr"] > 0.15


def test_training_is_a_function_of_the_seed(tmp_path):
    import torch

    from llmexp.retrieval.encoders import EncoderTraining, embedded_pairs, one_thread, train_encoder

    world = build_world(0, 30)
    weights = []
    with one_thread():
        for attempt in range(2):
            encoder = new_embedded_encoder(world.vocabulary(), seed=0)
            train_encoder(encoder, embedded_pairs(world), EncoderTraining(max_steps=8), 0, tmp_path / str(attempt),
                          cpu=True)
            weights.append(encoder.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    untrained = new_embedded_encoder(world.vocabulary(), seed=0).state_dict()
    assert not torch.equal(untrained["0.model.embeddings.word_embeddings.weight"],
                           weights[0]["0.model.embeddings.word_embeddings.weight"])


def test_a_directory_that_is_no_saved_encoder_is_refused_by_its_field(tmp_path):
    with pytest.raises(UserError, match=r"retriever\.encoder=.*no such directory"):
        load_encoder(str(tmp_path / "missing"), WORLD)
    with pytest.raises(UserError, match=r"technique\.encoder=.*without modules\.json"):
        load_encoder(str(tmp_path), WORLD, field="technique.encoder")


def test_technique_embed_trains_and_saves_an_encoder_sentence_transformers_loads(cache, tmp_path):
    from sentence_transformers import SentenceTransformer

    result = run_llmexp("technique=embed", "technique.untrained=true", "technique.epochs=3", "hydra.run.dir=run",
                        cwd=tmp_path, env={"LLMEXP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stage = read_results(tmp_path / "run")["stages"]["embed"]
    metrics = stage["metrics"]
    assert metrics["train_pairs"] == 450 and metrics["held_out_queries"] == 150 and metrics["documents"] == 30
    assert metrics["before_mrr"] < 0.85 and metrics["mrr"] >= 0.97 and metrics["recall_at_1"] >= 0.95
    saved = SentenceTransformer(stage["artifacts"]["encoder"])
    assert held_out_ranking(saved) == pytest.approx({k: v for k, v in metrics.items() if k in held_out_ranking(saved)})
    rows = [json.loads(line) for line in (tmp_path / "run/embed/train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 10 * rows[-1]["loss"]
    assert not (tmp_path / "run/embed/trainer").exists()
    # retriever.encoder=<the stage> searches with what it saved, through the retrieval core
    from llmexp.configuration.compose import compose_config
    from llmexp.retrieval import build_retriever
    from llmexp.retrieval.encoders import stage_records

    config = compose_config(["retriever=dense", "retriever.encoder=embed"])
    retriever = build_retriever(resolved_encoder_config(config, stage_records(tmp_path / "run")))
    questions, relevant = embedded_held_out(build_world(0, 30))
    found = [[hit.passage.document for hit in row] for row in retriever.search(questions, k=5)]
    assert sum(wanted <= set(row) for row, wanted in zip(found, relevant)) / len(questions) == metrics["recall_at_5"]


def pair_file(path: Path, templates: range) -> Path:
    """Every fact asked with ``templates``, with its person's biography and, as the hard negative, the biography of
    another person with the same value of that relation (the answer's word in it too)."""
    from llmexp.data.embedded import QUESTIONS

    world = build_world(0, 30)
    biographies = world.documents()
    lines = []
    for fact in world.facts:
        same = [f.person for f in world.facts if f.relation == fact.relation and f.value == fact.value
                and f.person != fact.person] or [p for p in world.people if p != fact.person]
        lines += [json.dumps({"query": QUESTIONS[fact.relation][t].format(p=fact.person),
                              "positive": biographies[fact.person], "negative": biographies[same[0]]})
                  for t in templates]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_pairs_with_hard_negatives_train_the_encoder(cache, tmp_path):
    train, held_out = pair_file(tmp_path / "train.jsonl", range(3)), pair_file(tmp_path / "val.jsonl", range(3, 4))
    result = run_llmexp("technique=embed", "technique.untrained=true", "technique.epochs=3", "data=jsonl",
                        f"data.path={train}", f"data.validation_path={held_out}", "hydra.run.dir=run", cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_results(tmp_path / "run")["stages"]["embed"]["metrics"]
    assert metrics["hard_negatives"] == 1 and metrics["train_pairs"] == 450 and metrics["held_out_queries"] == 150
    assert metrics["documents"] == 30  # the biographies, positives and negatives alike
    assert metrics["mrr"] > metrics["before_mrr"] + 0.15 and metrics["recall_at_1"] >= 0.9


UNKNOWN_WORDS = '{"query": "zorblax quuxland frobnicate ?", "positive": "frobnicate zorblax wibble quuxland ."}'


@pytest.mark.parametrize(("lines", "args", "message"), [
    (None, ["data=jsonl"], "data=jsonl without data.path holds none"),
    (['{"query": "a", "positive": "b", "negative": "c"}', '{"query": "d", "positive": "e"}'], [],
     "pairs.jsonl:2: line 1 has 'negative' and this one does not"),
    (['{"query": "a", "positive": 3}'], [], "pairs.jsonl:1: the 'positive' field is number, not text"),
    ([UNKNOWN_WORDS] * 4, [], "technique.encoder is unset, so the embedded encoder would train"),
    ([UNKNOWN_WORDS] * 4, ["data.validation_split=0"], "leaves none (data.validation_split=0.0)"),
    (None, ["technique.batch_size=1"], "technique.batch_size=1: a query's negatives are the other pairs"),
    (None, ["technique.lr=0", "technique.epochs=0"], "technique.epochs=0.0 must be positive"),
    (None, ["technique.encoder=missing_dir"], "technique.encoder=missing_dir: no such directory"),
    (None, ["technique.encoder=missing_dir", "technique.untrained=true"], "unset one of them"),
    (None, ["data=preference"], "data=preference holds none"),
])
def test_bad_input_is_refused_at_plan_time(tmp_path, monkeypatch, lines, args, message):
    from llmexp.configuration.compose import compose_config
    from llmexp.planning.planner import make_plan

    monkeypatch.chdir(tmp_path)
    data = []
    if lines is not None:
        (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
        data = ["data=jsonl", "data.path=pairs.jsonl"]
    plan = make_plan(compose_config(["technique=embed", *data, *args]))
    assert not plan.feasible and any(message in problem for problem in plan.problems), plan.problems


def test_a_refused_run_exits_2_and_writes_nothing(tmp_path):
    result = run_llmexp("technique=embed", "technique.batch_size=1", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2 and "technique.batch_size=1" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "embed").exists()


def embed_pipeline(*stages: str, **overrides: str):
    """A pipeline of embed stages ``first`` and ``second``, ``second`` continuing ``first``'s encoder."""
    from llmexp.configuration.compose import compose_config

    return compose_config([
        "pipeline=technique_only", "+technique@pipeline.nodes.first=embed", "+technique@pipeline.nodes.second=embed",
        f"pipeline.stages=[{','.join(stages)}]", "pipeline.nodes.second.encoder=first",
        *(f"{key}={value}" for key, value in overrides.items())])


def test_a_stage_name_is_an_encoder_the_plan_checks_and_a_run_resolves():
    from llmexp.planning.planner import make_plan

    plan = make_plan(embed_pipeline("first", "second"))
    assert plan.feasible, plan.problems
    misordered = make_plan(embed_pipeline("second", "first"))
    assert any("pipeline.nodes.second.encoder=first must name an embed stage that runs before 'second'" in problem
               for problem in misordered.problems)
    stages = {"first": {"technique": "embed", "artifacts": {"encoder": "/runs/1/first/encoder"}},
              "eval": {"technique": "evaluate", "artifacts": {}}}
    assert resolve_encoder("first", stages) == "/runs/1/first/encoder"
    assert resolve_encoder("/my/encoder", stages) == "/my/encoder" and resolve_encoder(None, stages) is None
    with pytest.raises(UserError, match="recorded no 'encoder' artifact"):
        resolve_encoder("eval", stages)
    config = embed_pipeline("first", "second", retriever="dense", **{"retriever.encoder": "first"})
    assert resolved_encoder_config(config, stages).retriever.encoder == "/runs/1/first/encoder"
    assert config.retriever.encoder == "first"


@pytest.mark.slow
def test_a_pipeline_stage_continues_the_encoder_an_earlier_embed_stage_saved(cache, tmp_path):
    result = run_llmexp("pipeline=technique_only", "+technique@pipeline.nodes.first=embed",
                        "+technique@pipeline.nodes.second=embed", "pipeline.stages=[first,second]",
                        "pipeline.nodes.first.untrained=true", "pipeline.nodes.first.max_steps=30",
                        "pipeline.nodes.second.encoder=first", "pipeline.nodes.second.max_steps=10",
                        "hydra.run.dir=run", cwd=tmp_path,
                        env={"LLMEXP_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stages = read_results(tmp_path / "run")["stages"]
    first, second = stages["first"]["metrics"], stages["second"]["metrics"]
    assert second["before_mrr"] == first["mrr"] and second["before_recall_at_1"] == first["recall_at_1"]
    assert first["train_steps"] == 30 and second["train_steps"] == 10
