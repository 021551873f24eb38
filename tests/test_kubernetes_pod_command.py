"""What a Kubernetes pod of a sweep runs, run here for real: the dry run's manifest, then its container command.

Trainer v2's ``torch-distributed`` runtime (and the training operator for a PyTorchJob) starts
the container with the ``PET_*`` variables torchrun reads: node count, processes per node, node
rank, master address and port. The experiment is a config file on the shared volume (``--config-dir``,
``--config-name``), which the pod's command must name. Here the same variables come from the manifest's
``numNodes``/``numProcPerNode``, and the command runs as the pod would run it, ``torchrun -m
llmexp ...`` with two ranks on this machine: every rank joins the job from torchrun's
environment, rank 0 writes the run directory on the shared volume, and the run trains as the
same layout started by llmexp itself does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_results, run_llmexp

# the experiment, as a sweep file on the shared volume: the pod must compose it from there, not from the default config
EXPERIMENT = """\
defaults:
  - config
  - override pipeline: technique_only
  - override technique: pretrain
  - override parallelism: dp2
  - _self_
technique: {max_steps: 3, checkpoint_every: 0}
data: {seq_len: 32}
parallelism: {micro_batch: 4, global_batch: 8}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dry_run_manifest(tmp_path: Path, volume: Path, experiment: list) -> dict:
    storage = [f"cluster.storage.mount_path={volume}", f"cluster.storage.local_path={volume}"]
    result = run_llmexp("-m", *experiment, "hydra/launcher=kubernetes", "cluster=eks_example", "hardware=cpu", *storage,
                        f"hydra.sweep.dir={volume}/sweep", "hydra.launcher.dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(manifests) == 1 and manifests[0]["kind"] == "TrainJob"
    return manifests[0]


@pytest.mark.slow
def test_the_pods_command_trains_under_torchrun_as_llmexp_started_ranks_do(tmp_path):
    volume = tmp_path / "fsx"
    (volume / "configs").mkdir(parents=True)
    (volume / "configs" / "tiny_dp2.yaml").write_text(EXPERIMENT)
    experiment = [f"--config-dir={volume / 'configs'}", "--config-name=tiny_dp2"]
    trainer = _dry_run_manifest(tmp_path, volume, experiment)["spec"]["trainer"]
    command = trainer["command"]
    assert command[:5] == ["torchrun", "-m", "llmexp", *experiment]
    run_dir = Path(next(arg for arg in command if arg.startswith("hydra.run.dir=")).split("=", 1)[1])
    assert run_dir.parent == volume / "sweep"
    pod_env = {
        **os.environ, **{item["name"]: item["value"] for item in trainer.get("env", [])},
        "PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port()),
    }
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    pod = subprocess.run([torchrun, *command[1:]], cwd=tmp_path, env=pod_env, capture_output=True, text=True,
                         timeout=600)
    assert pod.returncode == 0, pod.stderr[-3000:]

    results = read_results(run_dir)
    assert results["status"] == "completed"
    local = run_llmexp(*experiment, f"hydra.run.dir={tmp_path / 'local'}", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    pod_losses = [json.loads(line)["loss"] for line in (run_dir / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    local_losses = [json.loads(line)["loss"]
                    for line in (tmp_path / "local" / "pretrain" / "train_log.jsonl").read_text().splitlines()]
    assert pod_losses == pytest.approx(local_losses, abs=1e-6)
