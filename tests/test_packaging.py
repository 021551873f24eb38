"""The wheel carries every package: pyproject lists them by hand (conf/ and plugins/ are mapped)."""

from __future__ import annotations

import tomllib

from .conftest import REPO


def test_every_python_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join((package, *init.parent.relative_to(REPO / folder).parts))
        for package, folder in setuptools["package-dir"].items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    # hydra_plugins is a namespace package shared with Hydra's own plugins: no package-dir entry
    found |= {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "hydra_plugins").rglob("__init__.py")}
    assert found == set(setuptools["packages"])
