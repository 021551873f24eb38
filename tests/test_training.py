"""Pieces of the shared training loop that can be checked without training."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from llmexp.config import compose_config
from llmexp.data.packing import pack_documents
from llmexp.errors import UserError
from llmexp.training import accumulation_steps, make_trainer, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_accumulation_reaches_global_batch():
    par = OmegaConf.create({"micro_batch": 4, "global_batch": 32, "dp": 2})
    assert accumulation_steps(par) == 4


def test_packing_runs_documents_across_blocks():
    blocks = pack_documents(iter([[1, 2, 3], [4, 5], [6, 7, 8, 9]]), seq_len=4, num_blocks=2)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks.dtype == torch.long
    with pytest.raises(ValueError):
        pack_documents(iter([[1, 2]]), seq_len=4, num_blocks=1)


def test_unsupported_training_setups_are_user_errors():
    with pytest.raises(UserError, match="precision=fp8"):
        make_trainer(compose_config(["precision=fp8"]), 1, False, 1, 1.0)
    with pytest.raises(UserError, match="world size 2"):
        make_trainer(compose_config(["parallelism=dp2"]), 1, False, 1, 1.0)
