"""``pipeline=curate_train``: a curated corpus feeds a training stage (``pipeline.data_inputs``), and it shows."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_results, run_llmexp

pytest.importorskip("datasketch")


@pytest.mark.slow
def test_training_on_the_curated_crawl_beats_the_raw_crawl_on_clean_held_out_text(tmp_path):
    done = run_llmexp("pipeline=curate_train", "pipeline.nodes.raw.max_steps=300", "pipeline.nodes.raw_eval.limit=60",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = read_results(tmp_path / "run")["stages"]
    curate, raw, curated = stages["curate"], stages["raw"], stages["curated"]
    assert curated["input_data"] == "curate" and curated["input_model"] is None and "input_data" not in raw
    assert curate["metrics"]["records_out"] < curate["metrics"]["records_in"]
    # the curated stage read the curated corpus: what it wrote, redacted, and nothing the rules removed
    parts = sorted((tmp_path / "run" / "curate" / "curated").glob("part-*.jsonl"))
    records = [json.loads(line) for part in parts for line in part.read_text().splitlines()]
    assert len(records) == curate["metrics"]["records_out"]
    assert raw["metrics"]["train_tokens"] == curated["metrics"]["train_tokens"]  # the same steps of the same batches
    raw_eval, curated_eval = stages["raw_eval"]["metrics"], stages["curated_eval"]["metrics"]
    assert curated_eval["perplexity"] < 0.85 * raw_eval["perplexity"]
    assert curated_eval["perplexity_rel_delta"] == pytest.approx(curated_eval["perplexity"] / raw_eval["perplexity"] - 1)
