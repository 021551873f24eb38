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
