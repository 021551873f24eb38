"""Raw text as model inputs: documents packed into fixed-length blocks of token ids.

What pretraining and continued pretraining train on, and what calibration (quantization
scales, pruning importance) reads: the same packing, so a calibration set looks like the
data the model learned from.
"""

from __future__ import annotations

import torch

from llmexp.data.embedded import build_world, embedded_token_stream
from llmexp.data.knowledge import knowledge_corpus
from llmexp.data.packing import pack_documents
from llmexp.data.text import RAW_TEXT_DATA, raw_text_refusal, read_text_documents, text_corpus
from llmexp.errors import UserError


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


def raw_text_blocks(data, tokenizer, embedded_blocks: int):
    """``(blocks, shuffle)`` of ``data=embedded`` (the generated stream: exactly ``embedded_blocks``, in stream
    order), ``data=knowledge`` (the second world's biographies) or ``data=text``/``data=noisy_web`` (every full block
    the files fill); all but the stream to be shuffled."""
    if data.name == "embedded":
        stream = embedded_token_stream(build_world(data.seed, data.num_people), tokenizer, data.word_problem_weight)
        return pack_documents(stream, seq_len=data.seq_len, num_blocks=embedded_blocks), False
    if data.name == "knowledge":
        return text_blocks(knowledge_corpus(data), tokenizer, data.seq_len), True
    return text_blocks(read_text_documents(*text_corpus(data)), tokenizer, data.seq_len), True


def training_blocks(config, node, tokenizer):
    """``(blocks, shuffle)`` a raw-text training stage (``node``: pretrain, cpt, distill) trains on: ``node.max_steps``
    global batches of the generated stream, or every block ``data=text`` fills; other data is refused (the plan
    refuses it first)."""
    if config.data.name not in RAW_TEXT_DATA:
        raise UserError(raw_text_refusal(node.name, config.data.name))
    return raw_text_blocks(config.data, tokenizer, node.max_steps * config.parallelism.global_batch)


def calibration_blocks(config, tokenizer, size: int, field: str) -> torch.Tensor:
    """``size`` sequences of ``data.seq_len`` tokens of the run's raw text (``data=embedded`` or ``data=text``).

    ``field`` names ``calibration_size`` in messages; the plan hooks refuse other data.
    """
    blocks, _ = raw_text_blocks(config.data, tokenizer, size)
    if len(blocks) < size:
        raise UserError(
            f"{field}={size} asks for more calibration sequences than data.paths holds: {len(blocks)} of "
            f"data.seq_len={config.data.seq_len} tokens. Set {field}={len(blocks)} or less, or add text."
        )
    return blocks[:size]
