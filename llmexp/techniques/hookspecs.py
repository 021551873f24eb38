"""Hook specifications: the whole plugin API. Keep it small.

Built-in techniques implement these hooks the same way a third-party package does,
registered through the ``llmexp`` entry-point group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("llmexp")
hookimpl = pluggy.HookimplMarker("llmexp")


@hookspec
def llmexp_techniques():
    """Return an iterable of ``llmexp.techniques.contract.Technique`` subclasses this plugin provides.

    Each becomes selectable as ``technique=<name>`` (and as a pipeline stage); its
    ``schema`` dataclass, with its defaults, is the config node Hydra composes.
    """


@hookspec
def llmexp_plan_problems(config, plan):
    """Return a list of problem messages (str) for this config, or an empty list.

    Called after the core planner with the composed config and the ``Plan``; a
    non-empty list stops the run before anything is written. Messages name the
    config field and the fix. Must not import torch.
    """


@hookspec
def llmexp_evaluation_tasks():
    """Return an iterable of evaluation task types, each usable in an evaluation's ``tasks``.

    A task type (``llmexp.techniques.evaluation_tasks.TaskType``) has a ``name``; ``run(spec, inputs,
    scorer)`` returning metrics and per-item rows; ``problems(spec, field)``, the checks made
    at plan time, which must not import torch; the ``keys`` its entries take; its
    ``headline`` metric; ``metrics(spec)``, the ``Metric`` values it reports; and whether it
    is ``embedded`` (named bare) or described (``{type: <name>, ...}``). Two plugins
    registering one name is an error.
    """
