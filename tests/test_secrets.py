"""Secrets on the command line: the job gets them, no record of the command line holds them.

The consumer is real: a judge task on a scripted judge endpoint (tests/test_judge.py) whose
key comes from ``+hydra.job.env_set.<VAR>=<key>`` on the command line, so the judge's
``Authorization`` header shows what the job received. Every file the runs leave (run
directories, Hydra's records, wandb's offline run, mlflow's store, the judge cache) and
the captured console are searched for the key afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf

from llmexp.configuration.compose import compose_config
from llmexp.errors import UserError
from llmexp.configuration.secrets import ENV_PREFIX, REDACTED, is_secret_key, redact_url_credentials, secrets_to_environment
from tests.conftest import read_results, run_llmexp
from tests.test_judge import QA, ScriptedJudge, good, items_file
from tests.test_tracking import wandb_records

KEY_VAR = "LLMEXP_TEST_JUDGE_API_KEY"
SECRET = "sk-cmdline-7d41c9e02fb3"
OTHER_SECRET = "sk-cmdline-second-5a90e1"
URL_SECRET = "pw-in-url-31c8d7"


# -- rewriting the command line ----------------------------------------------------------


def test_each_secret_value_moves_into_the_environment_and_hydra_resolves_it_back():
    environ = {}
    given = [
        "-m",
        f"+hydra.job.env_set.{KEY_VAR}={SECRET},{OTHER_SECRET}",
        f"tracker.uri=https://alice:{URL_SECRET}@mlflow.example:5000",
        "seed=0,1",
    ]
    argv = secrets_to_environment(given, environ)
    assert argv == [
        "-m",
        f"+hydra.job.env_set.{KEY_VAR}=${{oc.env:{ENV_PREFIX}0}},${{oc.env:{ENV_PREFIX}1}}",
        f"tracker.uri=https://${{oc.env:{ENV_PREFIX}2}}@mlflow.example:5000",
        "seed=0,1",
    ]
    assert list(environ.values()) == [SECRET, OTHER_SECRET, f"alice:{URL_SECRET}"]
    assert list(environ) == [f"{ENV_PREFIX}{n}" for n in range(3)]
    assert secrets_to_environment(argv, environ) == argv  # already rewritten: nothing changes


def test_a_job_composed_from_the_rewritten_command_line_gets_the_real_values(monkeypatch):
    judge_url = f"http://judge:{URL_SECRET}@127.0.0.1:9/v1"
    given = [
        "technique=evaluate",
        f"+hydra.job.env_set.{KEY_VAR}={SECRET}",
        "tracker=mlflow",
        "tracker.uri=sqlite:///x.db",
        f'technique.tasks=[{{type: judge, path: qa.jsonl, url: "{judge_url}", model: judge-model}}]',
    ]
    environ = {}
    argv = secrets_to_environment(given, environ)
    for name, value in environ.items():  # `llmexp` puts them in os.environ itself
        monkeypatch.setenv(name, value)
    assert SECRET not in " ".join(argv) and URL_SECRET not in " ".join(argv)
    cfg = compose_config(argv, hydra_node=True)
    assert cfg.hydra.job.env_set[KEY_VAR] == SECRET
    assert cfg.technique.tasks[0].url == judge_url
    recorded = OmegaConf.to_yaml(cfg.hydra)  # as Hydra saves hydra.yaml: interpolations unresolved
    assert SECRET not in recorded and URL_SECRET not in recorded and f"${{oc.env:{ENV_PREFIX}1}}" in recorded


def test_a_secret_key_and_its_neighbours():
    assert all(is_secret_key(key) for key in ("api_key", "hf_token", "WANDB_API_KEY", "clientSecret", "password"))
    assert not any(is_secret_key(key) for key in ("max_tokens", "tokenizer", "pad_token", "secret_sauce", "path"))
    assert redact_url_credentials("see https://u:pw@host/x") == f"see https://{REDACTED}@host/x"
    environ = {f"{ENV_PREFIX}0": "someone else's"}  # a variable already in use is left alone
    kept = ["-cn", "config", "--config-dir=sweeps", "x.password=", "x.token=null", "x.api_key=${oc.env:MINE}",
            "data.pad_token=<pad>", "tracker.uri=http://${oc.env:MINE}@host",
            r"tracker.uri=https\://$\{oc.env\:MINE\}@host"]  # as a sweep writes a job's override (a pod's command)
    assert secrets_to_environment([*kept, "x.api_key=k"], environ) == [*kept, f"x.api_key=${{oc.env:{ENV_PREFIX}1}}"]


@pytest.mark.parametrize(
    "override",
    ["x.credentials={user: a, password: hunter2}", "x.api_key=[hunter2", "x.token=range(1,3)",
     "x.api_key=" + "[" * 5000 + "hunter2" + "]" * 5000],
    ids=["dict", "unparsable", "range", "nested"],
)
def test_a_secret_that_cannot_be_moved_is_refused_without_showing_it(override):
    with pytest.raises(UserError) as refused:
        secrets_to_environment([override], {})
    assert "hunter2" not in str(refused.value) and REDACTED in str(refused.value)
    assert "${oc.env:NAME}" in str(refused.value)


def test_a_bad_secret_override_exits_2_without_echoing_it(tmp_path):
    done = run_llmexp("technique=evaluate", "+hydra.job.env_set.OPENAI_API_KEY=[sk-leak", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sk-leak" not in done.stdout + done.stderr and "OPENAI_API_KEY=<redacted>" in done.stderr
    assert not (tmp_path / "outputs").exists()


# -- every writer, for real ---------------------------------------------------------------


# Each job its own judge cache: a cached verdict sends no request, and the requests show what each job got.
JOB_CACHE = "'${hydra:runtime.output_dir}/judge-cache'"


def judge_task(judge_url: str, items: str, cache_dir: str) -> str:
    """One judge task reading its key from the variable KEY_VAR."""
    return (
        f'technique.tasks=[{{type: judge, name: qa, path: {items}, url: "{judge_url}", model: judge-model, '
        f"api_key_env: {KEY_VAR}, backoff_s: 0.01, cache_dir: {cache_dir}}}]"
    )


def assert_nowhere(secrets: List[str], root: Path, *texts: str) -> None:
    """No file under ``root`` and none of ``texts`` holds any of ``secrets``."""
    files = [path for path in root.rglob("*") if path.is_file()]
    assert len(files) > 10  # the runs really wrote their records here
    leaked = [(path, s) for path in files for s in secrets if s.encode() in path.read_bytes()]
    assert leaked == []
    assert [s for s in secrets if any(s in text for text in texts)] == []


def wandb_args(run_dir: Path) -> List[str]:
    """The command line wandb recorded for the run (its metadata's ``args``, which ``wandb sync`` uploads)."""
    records = wandb_records(run_dir)
    return [arg for r in records if r.WhichOneof("record_type") == "environment" for arg in r.environment.args]


@pytest.mark.slow
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_run_uses_the_secret_and_records_none(tracker, tiny_checkpoint, tmp_path):
    """The key overrides one exported in the shell (the plan sees the variable set); the judge must get the new one."""
    with ScriptedJudge(lambda question, seen: (200, good(4), 0.0)) as judge:
        done = run_llmexp(
            "technique=evaluate", f"model.path={tiny_checkpoint}", f"tracker={tracker}",
            judge_task(judge.url, items_file(tmp_path, QA), str(tmp_path / "judge-cache")),
            f"+hydra.job.env_set.{KEY_VAR}={SECRET}",
            f"tracker.tags=[https://ci:{URL_SECRET}@git.example/repo]",
            cwd=tmp_path, env={KEY_VAR: "sk-exported-in-the-shell"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["authorization"] for r in judge.requests] == [f"Bearer {SECRET}"] * len(QA)
    assert_nowhere([SECRET, URL_SECRET], tmp_path, done.stdout, done.stderr)
    (run_dir,) = [path.parent for path in tmp_path.glob("outputs/*/*/results.json")]
    assert read_results(run_dir)["stages"]["evaluate"]["metrics"]["qa_n_scored"] == len(QA)
    hidden = f"+hydra.job.env_set.{KEY_VAR}=${{oc.env:{ENV_PREFIX}0}}"
    assert hidden in (run_dir / ".hydra" / "hydra.yaml").read_text()
    if tracker == "wandb":
        assert hidden in wandb_args(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, tracker", [("basic", "wandb"), ("joblib", "mlflow")])
def test_every_job_of_a_sweep_uses_the_secret_and_records_none(launcher, tracker, tiny_checkpoint, tmp_path):
    """Jobs run in this process (basic) or in joblib's worker processes, which inherit the environment."""
    with ScriptedJudge(lambda question, seen: (200, good(4), 0.0)) as judge:
        done = run_llmexp(
            "-m", f"hydra/launcher={launcher}", "technique=evaluate", f"model.path={tiny_checkpoint}",
            f"tracker={tracker}", judge_task(judge.url, items_file(tmp_path, QA), JOB_CACHE),
            f"+hydra.job.env_set.{KEY_VAR}={SECRET}", "seed=0,1",
            f"tracker.tags=[https://ci:{URL_SECRET}@git.example/repo]",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["authorization"] for r in judge.requests] == [f"Bearer {SECRET}"] * 2 * len(QA)
    assert_nowhere([SECRET, URL_SECRET], tmp_path, done.stdout, done.stderr)
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.json")) == ["0", "1"]
    assert f"+hydra.job.env_set.{KEY_VAR}=${{oc.env:{ENV_PREFIX}0}}" in (sweep_dir / "multirun.yaml").read_text()
    if tracker == "mlflow":
        assert (tmp_path / "mlflow.db").is_file()  # the default store: searched with the rest
