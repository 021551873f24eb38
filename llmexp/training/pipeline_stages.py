"""A Hugging Face causal LM trained as pipeline stages with torch.distributed.pipelining (``parallelism.pp > 1``).

Each rank keeps a copy of the model pruned to its stage (``llmexp.planning.layout.stage_layers``):
the layers of other stages become pass-throughs, the input embedding stays on the first stage and the final
norm and LM head on the last. Parameter names are the full model's, so the stages' state dicts together
are the full model's state dict. A tied input/output embedding is held by the first and the last stage;
their gradients are summed after each step (Megatron's embedding group), so both copies stay equal.

One optimiser step is one ``Pipeline.step``: the step's micro-batches of this data-parallel rank go through
``ScheduleGPipe`` or ``Schedule1F1B``. The technique's loss is unchanged: on the last stage it gets a
stand-in model (``_StageLogits``) that answers its call with the pipeline's logits for that micro-batch and the
model's own loss on the labels it passes. Which inputs a micro-batch hands the model (input ids, an attention
mask) every stage learns by calling the loss once with a model that records the call (``model_inputs``).
Stages exchange hidden states padded to the step's longest micro-batch, so every micro-batch of a step has one
shape; a step of another shape than the last makes its schedule anew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmexp.errors import UserError
from llmexp.planning.layout import stage_layers
from llmexp.training.pipeline_parallel import data_rank_of, pipeline_stages, stage_of


@dataclass
class Groups:
    """This rank's stage and the process groups it takes part in (every rank creates every group, in one order)."""

    stage: int
    stages: int
    pipeline: Any  # the ranks of this data-parallel replica's pipeline, stage order
    data: Optional[Any]  # the ranks holding this stage in the other replicas (None: dp=1)
    embedding: Optional[Any]  # first and last stage of this pipeline, for a tied embedding

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def process_groups(parallelism, rank: int) -> Groups:
    pp, dp = parallelism.pp, parallelism.dp
    mine: Dict[str, Any] = {"data": None}
    for d in range(dp):
        group = dist.new_group([d * pp + s for s in range(pp)])
        if d == data_rank_of(rank, pp):
            mine["pipeline"] = group
    for d in range(dp):
        group = dist.new_group([d * pp, d * pp + pp - 1])
        if d == data_rank_of(rank, pp):
            mine["embedding"] = group
    if dp > 1:
        for s in range(pp):
            group = dist.new_group([d * pp + s for d in range(dp)])
            if s == stage_of(rank, pp):
                mine["data"] = group
    return Groups(stage_of(rank, pp), pp, **mine)


class _Recorded(Exception):
    """Raised by ``_Recorder`` once it has the model call's arguments: the rest of the loss is not needed."""


class _Recorder:
    def __call__(self, *args, **kwargs):
        if args:
            raise UserError("parallelism.pp > 1 trains a loss that calls the model with keyword arguments "
                            "(input_ids=..., labels=...); this technique's loss passes positional ones. Set "
                            "parallelism.pp=1.")
        raise _Recorded(kwargs)


