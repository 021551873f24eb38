"""Shared fixtures: run the real ``llmexp`` command (to its end, or left running), and a tiny HF checkpoint on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmexp.results.record import read_results  # noqa: F401  (the tests read runs through it)

REPO = Path(__file__).resolve().parents[1]


def run_llmexp(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``llmexp <args>`` in a fresh process, as a user runs it (offline trackers, no network)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "llmexp", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def start_llmexp(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    """``llmexp <args>`` left running, as a user's terminal would have it."""
    return subprocess.Popen([sys.executable, "-m", "llmexp", *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, what: str, timeout: float = 180):
    """``predicate()``'s first true value, asked every 0.3 s; the test fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return value


def jobs_of(sweep: Path) -> list:
    """A sweep's jobs.json, or [] while it has none."""
    try:
        return json.loads((sweep / "jobs.json").read_text())
    except (OSError, ValueError):
        return []


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer Llama with the embedded tokenizer, saved with save_pretrained (random weights)."""
    import torch
    from omegaconf import OmegaConf

    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.models.loading import build_model, save_model

    torch.manual_seed(0)
    model_cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    model_cfg.num_layers = 2
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(build_model(model_cfg, tokenizer), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """A real Slurm on 127.0.0.1 (llmexp/launchers/slurm-localhost): node1 with 2 fake H100s, node2 with 2 fake A100s.

    Started (and apt-installed on a fresh machine) for the session and stopped after it, unless
    one was already running, which is used and left running (``llmexp.launchers.slurm_localhost``);
    yields the environment its clients need. Its daemons run as root, so elsewhere the tests skip.
    """
    from llmexp.launchers.slurm_localhost import localhost_slurm

    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root (llmexp/launchers/slurm-localhost/start.sh)")
    try:
        with localhost_slurm() as environment:
            yield environment
    except RuntimeError as error:
        pytest.fail(str(error))
