"""Without the `serve` extra, ``llmexp serve`` and ``llmexp plugins`` say how to install it.

The base install leaves the HTTP server's packages out. A ``sitecustomize`` module on the
child's PYTHONPATH hides them from its imports, as an environment without them would be: an
import finder ahead of every other that answers "no module named" for each of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmexp.machine.backends import SERVE_EXTRA_MODULES
from tests.conftest import run_llmexp

HIDE_IMPORTS = '''
import sys


class Hidden:
    """Answers for the hidden packages (and their submodules) as an environment without them does."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Hidden())
'''


def without(tmp_path: Path, hidden) -> dict:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HIDE_IMPORTS.format(hidden=set(hidden)))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("hidden", [("fastapi",), SERVE_EXTRA_MODULES], ids=["fastapi", "every-module-of-the-extra"])
def test_serve_without_the_web_stack_says_which_extra_to_install(tmp_path, hidden):
    # an option that would be refused too: the missing extra is said first, and alone
    done = run_llmexp("serve", str(tmp_path / "no-such-model"), "--port", "-1", cwd=tmp_path,
                      env=without(tmp_path, hidden), timeout=120)
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert "pip install 'llmexp[serve]'" in said
    assert f"{', '.join(m for m in SERVE_EXTRA_MODULES if m in hidden)} cannot be imported here" in said
    assert "Traceback" not in done.stderr and "--port" not in said and "no-such-model" not in said
    assert done.stdout == ""


def test_plugins_lists_the_in_process_server_as_needing_the_extra(tmp_path):
    done = run_llmexp("plugins", cwd=tmp_path, env={**without(tmp_path, ("fastapi",)), "COLUMNS": "400"}, timeout=120)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "inprocess" in line)
    assert "unavailable: missing fastapi: pip install 'llmexp[serve]'" in " ".join(row.split())