def model_inputs(loss_fn, batch) -> Dict[str, Any]:
    """The keyword arguments ``loss_fn`` calls the model with for ``batch`` (the loss stops at the call)."""
    try:
        loss_fn(_Recorder(), batch)
    except _Recorded as recorded:
        return recorded.args[0]
    raise UserError("parallelism.pp > 1 trains a loss that calls the model; this technique's loss did not.")


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside ``model`` (a PEFT model wraps it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(lm: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` of a Llama/Mistral/Qwen causal LM), refused when it is not one."""
    base = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if base is None or not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm")):
        raise UserError(
            f"parallelism.pp > 1 splits a decoder stack with embed_tokens, layers and norm (Llama, Mistral, Qwen), "
            f"and {type(lm).__name__} has none; train it with parallelism.pp=1.")
    return base


class _PassThrough(nn.Module):
    """A layer another stage holds."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def prune_to_stage(model: nn.Module, groups: Groups) -> bool:
    """Keep only this stage's parts of ``model`` (in place); whether its input and output embeddings are tied."""
    lm = causal_lm(model)
    base = decoder(lm)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    kept = stage_layers(len(base.layers), groups.stages)[groups.stage]
    for index in range(len(base.layers)):
        if index not in kept:
            base.layers[index] = _PassThrough()
    if not groups.first:
        base.embed_tokens = nn.Identity()
    if not groups.last:
        base.norm = nn.Identity()
        lm.set_output_embeddings(nn.Identity())
    return tied


class _StageModule(nn.Module):
    """One stage's forward: takes the previous stage's hidden states (the first stage: a micro-batch's index)
    and returns its own, padded to the step's length (the last stage: logits)."""

    def __init__(self, model: nn.Module, groups: Groups):
        super().__init__()
        self.model, self.groups = model, groups
        self.inputs: List[Dict[str, Any]] = []
        self.length = 0
        self.calls = 0  # both schedules run a stage's forwards in micro-batch order

    def forward(self, received):
        inputs = self.inputs[self.calls]
        self.calls += 1
        lm = causal_lm(self.model)
        ids = inputs["input_ids"]
        given = {"attention_mask": inputs.get("attention_mask"), "use_cache": False}
        if self.groups.first:
            hidden = decoder(lm)(input_ids=ids, **given).last_hidden_state
        else:
            hidden = decoder(lm)(inputs_embeds=received[:, : ids.shape[1]], **given).last_hidden_state
        if self.groups.last:
            hidden = lm.get_output_embeddings()(hidden)
        return F.pad(hidden.float(), (0, 0, 0, self.length - ids.shape[1]))


class _StageLogits:
    """What the technique's loss calls instead of the model on the last stage: the pipeline's logits."""

    def __init__(self, lm: nn.Module, logits: torch.Tensor):
        self.lm, self.logits = lm, logits

    def __call__(self, input_ids, labels=None, output_hidden_states=False, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if output_hidden_states:
            raise UserError("parallelism.pp > 1 hands a loss the logits only, and this one asks for hidden states; "
                            "set parallelism.pp=1.")
        loss = None
        if labels is not None:
            loss = self.lm.loss_function(logits=self.logits, labels=labels, vocab_size=self.lm.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=self.logits)


class Pipeline:
    """A pruned model's stage of the pipeline, its schedule, and the gradient exchange of one optimiser step."""

    def __init__(self, model: nn.Module, parallelism, loss_fn, device):
        self.groups = process_groups(parallelism, dist.get_rank())
        with torch.no_grad():  # rank 0's weights everywhere, as DDP starts: each rank may have drawn its own
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.tied = prune_to_stage(model, self.groups)
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.parallelism = parallelism
        self.module = _StageModule(model, self.groups)
        self._shape: Optional[Tuple[int, ...]] = None  # of the micro-batches ``_current`` runs
        self._current: Any = None
        self._outputs: List[Any] = []

    def step(self, micro_batches: List[Any]) -> Tuple[float, int, Dict[str, float]]:
        """Forward and backward of one step's micro-batches; (sum of their losses, tokens, last one's logs) on
        every stage, from the last."""
        inputs = [model_inputs(self.loss_fn, batch) for batch in micro_batches]
        rows = inputs[0]["input_ids"].shape[0]
        self.module.inputs, self.module.calls = inputs, 0
        self.module.length = max(item["input_ids"].shape[1] for item in inputs)
        self._batches, self._outputs = micro_batches, []
        schedule = self._schedule(rows, self.module.length, len(micro_batches))
        indices = torch.arange(len(micro_batches), device=self.device)
        if self.groups.first:
            schedule.step(indices)
        elif self.groups.last:
            schedule.step(target=indices)
        else:
            schedule.step()
        summary = None
        if self.groups.last:
            summary = (sum(float(out.loss.detach()) for out in self._outputs), sum(out.tokens for out in self._outputs),
                       {key: float(value) for key, value in self._outputs[-1].logs.items()})
        return self.from_last_stage(summary)

    def evaluate(self, batch):
        """The technique's loss on ``batch`` through the stages, forward only (run under no_grad): its
        ``LossOutput`` on the last stage, None on the others."""
        inputs = model_inputs(self.loss_fn, batch)
        rows, length = inputs["input_ids"].shape
        self.module.inputs, self.module.calls, self.module.length = [inputs], 0, length
        received = None
        if not self.groups.first:
            received = torch.empty(rows, length, causal_lm(self.model).config.hidden_size, device=self.device)
            dist.recv(received, group_src=self.groups.stage - 1, group=self.groups.pipeline)
        output = self.module(received)
        if not self.groups.last:
            dist.send(output, group_dst=self.groups.stage + 1, group=self.groups.pipeline)
            return None
        return self.loss_fn(_StageLogits(causal_lm(self.model), output), batch)

    def from_last_stage(self, value):
        """The last stage's ``value`` (any picklable object) on every stage of this pipeline."""
        box = [value]
        dist.broadcast_object_list(box, group_src=self.groups.stages - 1, group=self.groups.pipeline)
        return box[0]

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = int(target[0])
        length = self.module.inputs[index]["input_ids"].shape[1]
        out = self.loss_fn(_StageLogits(causal_lm(self.model), output[:, :length].contiguous()), self._batches[index])
        self._outputs.append(out)
        return out.loss

    def _schedule(self, rows: int, length: int, micro_batches: int):
        """The schedule for micro-batches of ``rows`` x ``length`` tokens, made again when the shape changes: the
        stages are told the shapes they exchange (so none is inferred by an extra forward), and only the current
        shape's receive buffers are kept."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        key = (rows, length, micro_batches)
        if self._shape != key:
            config = causal_lm(self.model).config
            hidden = torch.empty(rows, length, config.hidden_size, device=self.device, requires_grad=True)
            received = torch.zeros(1, dtype=torch.long, device=self.device) if self.groups.first else hidden
            sent = torch.empty(rows, length, config.vocab_size, device=self.device) if self.groups.last else hidden
            stage = PipelineStage(self.module, self.groups.stage, self.groups.stages, self.device,
                                  input_args=received, output_args=sent, group=self.groups.pipeline)
            kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.parallelism.pipeline_schedule]
            self._current = kind(stage, micro_batches, loss_fn=self._loss, scale_grads=True)
            self._shape = key
        return self._current

    def synchronize_gradients(self) -> None:
        """Average over the data-parallel replicas of this stage; sum a tied embedding's over its two stages."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.groups.data is not None and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.groups.data)
            flat /= self.parallelism.dp
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        shared = self._tied_weight()
        if shared is not None and shared.grad is not None:
            dist.all_reduce(shared.grad, group=self.groups.embedding)

    def _tied_weight(self) -> Optional[nn.Parameter]:
        if not self.tied or not (self.groups.first or self.groups.last):
            return None
        lm = causal_lm(self.model)
        return (lm.get_input_embeddings() if self.groups.first else lm.get_output_embeddings()).weight

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a total 2-norm of ``max_norm`` over all stages (a tied embedding counted once); the norm."""
        duplicate = self._tied_weight() if self.groups.last and not self.groups.first else None
        params = [p for p in self.model.parameters() if p.grad is not None]
        counted = [p.grad for p in params if p is not duplicate]
        squares = torch.zeros((), device=self.device)
        if counted:
            squares = torch.nn.utils.get_total_norm(counted).float() ** 2
        dist.all_reduce(squares, group=self.groups.pipeline)
        total = squares.sqrt()
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


def full_state_dict(module: nn.Module, group=None) -> Dict[str, torch.Tensor]:
    """The union of every stage's state dict (each rank's ``module`` holds its stage's parameters)."""
    parts: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in module.state_dict().items()}, group=group)
    full: Dict[str, torch.Tensor] = {}
    for part in parts:
        full.update(part)
    return full


def load_full_weights(pipeline_model: nn.Module, plain_model: nn.Module) -> None:
    """Gather the stages' weights on every rank and load them into ``plain_model`` (the unpruned structure)."""
    plain_model.load_state_dict(full_state_dict(pipeline_model))


def load_stage_state_dict(module: nn.Module, full: Dict[str, torch.Tensor]) -> None:
    """Load this stage's part of a full state dict into ``module`` (which holds only that part)."""
    own = module.state_dict().keys()
    module.load_state_dict({key: value for key, value in full.items() if key in own})


def pipeline_metrics(model: nn.Module, parallelism, peak_mb: float) -> Dict[str, Any]:
    """``peak_memory_mb_per_rank`` (index = global rank) and ``pipeline_stages`` (each stage's layers and ranks)."""
    peaks: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_mb)
    layers = len(decoder(causal_lm(model)).layers)
    return {"peak_memory_mb_per_rank": peaks, "pipeline_stages": pipeline_stages(layers, parallelism)}


def pipeline_strategy_class():
    """Lightning's DDP strategy without the DDP wrapper (stages are not replicas: ``Pipeline`` exchanges gradients),
    whose checkpoints hold the full model and every rank's optimiser state."""
    from lightning.pytorch.strategies import DDPStrategy

    class PipelineStrategy(DDPStrategy):
        def configure_ddp(self) -> None:
            pass

        def lightning_module_state_dict(self) -> Dict[str, Any]:
            return full_state_dict(self.lightning_module)

        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            load_stage_state_dict(self.lightning_module, checkpoint["state_dict"])

        def optimizer_state(self, optimizer) -> Dict[str, Any]:
            states: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, super().optimizer_state(optimizer))
            return {"ranks": states}

        def load_optimizer_state_dict(self, checkpoint) -> None:
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
                optimizer.load_state_dict(state["ranks"][self.global_rank])

    return PipelineStrategy
