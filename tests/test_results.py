"""results.json: atomic writes, secret redaction, environment capture, the run record."""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmexp.results.record import (
    REDACTED,
    RESULTS_FILE,
    RunRecord,
    environment_info,
    git_info,
    read_results,
    redact_secrets,
    summary_metrics,
    write_json_atomic,
)
from llmexp.techniques.contract import StageResult


# -- write_json_atomic ----------------------------------------------------------------------


def test_write_json_atomic_round_trips_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": 1, "b": [1.5, "x"], "c": None})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5, "x"], "c": None}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_json_atomic_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by a team, not tempfile's 0600


def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"status": "completed", "n": 1})
    before = path.read_bytes()
    # The unserialisable value sits after "first": json.dump has already written part of the document.
    with pytest.raises(TypeError, match="object is not JSON serializable"):
        write_json_atomic(path, {"first": "x" * 10_000, "bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failure_at_rename_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"n": 1})

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_json_atomic(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


class Color(enum.Enum):
    red = "red"


class Scalar:
    """Stands in for a 0-d numpy array / torch tensor."""

    ndim = 0

    def item(self):
        return 0.25


def test_write_json_atomic_converts_the_types_a_run_produces(tmp_path):
    path = write_json_atomic(
        tmp_path / "r.json", {"path": Path("/a/b"), "enum": Color.red, "scalar": Scalar(), "tuple": (1, 2)}
    )
    assert json.loads(path.read_text()) == {"path": "/a/b", "enum": "red", "scalar": 0.25, "tuple": [1, 2]}


# -- redact_secrets -------------------------------------------------------------------------


def test_redacts_secret_keys_anywhere_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("LLMEXP_TEST_TOKEN", "hf_supersecret")
    cfg = OmegaConf.create(
        {
            "tracker": {"name": "wandb", "api_key": "k-123", "uri": "https://bob:pw123@mlflow.example/x"},
            "model": {"hf_token": "${oc.env:LLMEXP_TEST_TOKEN}", "max_tokens": 128, "tokenizer": "llama"},
            "data": {"eos_token": "</s>", "Password": "hunter2", "secret_sauce": "ketchup"},
            "clouds": [{"AWS_SECRET_ACCESS_KEY": "aws-s3cr3t", "region": "eu"}, {"clientSecret": "c1"}],
            "auth": {"credentials": {"user": "u", "pass": "p"}, "accessKey": "ak", "apiKey": "", "token": None},
        }
    )
    out = redact_secrets(cfg)
    assert type(out) is dict
    assert out["tracker"] == {"name": "wandb", "api_key": REDACTED, "uri": f"https://{REDACTED}@mlflow.example/x"}
    assert out["model"] == {"hf_token": REDACTED, "max_tokens": 128, "tokenizer": "llama"}
    assert out["data"] == {"eos_token": "</s>", "Password": REDACTED, "secret_sauce": "ketchup"}
    assert out["clouds"] == [{"AWS_SECRET_ACCESS_KEY": REDACTED, "region": "eu"}, {"clientSecret": REDACTED}]
    # a whole secret subtree goes; unset secrets stay visible as unset
    assert out["auth"] == {"credentials": REDACTED, "accessKey": REDACTED, "apiKey": "", "token": None}
    text = json.dumps(out)
    for secret in ("k-123", "pw123", "hf_supersecret", "hunter2", "aws-s3cr3t", "c1\"", "ak\""):
        assert secret not in text
    assert OmegaConf.select(cfg, "tracker.api_key") == "k-123"  # the input is not touched


def test_redacts_a_composed_run_config_into_plain_json():
    from llmexp.configuration.compose import compose_config

    cfg = compose_config(["tracker=mlflow", "tracker.uri=http://user:topsecret@host:5000"])
    out = redact_secrets(cfg)
    assert out["precision"] == "fp32"  # enums become their value
    assert out["tracker"]["uri"] == f"http://{REDACTED}@host:5000"
    assert "topsecret" not in json.dumps(out)


def test_redact_accepts_plain_dicts_and_dataclasses():
    from llmexp.configuration.schema import TrackerConfig

    assert redact_secrets({"a": {"token": "t"}}) == {"a": {"token": REDACTED}}
    assert redact_secrets(TrackerConfig(name="none"))["name"] == "none"


# -- environment_info -----------------------------------------------------------------------


def test_environment_info_reads_versions_without_importing_heavy_packages(tmp_path):
    code = (
        "import sys, json; from llmexp.results.record import environment_info; info = environment_info(); "
        "print(json.dumps({'info': info, 'heavy': [m for m in ('torch', 'transformers', 'lightning', "
        "'wandb', 'mlflow') if m in sys.modules]}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    info = result["info"]
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    packages = info["packages"]
    for name in ("llmexp", "torch", "transformers", "lightning", "hydra-core", "omegaconf", "pluggy"):
        assert name in packages
    assert packages["llmexp"] == "0.1.0"
    assert packages["wandb"] and packages["mlflow"]  # installed in the test environment
    assert info["platform"] and info["machine"]


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


@pytest.mark.skipif(subprocess.run(["which", "git"], capture_output=True).returncode != 0, reason="needs git")
def test_git_commit_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_info(tmp_path) == {"commit": None, "dirty": None}  # not a repository
    _git(tmp_path, "init", "-q")
    assert git_info(tmp_path) == {"commit": None, "dirty": None}  # no commit yet
    (tmp_path / "a.txt").write_text("1")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("outputs do not make a tree dirty")
    assert git_info(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.txt").write_text("2")
    assert git_info(tmp_path) == {"commit": head, "dirty": True}
    assert environment_info(tmp_path)["git"]["commit"] == head


def test_git_missing_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    assert git_info(tmp_path) == {"commit": None, "dirty": None}


# -- RunRecord ------------------------------------------------------------------------------


def test_run_record_builds_writes_and_reads_back(tmp_path):
    cfg = OmegaConf.create({"seed": 0, "tracker": {"name": "wandb", "api_key": "k-999"}})
    record = RunRecord.start(tmp_path, cfg, plan={"params": 1000, "fits": True})
    record.add_stage(
        "pretrain", "pretrain",
        StageResult(metrics={"final_loss": 1.25}, artifacts={"model": str(tmp_path / "model")},
                    model_stats={"params": 1000, "bits_per_weight": 32.0}),
        wall_time_s=1.23456,
    )
    record.write()
    assert read_results(tmp_path)["status"] == "running"  # a crash now leaves an honest record

    record.add_stage("evaluate", "evaluate", StageResult(metrics={"accuracy": 0.5}), wall_time_s=0.5)
    path = record.finish("completed").write()
    assert path == tmp_path / RESULTS_FILE
    data = read_results(tmp_path)
    assert data["status"] == "completed" and data["reason"] is None
    assert data["config"]["tracker"]["api_key"] == REDACTED
    assert "k-999" not in path.read_text()
    assert data["plan"] == {"params": 1000, "fits": True}
    assert data["stages"]["pretrain"] == {
        "technique": "pretrain",
        "status": "completed",
        "reason": None,
        "input_model": None,
        "metrics": {"final_loss": 1.25},
        "model_stats": {"params": 1000, "bits_per_weight": 32.0},
        "artifacts": {"model": str(tmp_path / "model")},
        "wall_time_s": 1.235,
    }
    assert data["model_stats"] == {"params": 1000, "bits_per_weight": 32.0}  # the last model's
    assert data["run_dir"] == str(tmp_path)
    assert data["wall_time_s"] >= 0 and data["started_at"] <= data["finished_at"]
    assert data["environment"]["packages"]["llmexp"] == "0.1.0"
    assert summary_metrics(data) == {
        "pretrain/final_loss": 1.25, "evaluate/accuracy": 0.5, "model/params": 1000.0, "model/bits_per_weight": 32.0
    }


def test_skipped_run_records_its_reason(tmp_path):
    record = RunRecord.start(tmp_path, {"seed": 1}).finish("skipped", reason="needs 140 GB, a100_80g has 80")
    record.write()
    data = read_results(tmp_path)
    assert (data["status"], data["reason"], data["stages"]) == ("skipped", "needs 140 GB, a100_80g has 80", {})


def test_finish_rejects_an_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="completed, skipped, failed"):
        RunRecord.start(tmp_path, {}).finish("done")


def test_load_picks_a_run_up_again(tmp_path):
    record = RunRecord.start(tmp_path, {"seed": 2})
    record.add_stage("pretrain", "pretrain", StageResult(metrics={"loss": 2.0}), wall_time_s=3.0)
    record.write()
    again = RunRecord.load(tmp_path)
    assert list(again.stages) == ["pretrain"] and again.config == {"seed": 2}
    again.add_stage("evaluate", "evaluate", StageResult(metrics={"accuracy": 1.0}))
    again.finish("completed").write()
    assert list(read_results(tmp_path)["stages"]) == ["pretrain", "evaluate"]


def test_summary_metrics_flattens_nested_numbers_and_skips_the_rest():
    results = {"stages": {"eval": {"metrics": {"mmlu": {"stem": 0.4}, "note": "text", "ok": True, "n": 3}}}}
    assert summary_metrics(results) == {"eval/mmlu/stem": 0.4, "eval/n": 3.0}


def test_hydra_config_record_is_rewritten_without_secrets_from_config_files(tmp_path):
    from omegaconf import OmegaConf

    from llmexp.results.record import redact_hydra_record

    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    config = OmegaConf.create({"judge": {"api_key": "sk-123", "model": "m"}, "seed": 0})
    OmegaConf.save(config, hydra_dir / "config.yaml")
    redact_hydra_record(hydra_dir, config)
    saved = OmegaConf.load(hydra_dir / "config.yaml")
    assert (saved.judge.api_key, saved.judge.model) == (REDACTED, "m")
    assert "sk-123" not in (hydra_dir / "config.yaml").read_text()
    redact_hydra_record(tmp_path / "absent", config)  # a job Hydra kept no record of (hydra.output_subdir=null)
