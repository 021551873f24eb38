"""Trackers against their real libraries: wandb offline, mlflow on a local store, Lightning through each.

Nothing here touches the network: WANDB_MODE=offline and no API key, mlflow on sqlite or
file stores in tmp directories. What was logged is read back from the backend's own files.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from llmexp.errors import UserError
from llmexp.results.record import REDACTED, RESULTS_FILE
from llmexp.configuration.schema import MlflowTrackerConfig, NoTrackerConfig, TrackerConfig, WandbTrackerConfig
from llmexp.results.tracking import make_tracker
from llmexp.results.tracking.mlflow_run import default_mlflow_uri
from llmexp.results.tracking.tracker import TRACKER_STATE_FILE, Tracker
from llmexp.results.tracking.wandb_run import wandb_mode

SECRET = "sk-do-not-leak-1234"
CONFIG = {
    "seed": 0,
    "technique": {"name": "pretrain", "lr": 0.001, "notes": "x" * 10_000},
    "tracker": {"name": "mlflow", "api_key": SECRET},
    "model": {"hf_token": SECRET, "layers": [1, 2]},
}
RESULTS = {
    "status": "completed",
    "config": {"tracker": {"api_key": SECRET}},
    "stages": {
        "pretrain": {"metrics": {"final_loss": 1.25, "steps": 3}, "model_stats": {"params": 10}},
        "evaluate": {"metrics": {"accuracy": 0.75, "note": "text is not a metric"}},
    },
    "model_stats": {"params": 10, "bits_per_weight": 32.0},
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No credentials, no network, nothing written outside tmp_path; the environment as it was afterwards
    (Lightning's MLFlowLogger has mlflow put MLFLOW_TRACKING_URI in os.environ, which the `llmexp` processes
    of later test files would inherit)."""
    with mock.patch.dict(os.environ):
        for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
                    "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("WANDB_MODE", "offline")
        for var, folder in (("WANDB_DIR", "wandb-dir"), ("WANDB_CACHE_DIR", "wandb-cache"),
                            ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data")):
            monkeypatch.setenv(var, str(tmp_path / folder))
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_CONSOLE", "off")
        monkeypatch.chdir(tmp_path)
        yield


# -- the interface without a backend --------------------------------------------------------


def test_importing_tracking_imports_no_backend():
    code = (
        "import sys, llmexp.results.tracking; "
        "print([m for m in ('wandb', 'mlflow', 'lightning', 'torch') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_unknown_tracker_names_the_choices(tmp_path):
    with pytest.raises(UserError, match=r"tracker=tensorboardx is not a tracker; choose one of mlflow, none, wandb"):
        make_tracker(TrackerConfig(name="tensorboardx"), tmp_path, {})


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_missing_backend_names_the_extra(backend, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # `import <backend>` now raises ImportError
    with pytest.raises(UserError, match=rf"pip install llmexp\[{backend}\]"):
        make_tracker(backend, tmp_path, {})


def test_none_tracker_accepts_everything_and_keeps_files_in_the_run_dir(tmp_path):
    from omegaconf import OmegaConf

    tracker = make_tracker(OmegaConf.create({"name": "none", "project": "p", "tags": []}), tmp_path / "run", CONFIG)
    assert type(tracker) is Tracker and tracker.config["tracker"]["api_key"] == REDACTED
    with tracker:
        tracker.log_metrics({"a": 1.0}, step=3)
        tracker.log_results(RESULTS)
    assert tracker.finished
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was created


def test_wandb_mode_is_offline_without_an_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(WandbTrackerConfig()) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbTrackerConfig()) == "online"
    assert wandb_mode(WandbTrackerConfig(mode="offline")) == "offline"  # the config wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(WandbTrackerConfig()) is None  # wandb reads WANDB_MODE itself


# -- Lightning through each tracker ---------------------------------------------------------


def fit_tiny_model(logger, lr: float = 0.1):
    """Three optimizer steps of a Linear layer logging ``train/loss``; returns the losses it logged."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, lr: float):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(4, 1)
            self.losses = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train/loss", loss, on_step=True, on_epoch=False)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    module = Tiny(lr)
    data = DataLoader(TensorDataset(torch.randn(12, 4), torch.randn(12, 1)), batch_size=4)
    trainer = L.Trainer(
        max_steps=3, logger=logger, log_every_n_steps=1, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert len(module.losses) == 3
    return module.losses


def test_none_tracker_lightning_writes_metrics_csv_in_the_stage_dir(tmp_path):
    import csv

    tracker = make_tracker(NoTrackerConfig(), tmp_path / "run", CONFIG)
    losses = fit_tiny_model(tracker.lightning_logger("pretrain"))
    with open(tmp_path / "run" / "pretrain" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert [float(row["train/loss"]) for row in rows] == pytest.approx(losses)
    assert [int(row["step"]) for row in rows] == [0, 1, 2]


# -- wandb (offline) ------------------------------------------------------------------------


def wandb_records(run_dir: Path):
    """Every record of the offline run under ``run_dir``, read from its ``run-<id>.wandb`` file.

    That file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks, records with a
    crc32/length/type header, FIRST/MIDDLE/LAST fragments) of wandb's protobuf Records;
    wandb 0.31 keeps no Python reader for it and writes no wandb-summary.json offline.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, header = path.read_bytes(), 32 * 1024, 7
    assert data[:4] == b":W&B"
    records, pos, payload = [], header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        pos += header
        if kind == 0:  # zero padding to the end of the block
            pos += left - header
            continue
        payload += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_items(records, kind: str):
    """``history`` rows, or the merged ``summary`` / ``config`` updates, as dicts of decoded values."""
    def decode(items):
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}

    if kind == "history":
        return [decode(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    merged = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            merged.update(decode(getattr(record, kind).update))
        if kind == "config" and record.WhichOneof("record_type") == "run":
            merged.update(decode(record.run.config.update))
    return merged


def test_wandb_offline_run_logs_metrics_results_and_no_secret(tmp_path):
    run_dir = tmp_path / "outputs" / "run"
    tracker = make_tracker(WandbTrackerConfig(project="unit", tags=["ci"]), run_dir, CONFIG)
    assert tracker.run.settings.mode == "offline"
    tracker.log_metrics({"pretrain/final_loss": 1.25, "step_time_s": 0.5})
    tracker.log_metrics({"evaluate/accuracy": 0.75}, step=7)
    tracker.log_results(RESULTS)
    tracker.finish("completed")
    tracker.finish("failed")  # a second finish is a no-op

    records = wandb_records(run_dir)
    history = wandb_items(records, "history")
    assert {"pretrain/final_loss": 1.25, "step_time_s": 0.5}.items() <= history[0].items()
    assert {"evaluate/accuracy": 0.75, "step": 7}.items() <= history[1].items()
    summary = wandb_items(records, "summary")
    assert {
        "pretrain/final_loss": 1.25, "pretrain/steps": 3.0, "evaluate/accuracy": 0.75,
        "model/params": 10.0, "model/bits_per_weight": 32.0, "status": "completed",
    }.items() <= summary.items()
    config = wandb_items(records, "config")
    assert config["tracker"]["api_key"] == REDACTED and config["technique"]["lr"] == 0.001
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, list(run.tags), run.display_name) == ("unit", ["ci"], "outputs/run")
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0

    [saved] = run_dir.glob(f"wandb/offline-run-*/files/{RESULTS_FILE}")
    assert json.loads(saved.read_text())["stages"]["evaluate"]["metrics"]["accuracy"] == 0.75
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert json.loads((run_dir / TRACKER_STATE_FILE).read_text()) == {"tracker": "wandb", "run_id": tracker.run.id}
    assert not (tmp_path / "wandb").exists()  # everything is inside the run directory


def test_wandb_failed_run_exits_nonzero(tmp_path):
    with pytest.raises(RuntimeError):
        with make_tracker(WandbTrackerConfig(), tmp_path / "run", {}) as tracker:
            raise RuntimeError("stage crashed")
    records = wandb_records(tmp_path / "run")
    assert wandb_items(records, "summary")["status"] == "failed"
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1 and tracker.finished


def test_wandb_lightning_logger_lands_train_loss_per_stage(tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(WandbTrackerConfig(), run_dir, CONFIG)
    pretrain = fit_tiny_model(tracker.lightning_logger("pretrain"), lr=0.1)
    sft = fit_tiny_model(tracker.lightning_logger("sft"), lr=0.2)
    tracker.finish("completed")

    records = wandb_records(run_dir)
    history = wandb_items(records, "history")
    for stage, losses in (("pretrain", pretrain), ("sft", sft)):
        rows = [row for row in history if f"{stage}/train/loss" in row]
        assert [row[f"{stage}/train/loss"] for row in rows] == pytest.approx(losses)
        assert [row["trainer/global_step"] for row in rows] == [0, 1, 2]
    config = wandb_items(records, "config")
    assert config["pretrain"] == {"lr": 0.1} and config["sft"] == {"lr": 0.2}  # hparams scoped by stage
    assert (run_dir / "pretrain").is_dir() and (run_dir / "sft").is_dir()


# -- mlflow ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory):
    """One sqlite store for the module: creating its tables takes mlflow a few seconds."""
    return tmp_path_factory.mktemp("mlflow-root")


def mlflow_run(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def test_mlflow_default_store_logs_params_metrics_and_results_artifact(mlflow_root, monkeypatch):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.chdir(mlflow_root)  # the default store lives in the working directory
    run_dir = mlflow_root / "outputs" / "run-a"
    tracker = make_tracker(MlflowTrackerConfig(project="unit", tags=["ci"]), run_dir, CONFIG)
    assert tracker.uri == default_mlflow_uri(mlflow_root) and tracker.uri.startswith("sqlite:///")
    tracker.log_metrics({"pretrain/final_loss": 1.25, "note": "skipped", "acc@1": 0.5}, step=2)
    tracker.log_results(RESULTS)
    tracker.finish("completed")

    client, run = mlflow_run(default_mlflow_uri(mlflow_root), tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["llmexp.status"] == "completed"
    assert run.data.tags["ci"] == "true" and run.info.run_name == "outputs/run-a"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    params = run.data.params
    assert params["seed"] == "0" and params["technique.lr"] == "0.001" and params["model.layers"] == "[1, 2]"
    assert params["tracker.api_key"] == params["model.hf_token"] == REDACTED
    assert len(params["technique.notes"]) == MAX_PARAM_VAL_LENGTH and params["technique.notes"].endswith("...")
    assert not any(SECRET in value for value in params.values())
    assert run.data.metrics == {
        "pretrain/final_loss": 1.25, "acc_1": 0.5, "pretrain/steps": 3.0, "evaluate/accuracy": 0.75,
        "model/params": 10.0, "model/bits_per_weight": 32.0,
    }
    # already logged with the same value: log_results adds no duplicate point
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "pretrain/final_loss")] == [(2, 1.25)]

    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [RESULTS_FILE]
    local = Path(client.download_artifacts(run.info.run_id, RESULTS_FILE, str(mlflow_root / "download")))
    assert json.loads(local.read_text())["stages"] == RESULTS["stages"]
    assert SECRET not in local.read_text()
    assert (mlflow_root / "mlflow.db").is_file() and (mlflow_root / "mlruns").is_dir()

    # a resumed run directory logs into the same mlflow run (and re-logging params is fine)
    again = make_tracker(MlflowTrackerConfig(project="unit"), run_dir, CONFIG)
    assert again.run_id == tracker.run_id
    assert mlflow_run(again.uri, again.run_id)[1].info.status == "RUNNING"
    again.finish("failed")
    assert mlflow_run(again.uri, again.run_id)[1].info.status == "FAILED"


def test_mlflow_lightning_logger_lands_train_loss_per_stage(mlflow_root, tmp_path):
    uri = default_mlflow_uri(mlflow_root)
    tracker = make_tracker(MlflowTrackerConfig(project="unit", uri=uri), tmp_path / "run", CONFIG)
    pretrain = fit_tiny_model(tracker.lightning_logger("pretrain"), lr=0.1)
    sft = fit_tiny_model(tracker.lightning_logger("sft"), lr=0.2)  # a changed lr must not clash
    tracker.finish("completed")

    client, run = mlflow_run(uri, tracker.run_id)
    for stage, losses in (("pretrain", pretrain), ("sft", sft)):
        history = sorted(client.get_metric_history(run.info.run_id, f"{stage}/train/loss"), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(losses)
        assert [m.step for m in history] == [0, 1, 2]
    assert run.data.params["pretrain/lr"] == "0.1" and run.data.params["sft/lr"] == "0.2"
    assert run.info.status == "FINISHED"


def test_jobs_opening_a_new_sqlite_store_at_once_all_get_their_run(tmp_path):
    """A parallel sweep's first jobs create the store's tables together (mlflow: "duplicate column" without a lock)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys; from llmexp.configuration.schema import MlflowTrackerConfig; from llmexp.results.tracking import make_tracker; "
        f"t = make_tracker(MlflowTrackerConfig(uri={uri!r}), sys.argv[1], {{}}); t.finish(); print(t.run_id)"
    )
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"run-{n}")], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(3)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    runs = {out.strip() for out, _ in outputs}
    assert len(runs) == 3 and {mlflow_run(uri, run_id)[1].info.status for run_id in runs} == {"FINISHED"}


def test_mlflow_file_store_is_refused_unless_allowed(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(UserError, match="tracker.uri.*MLFLOW_ALLOW_FILE_STORE"):
        make_tracker(MlflowTrackerConfig(uri=uri), tmp_path / "run", CONFIG)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: the file store is opt-in
    tracker = make_tracker(MlflowTrackerConfig(uri=uri), tmp_path / "run", CONFIG)
    tracker.log_metrics({"pretrain/tokens_per_s": 2.5e4}, step=1)
    tracker.log_results(RESULTS)
    tracker.finish("completed")
    client, run = mlflow_run(uri, tracker.run_id)
    assert run.data.metrics == {
        "pretrain/tokens_per_s": 2.5e4, "pretrain/final_loss": 1.25, "pretrain/steps": 3.0,
        "evaluate/accuracy": 0.75, "model/params": 10.0, "model/bits_per_weight": 32.0,
    }
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [RESULTS_FILE]
    assert run.data.params["tracker.api_key"] == REDACTED
    assert not any(SECRET in value for value in run.data.params.values())


def test_mlflow_uri_credentials_do_not_reach_the_error(tmp_path):
    with pytest.raises(UserError) as error:
        make_tracker(MlflowTrackerConfig(uri="bogus://user:hunter2@localhost/x"), tmp_path, {})
    assert "hunter2" not in str(error.value)
