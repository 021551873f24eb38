"""Pipeline parallelism: a Llama-style causal LM's decoder layers split into consecutive stages over pp ranks.

Stage ``i`` of ``pp`` holds decoder layers ``i*L/pp .. (i+1)*L/pp - 1``; the first also the token
embeddings, the last also the final norm and the LM head, and the loss runs there.
``torch.distributed.pipelining`` moves activations and gradients between the stages and runs a
GPipe schedule over micro-batches, whose gradients it averages: one ``step`` computes the mean
loss of the batch and the same gradients the whole model would, each stage's for its own layers.
A model with tied embeddings has them on the first and the last stage: their gradient is the sum
of the two stages' (an all-reduce between them, as Megatron's embedding group does).

The training loop (``llmexp.training``) does not train through pipeline stages yet: the planner
refuses ``parallelism.pp > 1`` for training stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecoderStage(nn.Module):
    """Stage ``index`` of ``count`` of ``model``: token ids (first stage) or hidden states in, hidden states
    or logits (last stage) out. It holds ``model``'s own modules, so it trains ``model``'s weights."""

    def __init__(self, model: nn.Module, index: int, count: int):
        super().__init__()
        base = model.base_model
        per_stage = len(base.layers) // count
        self.first, self.last = index == 0, index == count - 1
        self.config = base.config
        self.embed_tokens = base.embed_tokens if self.first else None
        self.layers = nn.ModuleList(base.layers[index * per_stage : (index + 1) * per_stage])
        self.rotary_emb = base.rotary_emb  # no weights: every stage computes the positions' rotations
        self.norm = base.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(inputs) if self.first else inputs
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=positions
        )
        rotations = self.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotations, position_ids=positions)
        return self.lm_head(self.norm(hidden)) if self.last else hidden


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token, as Hugging Face's causal LM loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def pipeline_schedule(model: nn.Module, index: int, count: int, microbatches: int, group=None, device=None):
    """The GPipe schedule of this rank's stage ``index`` of ``count`` over ``microbatches`` micro-batches.

    ``schedule.step(input_ids)`` on the first stage, ``step(target=input_ids, losses=[])`` on the
    last (which fills ``losses`` with each micro-batch's loss), ``step()`` on the others.
    """
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    device = device or torch.device("cpu")
    stage = PipelineStage(DecoderStage(model, index, count), index, count, device, group=group)
    return ScheduleGPipe(stage, n_microbatches=microbatches, loss_fn=next_token_loss)

