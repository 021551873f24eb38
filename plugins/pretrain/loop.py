"""Next-token training on packed blocks of text through ``llmexp.training``: pretrain and cpt.

``data=embedded``: the generated corpus, packed into exactly the run's blocks and seen once
each, in stream order. ``data=text``: the user's documents, packed once into as many full
blocks as they fill and cycled through in a seeded shuffled order.
"""

from __future__ import annotations

import torch

from llmexp.data.embedded import build_world, embedded_token_stream
from llmexp.data.packing import pack_documents
from llmexp.data.text import read_text_documents
from llmexp.errors import UserError
from llmexp.models import base_model, new_embedded_model, starting_model, trained_model_result
from llmexp.technique import ModelArtifact, StageContext, StageResult
from llmexp.training import LossOutput, train


def next_token_loss(model, input_ids) -> LossOutput:
    return LossOutput(model(input_ids=input_ids, labels=input_ids).loss, input_ids.numel())


def pretrain(ctx: StageContext) -> StageResult:
    """From ``model.path`` or the previous stage's model, else from scratch (its purpose: no warning)."""
    return _train_on_text(ctx, starting_model(ctx) or new_embedded_model(ctx.config))


def continued_pretraining(ctx: StageContext) -> StageResult:
    """From a base model; without one it warns and starts from random weights."""
    return _train_on_text(ctx, base_model(ctx))


def _train_on_text(ctx: StageContext, start: ModelArtifact) -> StageResult:
    cfg, tcfg = ctx.config, ctx.stage_config
    tokenizer = start.tokenizer
    if cfg.data.name == "embedded":
        world = build_world(cfg.data.seed, cfg.data.num_people)
        stream = embedded_token_stream(world, tokenizer, cfg.data.word_problem_weight)
        blocks = pack_documents(stream, seq_len=cfg.data.seq_len, num_blocks=tcfg.max_steps * cfg.parallelism.global_batch)
        shuffle = False
    elif cfg.data.name == "text":
        blocks = text_blocks(read_text_documents(cfg.data.paths), tokenizer, cfg.data.seq_len)
        shuffle = True
    else:
        raise UserError(
            f"technique={tcfg.name} trains on raw text: data=embedded or data=text (data.paths=[...]); "
            f"data={cfg.data.name} holds instructions or pairs (technique=sft, lora or dpo read those)."
        )
    metrics = train(ctx, start.model, next_token_loss, blocks, torch.stack, shuffle=shuffle)
    return trained_model_result(ctx, start.model, tokenizer, metrics, save=tcfg.save_model)


def text_blocks(documents, tokenizer, seq_len: int) -> torch.Tensor:
    """Every document tokenized and ended with EOS, packed into full ``seq_len`` blocks (the tail dropped)."""
    stream = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(documents))["input_ids"]]
    tokens = sum(len(ids) for ids in stream)
    if tokens < seq_len:
        raise UserError(
            f"data.paths holds {tokens} tokens, fewer than one block of data.seq_len={seq_len}; "
            "add text or lower data.seq_len."
        )
    return pack_documents(stream, seq_len=seq_len, num_blocks=tokens // seq_len)
