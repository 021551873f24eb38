"""The ``llmexp`` command as a user meets it: Hydra's features, bad input, sweeps, plugins."""

from __future__ import annotations

import json

import pytest

from .conftest import read_results, run_llmexp
from .plugin_packages import install_example

SHORT = ["technique.max_steps=3", "technique.save_model=false", "evaluation.limit=4"]


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr


def test_help_lists_every_group_and_option(tmp_path):
    result = run_llmexp("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("llama3_1_405b", "qwen2_5_7b", "b200", "tp4_pp4_dp4", "pretrain", "evaluate", "wandb", "mlflow"):
        assert option in result.stdout


def test_cfg_job_shows_overrides(tmp_path):
    result = run_llmexp("--cfg", "job", "technique.lr=3e-4", "model=llama3_2_1b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0003" in result.stdout and "hidden_size: 2048" in result.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("technique.lrr=1", ["technique.lrr is not a key of technique=pretrain; did you mean technique.lr=1?"]),
        ("technique.max_steps=many", ["max_steps", "many"]),
        ("model=llama9", ["model", "llama9"]),
        ("precision=fp8", ["precision=fp8", "hardware=cpu"]),
        ("model.path=/no/such/dir", ["model.path", "/no/such/dir"]),
    ],
)
def test_bad_input_is_one_paragraph_exit_2_and_writes_nothing(tmp_path, override, fragments):
    result = run_llmexp(override, cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert not list(tmp_path.iterdir())


def test_corrupt_checkpoint_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    work = tmp_path / "work"
    work.mkdir()
    result = run_llmexp("technique=evaluate", f"model.path={broken}", cwd=work)
    assert_user_error(result, "model.path")
    assert not list(work.iterdir())


def test_multirun_records_infeasible_points_as_skipped(tmp_path):
    result = run_llmexp("-m", "precision=fp32,fp8", *SHORT, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(jobs) == 2
    by_precision = {r["config"]["precision"]: r for r in map(lambda p: json.loads(p.read_text()), jobs)}
    assert by_precision["fp32"]["status"] == "completed"
    assert by_precision["fp32"]["stages"]["pretrain"]["metrics"]["steps"] == 3
    assert by_precision["fp8"]["status"] == "skipped"
    assert "fp8" in by_precision["fp8"]["reason"] and by_precision["fp8"]["stages"] == {}


def test_plugins_lists_built_ins_with_their_package(tmp_path):
    result = run_llmexp("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for fragment in ("pretrain", "evaluate", "llmexp 0.1.0", "installed"):
        assert fragment in result.stdout


def test_out_of_tree_plugin_runs_by_name(tmp_path, tiny_checkpoint):
    """Install the example plugin package for real and run its technique through Hydra."""
    env = install_example("llmexp-weightstats", tmp_path)
    listing = run_llmexp("plugins", cwd=tmp_path, env=env)
    assert "weightstats" in listing.stdout and "llmexp-weightstats 0.1.0" in listing.stdout

    result = run_llmexp("technique=weightstats", "technique.top_k=2", f"model.path={tiny_checkpoint}",
                        "pipeline=technique_only", "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    stage = read_results(tmp_path / "run")["stages"]["weightstats"]
    assert stage["metrics"]["matrices"] == 2 * 7 + 1  # q k v o gate up down per layer, tied embedding
    assert len(json.loads((tmp_path / "run/weightstats/top_norms.json").read_text())) == 2

    refused = run_llmexp("technique=weightstats", "technique.top_k=0", f"model.path={tiny_checkpoint}", cwd=tmp_path, env=env)
    assert_user_error(refused, "technique.top_k=0")


def test_run_tracked_in_mlflow_matches_results_json(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_llmexp("tracker=mlflow", f"tracker.uri={uri}", *SHORT, "technique.log_every=1", "hydra.run.dir=run",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = read_results(tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("llmexp").experiment_id])
    assert run.data.metrics["pretrain/final_loss"] == pytest.approx(record["stages"]["pretrain"]["metrics"]["final_loss"])
    assert run.data.metrics["evaluate/mc_cloze_acc"] == pytest.approx(record["stages"]["evaluate"]["metrics"]["mc_cloze_acc"])
    assert len(client.get_metric_history(run.info.run_id, "pretrain/train/loss")) == 3


def test_malformed_jsonl_and_non_hf_directory_are_refused_with_their_location(tmp_path, tiny_checkpoint):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n{"question": "oops"\n')
    work = tmp_path / "work"
    work.mkdir()
    result = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}", f"technique.gsm8k_path={bad}", cwd=work)
    assert_user_error(result, f"{bad}:2")

    not_hf = tmp_path / "notes"
    not_hf.mkdir()
    (not_hf / "readme.txt").write_text("not a checkpoint")
    result = run_llmexp("technique=evaluate", f"model.path={not_hf}", cwd=work)
    assert_user_error(result, "model.path", "config.json")
    assert not list(work.iterdir())


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_a_multirun_with_a_failed_point_exits_1_and_its_table_says_which(tmp_path, tiny_checkpoint, launcher):
    """The sweep's exit code rule: 1 when any point failed; the reason is one line, the traceback in error_log."""
    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "evaluate").write_text("a file where the stage's directory goes: the stage cannot write there")
    done = run_llmexp("-m", *launcher, "technique=evaluate", f"model.path={tiny_checkpoint}", "technique.tasks=[perplexity]",
                      "technique.limit=2", "precision=fp32,fp8", "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    jobs = {job["num"]: job for job in json.loads((sweep / "jobs.json").read_text())}
    assert [jobs[n]["status"] for n in range(4)] == ["completed", "failed", "skipped", "skipped"]
    reason = jobs[1]["reason"]
    assert reason == f"FileExistsError: [Errno 17] File exists: '{sweep / '1' / 'evaluate'}'"
    results = read_results(sweep / "1")
    assert results["status"] == "failed" and results["reason"] == reason
    assert "Traceback (most recent call last)" in open(results["error_log"]).read()
    table = " ".join(done.stdout.split())
    assert "failed" in table and "seed=1" in table and "1 of 4 jobs failed" in " ".join(done.stderr.split())


def test_a_multirun_whose_points_completed_or_were_skipped_exits_0_with_its_table(tmp_path):
    done = run_llmexp("-m", "precision=fp32,fp8", *SHORT, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [job["status"] for job in json.loads((tmp_path / "sweep/jobs.json").read_text())] == ["completed", "skipped"]
    assert "Jobs (" in done.stdout


def test_a_value_from_hydras_runtime_is_resolved_when_the_run_is_planned(tmp_path):
    """``${hydra:runtime.output_dir}`` resolves at plan time as in the job: the refusal names the resolved path."""
    task = "technique.tasks=[{type: text_perplexity, name: tp, path: '${hydra:runtime.output_dir}/held_out.txt'}]"
    result = run_llmexp("technique=evaluate", "hydra.run.dir=runs/one", task, cwd=tmp_path)
    assert_user_error(result, f"{tmp_path}/runs/one/held_out.txt does not exist")
    assert not list(tmp_path.iterdir())


def test_an_override_nested_too_deeply_to_parse_is_bad_input(tmp_path):
    result = run_llmexp("tracker.tags=" + "[" * 3000 + "]" * 3000, cwd=tmp_path)
    assert_user_error(result, "nested too deeply to parse", "(6013 characters)")
    assert len(result.stderr) < 1000
    assert not list(tmp_path.iterdir())


def test_a_layout_over_several_nodes_needs_a_cluster_launcher(tmp_path):
    """A plain run stops before anything is written; a local sweep records the point as skipped and goes on."""
    layout = ["pipeline=technique_only", "parallelism=dp2", "parallelism.devices_per_node=1", "technique.max_steps=2"]
    result = run_llmexp(*layout, "parallelism.nodes=2", cwd=tmp_path)
    assert_user_error(result, "spans parallelism.nodes=2 nodes", "hydra/launcher=slurm")
    assert not list(tmp_path.iterdir())

    sweep = run_llmexp("-m", *layout, "parallelism.nodes=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    record = read_results(tmp_path / "sweep" / "0")
    assert record["status"] == "skipped" and "spans parallelism.nodes=2 nodes" in record["reason"]
