"""A Hugging Face causal LM split over a device mesh for training: tensor parallel and FSDP2.

``parallelize`` applies, in place, on the mesh of Lightning's ``ModelParallelStrategy``
(dims ``data_parallel`` x ``tensor_parallel``):

- tensor parallel (PyTorch DTensor ``parallelize_module``) with the plan the model's own config
  publishes (``base_model_tp_plan``; for Llama, Mistral and Qwen2: q/k/v/gate/up column-wise,
  o/down row-wise). Each rank holds whole attention and KV heads (the planner checks that tp
  divides both) and its slice of the MLP; the residual stream, embeddings, norms and LM head
  stay whole on every rank, so a loss sees plain full logits.
- FSDP2 (``fully_shard``) over the data-parallel ranks, per decoder block (the classes in the
  model's ``_no_split_modules``) and then the whole model.

Training goes on a copy split this way; ``load_full_weights`` then gathers the full weights
into the caller's plain model on every rank, which later stages use and rank 0 saves.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List

import torch
from torch import nn

from llmexp.errors import UserError

TP_DIM, DP_DIM = "tensor_parallel", "data_parallel"  # the mesh dims Lightning's ModelParallelStrategy names


def parallelize(model: nn.Module, mesh, tensor_parallel: bool, shard: bool) -> None:
    """Split ``model`` over ``mesh``: tensor parallel over its ``tensor_parallel`` dim, FSDP2 over ``data_parallel``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if tensor_parallel:
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
        parallelize_module(hf_model.base_model, mesh[TP_DIM], tensor_parallel_plan(hf_model))
    if shard:
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh[DP_DIM])
        fully_shard(model, mesh=mesh[DP_DIM])


def tensor_parallel_plan(hf_model: nn.Module) -> Dict[str, object]:
    """PyTorch parallel styles for the model config's ``base_model_tp_plan`` (module paths under its base model)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = getattr(hf_model.config, "base_model_tp_plan", None) or {}
    unknown = sorted({style for style in plan.values() if style not in styles})
    if not plan or unknown:
        detail = f"uses {', '.join(unknown)}" if unknown else "publishes none"
        raise UserError(
            f"parallelism.tp > 1 splits a model by its config's tensor-parallel plan, and "
            f"{type(hf_model).__name__}'s {detail} (the torch backend applies colwise and rowwise); "
            "train it with parallelism.tp=1 (data parallel, or parallelism.sharding=fsdp to split its weights)."
        )
    return {path: styles[style]() for path, style in plan.items()}


def load_full_weights(parallel_model: nn.Module, plain_model: nn.Module) -> None:
    """Gather ``parallel_model``'s full weights on every rank and load them into ``plain_model`` (same structure)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(parallel_model, options=StateDictOptions(full_state_dict=True))
    plain_model.load_state_dict(state)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total 2-norm of ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does; the norm.

    Here the gradients are DTensors on more than one mesh (tensor-parallel layers on the
    data x tensor mesh, the rest on the data mesh or plain tensors), which torch's version
    cannot stack into one norm: each mesh's norm is reduced to a plain tensor first.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication

    groups: Dict[object, List[nn.Parameter]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            groups[getattr(param.grad, "device_mesh", None)].append(param)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.nn.utils.get_total_norm(norms)
    with implicit_replication():  # the plain total scales DTensor gradients
        for params in groups.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
