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
    assert found == set(setuptools["packages"])
