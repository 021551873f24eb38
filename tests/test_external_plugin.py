"""A technique from a package outside llmexp (examples/llmexp-nexttoken), installed for real, declares its plan
checks, its memory per device and its metric on itself, and llmexp's plan, run, results.json, comparison table
and Pareto plot take them in with no change to the core."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmexp.configuration.compose import compose_config

from .conftest import read_results, run_llmexp
from .plugin_packages import install_example

SMALL = ["pipeline.nodes.baseline.max_steps=3", "pipeline.nodes.fp8.calibration_size=8",
         "pipeline.nodes.probe.documents=4", "pipeline.nodes.fp8_probe.documents=4"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The installed plugin: the environment that finds it, and its copy's configs (``conf/``)."""
    root = tmp_path_factory.mktemp("external_plugin")
    env = {**install_example("llmexp-nexttoken", root), "OMP_NUM_THREADS": "1"}
    return {"env": env, "conf": str(root / "llmexp-nexttoken" / "conf"), "root": root}


def test_the_plan_shows_its_memory_part_and_refuses_its_bad_value(plugin, tmp_path):
    done = run_llmexp("plan", "--json", "technique=next_token", "pipeline=technique_only", cwd=tmp_path,
                      env=plugin["env"])
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    vocab = compose_config([]).model.vocab_size
    assert plan["memory_breakdown"]["logits"] == plan["config"]["seq_len"] * vocab * 4  # one document's fp32 logits
    assert plan["memory_per_device_bytes"] == sum(plan["memory_breakdown"].values()) and plan["problems"] == []

    refused = run_llmexp("plan", "technique=next_token", "technique.documents=0", "pipeline=technique_only",
                         cwd=tmp_path, env=plugin["env"])
    assert refused.returncode == 2, refused.stderr
    assert "technique.documents=0 must be between 1 and data.heldout_documents (200)" in refused.stdout
    refused = run_llmexp("--config-dir", plugin["conf"], "--config-name", "next_token", "pipeline=next_token_fp8",
                         "pipeline.nodes.fp8_probe.documents=500", cwd=tmp_path, env=plugin["env"])
    assert refused.returncode == 2 and "pipeline.nodes.fp8_probe.documents=500 must be between 1" in refused.stderr
    assert "Traceback" not in refused.stderr and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def run(plugin):
    """A real run of the plugin's pipeline: the tiny default baseline, FP8, and the technique on each model."""
    result = run_llmexp("--config-dir", plugin["conf"], "--config-name", "next_token", "pipeline=next_token_fp8",
                        *SMALL, "hydra.run.dir=run", cwd=plugin["root"], env=plugin["env"])
    assert result.returncode == 0, result.stderr[-3000:]
    return plugin["root"] / "run", result


def test_its_stages_metric_reaches_results_json_and_the_comparison_table(run):
    run_dir, result = run
    record = read_results(run_dir)
    stages = record["stages"]
    assert [stages[name]["technique"] for name in ("probe", "fp8_probe")] == ["next_token", "next_token"]
    accuracies = [stages[name]["metrics"]["next_token_acc"] for name in ("probe", "fp8_probe")]
    assert all(0 <= value <= 1 for value in accuracies) and stages["probe"]["metrics"]["next_token_tokens"] > 0
    rows = record["comparison"]
    assert [(row["stage"], row["made_by"], row["next_token_acc"]) for row in rows] == [
        ("probe", "pretrain", accuracies[0]), ("fp8_probe", "quantize", accuracies[1])]
    lines = (run_dir / "comparison.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:7] == ["stage", "made_by", "precision", "simulated", "layers", "parameters", "next-token accuracy"]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[6] for row in cells] == [f"{value:.4g}" for value in accuracies]
    printed = next(line for line in result.stdout.splitlines() if line.startswith("┃") and "next_token_acc" in line)
    assert "stage" in printed  # the console's comparison names it by its key


def test_the_pareto_plot_draws_its_metric_against_size(run, plugin):
    """The axes pareto.png is drawn with, from the run's results.json and the installed plugin's declaration."""
    run_dir, _ = run
    assert (run_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    script = (
        "import json, sys\n"
        "from llmexp.results.columns import columns_of, declared_metrics\n"
        "from llmexp.results.report import pareto_figure, report_rows\n"
        "results = json.load(open(sys.argv[1]))\n"
        "rows = report_rows(results['comparison'])\n"
        "columns = columns_of(rows, declared_metrics(results))\n"
        "figure = pareto_figure(rows, columns.qualities(rows), columns.costs(rows, first=1))\n"
        "axis = figure.axes[0]\n"
        "print(json.dumps({'panels': len(figure.axes), 'y': axis.get_ylabel(), 'x': axis.get_xlabel(),\n"
        "                  'points': [list(p) for p in axis.collections[0].get_offsets().tolist()]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(run_dir / "results.json")], capture_output=True,
                          text=True, env={**os.environ, **plugin["env"]}, check=True)
    drawn = json.loads(done.stdout)
    assert drawn["panels"] == 1  # one quality (the plugin's) against one cost (the size: it declares no other)
    assert drawn["y"] == "next-token accuracy (next_token_acc, higher is better)"
    assert drawn["x"] == "size (size_mb, lower is better)"
    record = read_results(run_dir)
    assert drawn["points"] == [[row["bytes_on_disk"] / 1e6, row["next_token_acc"]] for row in record["comparison"]]
