"""The engines behind the commands: what trains, serves and builds, and whether each can run here.

``llmexp plugins`` lists them beside the techniques; a training backend is chosen with ``backend=``,
whose options and their schemas are ``llmexp.configuration.schema.BACKEND_OPTIONS`` (an unknown one fails at
compose time). Availability is found without importing anything heavy (module specs, the NVIDIA
driver's ``/proc`` entry), so listing stays instant.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present where the NVIDIA kernel driver is loaded


@dataclass(frozen=True)
class Backend:
    name: str
    role: str  # training | serving | export
    selected_by: str  # how a user chooses it
    description: str
    requires: Tuple[str, ...]  # importable modules it cannot run without
    install: str  # how to get them
    needs_gpu: bool
    optional: Tuple[Tuple[str, str], ...] = ()  # (module, what it adds where it is installed)


# The web stack of the in-process server (``llmexp serve``), which the base install leaves out: the `serve` extra.
SERVE_EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "pydantic")
SERVE_EXTRA_INSTALL = "pip install 'llmexp[serve]'"

BACKENDS: Dict[str, Backend] = {backend.name: backend for backend in (
    Backend("torch", "training", "backend=torch (default)",
            "Lightning on torch.distributed: DDP, FSDP2, DTensor tensor parallel", ("torch", "lightning"),
            "pip install torch==2.13.0 llmexp", needs_gpu=False),
    Backend("megatron", "training", "backend=megatron",
            "megatron-core: tp, pp + virtual stages, sequence parallel, distributed optimizer, FP8/FP4",
            ("megatron.core",), "pip install 'llmexp[megatron]'", needs_gpu=True,
            optional=(("transformer_engine", "Transformer Engine layer spec, FP8/FP4 kernels"),
                      ("megatron.bridge", "Megatron-Bridge's AutoBridge checkpoint conversion"))),
    Backend("inprocess", "serving", "llmexp serve (default)",
            "continuous batching over transformers' KV cache, LoRA per request",
            ("torch", "transformers", *SERVE_EXTRA_MODULES), SERVE_EXTRA_INSTALL, needs_gpu=False),
    Backend("vllm", "serving", "llmexp serve --backend vllm", "vLLM's OpenAI-compatible server", ("vllm",),
            "pip install vllm (CUDA machines)", needs_gpu=True),
    Backend("tensorrt_llm", "export", "technique=export technique.format=trtllm|triton",
            "TensorRT-LLM engines through its LLM API, served by Triton", ("tensorrt_llm",),
            "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com (CUDA machines)", needs_gpu=True),
)}


def missing_modules(backend: Backend) -> List[str]:
    return [module for module in backend.requires if not importable(module)]


def unavailable_reason(backend: Backend) -> Optional[str]:
    """Why ``backend`` cannot run on this machine (a missing package, no GPU), or None when it can."""
    missing = missing_modules(backend)
    if missing:
        return f"missing {', '.join(missing)}: {backend.install}"
    if backend.needs_gpu and not gpu_driver_present():
        return "needs a CUDA GPU; this machine has no NVIDIA driver"
    return None


def installed_options(backend: Backend) -> List[str]:
    return [module for module, _ in backend.optional if importable(module)]


def gpu_driver_present() -> bool:
    return os.path.exists(NVIDIA_DRIVER)


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False
