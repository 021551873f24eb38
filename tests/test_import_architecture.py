"""The import architecture of pyproject.toml's [tool.importlinter] holds, and breaking it is caught.

The contracts: the core's layers in order, the built-in plugins independent of each other, a
plugin importing the core only through llmexp.sdk and llmexp.data, the core importing no plugin.
Both tests run the real ``lint-imports`` in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the tree in cwd, not the installed package, is checked
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_keeps_every_import_contract():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_plugin_importing_another_plugin_breaks_the_check(tmp_path):
    shutil.copytree(ROOT / "llmexp", tmp_path / "llmexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    plugins = sorted(p.name for p in (tmp_path / "llmexp" / "plugins").iterdir() if (p / "__init__.py").is_file())
    importer, imported = plugins[0], plugins[1]
    with open(tmp_path / "llmexp" / "plugins" / importer / "__init__.py", "a") as module:
        module.write(f"\nimport llmexp.plugins.{imported}\n")

    done = lint_imports(tmp_path)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Built-in plugins are independent of each other BROKEN" in done.stdout
    assert f"llmexp.plugins.{importer} -> llmexp.plugins.{imported}" in done.stdout
