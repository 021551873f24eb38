"""The Slurm of ``llmexp/launchers/slurm-localhost`` for as long as a block runs: the tests' and benchmarks' cluster.

A cluster already running in ``$BASE`` (someone's own, or another session's) is used as it is
and left running: it is neither restarted (start.sh would restart one started with other
settings) nor stopped. Otherwise one is started for the block and stopped after it, and
stop.sh leaves the machine as it found it.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

SCRIPTS = Path(__file__).resolve().parent / "slurm-localhost"


def base() -> Path:
    """Where start.sh keeps the cluster (its ``BASE``)."""
    return Path(os.environ.get("BASE") or f"{os.environ.get('TMPDIR', '/tmp')}/llmexp-slurm")


def running() -> bool:
    """Whether the controller of a cluster in ``base()`` is alive."""
    try:
        os.kill(int((base() / "run" / "slurmctld.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


@contextmanager
def localhost_slurm() -> Iterator[Dict[str, str]]:
    """The environment a Slurm client needs (``SLURM_CONF``); a cluster started here is stopped on leaving."""
    environment = {"SLURM_CONF": str(base() / "etc" / "slurm.conf")}
    if running():
        yield environment
        return
    started = subprocess.run(["bash", str(SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), "--quiet"], timeout=120)
        raise RuntimeError(f"{SCRIPTS / 'start.sh'} failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    try:
        yield environment
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh"), "--quiet"], timeout=120)
