"""Pre-flight checks of a customization stage: its numbers and its data.

Run by the plan hook, so a malformed JSONL line or a pair whose chosen equals its
rejected ends the command before Hydra writes anything. Pure Python: the data readers
parse files without torch.
"""

from __future__ import annotations

from typing import List

from llmexp.data.instructions import instruction_data
from llmexp.data.preference import preference_data
from llmexp.sdk import UserError
from llmexp.sdk import training_problems, validation_problem

# What each technique reads from the `data` group.
DATA_READERS = {"sft": instruction_data, "lora": instruction_data, "dpo": preference_data}


def stage_problems(config, node, key: str) -> List[str]:
    """Problems of the customization stage ``key``: its numbers and its data (``llmexp.models.starting_weights`` checks its base)."""
    problems = training_problems(node, key) + numbers_problems(node, key)
    try:
        train, validation = DATA_READERS[node.name](config.data)
        if not train:
            problems.append(f"{key}: the training data holds no examples; check data.path and data.validation_split.")
        if node.val_every and not validation:
            problems.append(validation_problem(node, key))
    except UserError as error:
        problems.append(str(error))
    return problems


def numbers_problems(node, key: str) -> List[str]:
    """Values of a customization node's own settings that must keep in range."""
    problems = []
    for name in ("rank", "alpha"):
        value = node.get(name)
        if value is not None and value < 1:
            problems.append(f"{key}.{name}={value} must be at least 1.")
    dropout = node.get("dropout")
    if dropout is not None and not 0 <= dropout < 1:
        problems.append(f"{key}.dropout={dropout} must be in [0, 1).")
    beta = node.get("beta")
    if beta is not None and beta <= 0:
        problems.append(f"{key}.beta={beta} must be positive (0.1 is usual).")
    return problems
