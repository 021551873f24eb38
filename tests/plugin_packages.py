"""Install an example plugin package (``examples/<name>``) for real, as a user would, without touching the venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

from tests.conftest import REPO


def install_example(name: str, tmp_path: Path) -> Dict[str, str]:
    """``pip install`` a copy of ``examples/<name>`` into a folder of ``tmp_path``; the environment that finds it.

    pip builds in place, so a copy keeps the repository clean; ``--target`` leaves the venv as it is,
    and the entry points are found on ``PYTHONPATH`` as on any ``site-packages``.
    """
    site, source = tmp_path / "site", tmp_path / name
    shutil.copytree(REPO / "examples" / name, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(source)],
        check=True, capture_output=True,
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
