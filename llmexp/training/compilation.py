"""``technique.compile=true``: a training step's forward and backward through ``torch.compile`` (TorchInductor).

Inductor fuses what eager PyTorch runs as separate kernels (RMSNorm, RoPE, SwiGLU's gate,
residual adds, the loss): on the embedded default on 2 CPU cores a compiled step is 1.28-1.39x
as fast as an eager one. Compiling costs 30-36 s there the first time (Inductor builds its C++
kernels with the host compiler) and ~2 s once its on-disk cache holds them: ~1,500 steps to pay
back cold, ~100 warm. A fresh clone's first run is cold and the default's baseline trains 1,000
steps, so it is off by default; worth it for long runs, repeated runs and on GPUs
(``benchmarks/bench_train_peak.py`` measures all of it).

What is compiled is the model as the technique's loss calls it, through a wrapper that shares
its parameters, not the module itself: checkpoints keep their keys whether or not a run
compiled, and validation and evaluation run eagerly on their own shapes. Batches of varying
length (padded SFT examples) recompile once with dynamic shapes, then reuse that graph.
"""

from __future__ import annotations

from typing import Any, List

from llmexp.configuration.training_settings import splits_model


def compile_problems(config, key: str, node) -> List[str]:
    """Why ``node.compile`` cannot run in ``config``'s layout (``key``: where the node sits), if it is on."""
    if not node.get("compile"):
        return []
    if config.backend.name != "torch":
        return [f"{key}.compile=true compiles the torch backend's training step; backend={config.backend.name} "
                f"runs its own kernels. Set {key}.compile=false."]
    p = config.parallelism
    if splits_model(p):
        return [f"{key}.compile=true trains a model split over ranks (parallelism tp={p.tp}, sharding={p.sharding}); "
                "torch.compile runs here on whole models with data parallelism. Set "
                f"{key}.compile=false, or train with parallelism.tp=1 and parallelism.sharding=none."]
    return []


def compiled(model) -> Any:
    """``model`` compiled for training: call it as the model (attributes pass through), it shares the parameters."""
    import torch  # lazily: llmexp.sdk hands plugins the loop, and importing it must not import torch

    return torch.compile(model)
