"""Checkpoints are HF directories: what the framework saves, plain transformers loads, and back."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmexp.data.embedded import build_world
from llmexp.data.tokenizer import word_level_tokenizer
from llmexp.errors import UserError
from llmexp.models.loading import build_model, load_model, model_stats
from llmexp.models.vocabulary import vocabulary_problem

from .conftest import REPO, read_results, run_llmexp


def tiny_config(layers: int = 2):
    cfg = OmegaConf.load(REPO / "llmexp/conf/model/tiny_llama.yaml")
    cfg.num_layers = layers
    return cfg


def test_built_model_has_the_configured_architecture():
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    model = build_model(tiny_config(8), tokenizer)
    hf = model.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (8, 128, 4, 2)
    assert hf.hidden_act == "silu" and hf.tie_word_embeddings and hf.architectures == ["LlamaForCausalLM"]
    assert model_stats(model)["parameters"] == 1_607_808


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_as_the_plan_refuses_it():
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    config = OmegaConf.merge(tiny_config(), {"vocab_size": 64})
    with pytest.raises(UserError) as error:
        build_model(config, tokenizer)
    assert str(error.value) == vocabulary_problem(64, len(tokenizer))
    assert str(error.value).endswith(f"set model.vocab_size={-(-len(tokenizer) // 64) * 64} or more.")


def test_saved_checkpoint_loads_with_plain_transformers_and_through_model_path(tiny_checkpoint):
    torch.manual_seed(0)
    tokenizer = word_level_tokenizer(build_world(0).vocabulary())
    original = build_model(tiny_config(2), tokenizer).eval()  # same seed as the fixture: same weights
    ids = tokenizer(["Question: what is the pet of Dorfen ?\nAnswer: cat"], return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ours, our_tokenizer = load_model(tiny_checkpoint)
    with torch.no_grad():
        expected = original(ids).logits
        assert torch.equal(plain(ids).logits, expected)
        assert torch.equal(ours.eval()(ids).logits, expected)
    assert AutoTokenizer.from_pretrained(tiny_checkpoint)("A. cat").input_ids == our_tokenizer("A. cat").input_ids


def test_evaluate_a_checkpoint_from_model_path(tmp_path, tiny_checkpoint):
    result = run_llmexp("technique=evaluate", f"model.path={tiny_checkpoint}", "technique.limit=6",
                        "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = read_results(tmp_path / "run")
    assert list(record["stages"]) == ["evaluate"]  # evaluated once, not again as the pipeline's next stage
    metrics = record["stages"]["evaluate"]["metrics"]
    assert metrics["multiple_choice_n"] == 6 and metrics["perplexity"] > 1
    # The plan took the architecture from the checkpoint's config.json (2 layers), not the preset (8).
    assert record["plan"]["parameters"] == model_stats(AutoModelForCausalLM.from_pretrained(tiny_checkpoint))["parameters"]
