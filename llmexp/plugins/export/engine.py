"""Building a TensorRT-LLM engine from an HF checkpoint through TensorRT-LLM's LLM API.

TensorRT-LLM is not a dependency: it installs only on Linux with CUDA, from NVIDIA's package
index, and its build needs a GPU. ``tensorrt_llm_problem`` and ``gpu_problem`` say so without
importing it (the run's machine check and the planner call them); ``build_engine`` imports it.

The LLM API builds when it is given an HF directory and a ``BuildConfig``, and ``llm.save``
writes the engine (``config.json`` and ``rank<i>.engine`` per GPU). Since TensorRT-LLM 1.0,
``tensorrt_llm.LLM`` is the PyTorch workflow, which builds no engine; the engine workflow's
class moved to ``tensorrt_llm._tensorrt_engine.LLM``. Both are tried, newest first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from llmexp.sdk import importable
from llmexp.sdk import UserError

INSTALL = (
    "install TensorRT-LLM on a Linux machine with an NVIDIA GPU and CUDA (`pip install tensorrt-llm "
    "--extra-index-url https://pypi.nvidia.com`) or run inside NVIDIA's TensorRT-LLM container "
    "(nvcr.io/nvidia/tensorrt-llm/release)"
)


def tensorrt_llm_problem(field: str, fmt: str) -> Optional[str]:
    """Why ``format=fmt`` cannot build an engine in this environment (tensorrt_llm not importable), or None."""
    if importable("tensorrt_llm"):
        return None
    prebuilt = (f", or give a prebuilt engine with {field}.engine_dir=<dir>" if fmt == "triton" else
                f"; {field}.format=hf writes the checkpoint alone, and {field}.format=triton "
                f"{field}.engine_dir=<dir> serves an engine built elsewhere")
    return (f"{field}.format={fmt} builds a TensorRT-LLM engine and the tensorrt_llm package is not importable "
            f"here: {INSTALL}{prebuilt}.")


def gpu_problem(hardware, field: str, fmt: str) -> Optional[str]:
    """Why the run's hardware cannot build an engine (it is not a GPU), or None."""
    if hardware.accelerator == "gpu":
        return None
    return (f"{field}.format={fmt} builds a TensorRT-LLM engine, which only an NVIDIA GPU can do, and "
            f"hardware={hardware.name} is a {hardware.accelerator}; choose a GPU preset (hardware=h100, a100_80g, "
            f"...), or use {field}.format=hf (the checkpoint alone) or {field}.format=triton with "
            f"{field}.engine_dir=<a prebuilt engine>.")


def require_cuda(hardware, field: str, fmt: str) -> None:
    """At run time: a CUDA device must be visible, whatever the config says."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"{field}.format={fmt} builds a TensorRT-LLM engine on a CUDA GPU and this machine has none visible "
            f"(hardware={hardware.name}); run it on a GPU machine (`llmexp plan` checks a configuration without "
            "running it), or export with format=hf here and build there."
        )


def build_engine(settings: Dict[str, Any], checkpoint_dir: Path, engine_dir: Path) -> None:
    """Build ``checkpoint_dir`` with ``settings`` (``engine_settings.engine_build_settings``) into ``engine_dir``.

    The checkpoint's quantization is passed as an explicit ``QuantConfig``: TensorRT-LLM reads the
    checkpoint's hf_quant_config.json itself and refuses a QuantConfig that disagrees with it, so the
    engine is what the settings (and results.json) say; group size and the like come from the checkpoint.
    """
    llm_class, build_config_class, quant_config_class, quant_algo = tensorrt_engine_api()
    arguments: Dict[str, Any] = {
        "model": str(checkpoint_dir),
        "tensor_parallel_size": settings["tensor_parallel_size"],
        "pipeline_parallel_size": settings["pipeline_parallel_size"],
        "build_config": build_config_class(**settings["build_config"]),
    }
    quantization = settings.get("quantization")
    if quantization is not None:
        arguments["quant_config"] = quant_config_class(
            quant_algo=quant_algo(quantization["quant_algo"]) if quantization["quant_algo"] else None,
            kv_cache_quant_algo=(quant_algo(quantization["kv_cache_quant_algo"])
                                 if quantization["kv_cache_quant_algo"] else None),
        )
    llm = llm_class(**arguments)
    try:
        llm.save(str(engine_dir))
    finally:
        llm.shutdown()


def tensorrt_engine_api():
    """``(LLM, BuildConfig, QuantConfig, QuantAlgo)`` of TensorRT-LLM's engine workflow."""
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as error:
        raise UserError(f"tensorrt_llm could not be imported ({error}); {INSTALL}.") from None
    try:
        from tensorrt_llm._tensorrt_engine import LLM  # TensorRT-LLM >= 1.0
    except ImportError:
        from tensorrt_llm import LLM  # before 1.0 the default LLM builds engines
    from tensorrt_llm.llmapi import BuildConfig, QuantAlgo, QuantConfig

    if not hasattr(LLM, "save"):
        raise UserError(
            f"this TensorRT-LLM ({getattr(tensorrt_llm, '__version__', 'unknown version')}) has no engine-building "
            f"LLM class (one with save(engine_dir)); {INSTALL}, a release that builds TensorRT engines."
        )
    return LLM, BuildConfig, QuantConfig, QuantAlgo


def engine_bytes(engine_dir: Path) -> int:
    """Bytes of the engine files (``rank*.engine``), what the GPUs load."""
    return sum(path.stat().st_size for path in Path(engine_dir).glob("rank*.engine"))
