"""Shared fixtures: run the real ``llmexp`` command, and a tiny HF checkpoint on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmexp.results import read_results  # noqa: F401  (the tests read runs through it)

REPO = Path(__file__).resolve().parents[1]


def run_llmexp(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``llmexp <args>`` in a fresh process, as a user runs it (offline trackers, no network)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "llmexp", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer Llama with the embedded tokenizer, saved with save_pretrained (random weights)."""
    import torch
    from omegaconf import OmegaConf

    from llmexp.data.embedded import build_world
    from llmexp.data.tokenizer import word_level_tokenizer
    from llmexp.models import build_model, save_model

    torch.manual_seed(0)
    model_cfg = OmegaConf.load(REPO / "conf/model/tiny_llama.yaml")
    model_cfg.num_layers = 2
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(build_model(model_cfg, tokenizer), tokenizer, path)
    return path


SLURM_SCRIPTS = REPO / "launchers" / "slurm-localhost"


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """A real Slurm on 127.0.0.1 (launchers/slurm-localhost): node1 with 2 fake H100s, node2 with 2 fake A100s.

    Started (and apt-installed on a fresh machine) for the session, stopped after it; yields
    the environment its clients need. Its daemons run as root, so elsewhere the tests skip.
    """
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root (launchers/slurm-localhost/start.sh)")
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"launchers/slurm-localhost/start.sh failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    base = os.environ.get("BASE", f"{os.environ.get('TMPDIR', '/tmp')}/llmexp-slurm")
    yield {"SLURM_CONF": f"{base}/etc/slurm.conf"}
    subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh"), "--quiet"], timeout=120)
