"""Loads technique plugins from the ``llmexp`` entry-point group, as pytest loads ``pytest11``.

The core never names a plugin: built-ins and third-party packages arrive the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Type

import pluggy

from llmexp.techniques import hookspecs
from llmexp.errors import UserError
from llmexp.techniques.contract import Technique

ENTRY_POINT_GROUP = "llmexp"


@dataclass(frozen=True)
class TechniqueEntry:
    technique: Type[Technique]
    plugin: str  # the entry point / module that provided it
    distribution: str  # the installed package it came from


@functools.lru_cache(maxsize=None)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@functools.lru_cache(maxsize=None)
def techniques() -> Dict[str, TechniqueEntry]:
    """Every registered technique by name; two plugins claiming one name is an error."""
    pm = plugin_manager()
    found: Dict[str, TechniqueEntry] = {}
    for impl in pm.hook.llmexp_techniques.get_hookimpls():
        distribution = _distribution_of(pm, impl.plugin)
        for technique in impl.function() or ():
            if technique.name in found:
                raise UserError(
                    f"Two plugins register the technique {technique.name!r}: "
                    f"{found[technique.name].plugin} and {impl.plugin_name}. "
                    "Uninstall one of them or rename its technique."
                )
            found[technique.name] = TechniqueEntry(technique, impl.plugin_name, distribution)
    return found


def technique(name: str) -> Type[Technique]:
    known = techniques()
    if name not in known:
        raise UserError(
            f"technique={name!r} is not registered. Known techniques: {', '.join(sorted(known))}. "
            "Run `llmexp plugins` to see where each comes from."
        )
    return known[name].technique


def plan_problems(config, plan) -> List[str]:
    results = plugin_manager().hook.llmexp_plan_problems(config=config, plan=plan)
    return [problem for problems in results for problem in (problems or ())]


def _distribution_of(pm: pluggy.PluginManager, plugin) -> str:
    for dist_plugin, dist in pm.list_plugin_distinfo():
        if dist_plugin is plugin:
            return f"{dist.project_name} {dist.version}"
    return "registered in-process"
