"""Hugging Face <-> Megatron weights through NVIDIA Megatron-Bridge's ``AutoBridge``, where it is installed.

Megatron-Bridge (PyPI ``megatron-bridge``, import ``megatron.bridge``) knows every architecture's
mapping for Transformer Engine's layer spec, so on GPU machines that have it, ``llmexp.training.megatron.train``
converts through it; elsewhere (no Bridge, which needs Transformer Engine) our own
``checkpoint_mapping`` serves. Both functions are collective: every rank of the job calls them.
Written against Megatron-Bridge's ``AutoBridge.from_hf_config``, ``load_hf_weights`` and
``export_hf_weights`` (0.3 and later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from llmexp.machine.backends import importable
from llmexp.errors import UserError

MISSING = (
    "Converting through Megatron-Bridge needs the megatron-bridge package (import megatron.bridge), which "
    "is not installed here; it needs Transformer Engine and a CUDA GPU. Install it on the GPU machine "
    "(pip install megatron-bridge), or let the training use llmexp's own Llama mapping "
    "(llmexp.training.megatron.checkpoint_mapping), which needs only megatron-core."
)


def bridge_available() -> bool:
    """Whether ``megatron.bridge`` can be imported, found without importing it (its import pulls in TE)."""
    return importable("megatron.bridge")


def load_hf_weights(chunks: List[Any], hf_model, hf_dir: Path) -> Any:
    """Load ``hf_model``'s weights, saved in ``hf_dir``, into this rank's megatron-core ``chunks``; the bridge."""
    if not bridge_available():
        raise UserError(MISSING)
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_config(hf_model.config)
    bridge.load_hf_weights(chunks, str(hf_dir))
    return bridge


def hf_state(bridge: Any, chunks: List[Any]) -> Dict[str, Any]:
    """The Hugging Face state dict of the (trained) ``chunks``: every rank gets the full tensors, on the CPU."""
    return {name: tensor for name, tensor in bridge.export_hf_weights(chunks, cpu=True, show_progress=False)}
