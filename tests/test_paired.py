"""Paired measures of a model against its baseline: deltas, flips, paired errors and token KL."""

import copy
import math

import pytest
import torch

from llmexp.configuration.compose import compose_config
from llmexp.planning.planner import make_plan
from llmexp.plugins.evaluate.harness.paired import paired_measures
from llmexp.plugins.evaluate.harness.scoring import document_nll, forward_throughput, next_token_kl


def _rows(flags, answers):
    return [{"correct": flag, "predicted": answer} for flag, answer in zip(flags, answers)]


def test_deltas_flips_and_the_paired_standard_error():
    baseline = {"multiple_choice": _rows([1, 1, 0, 1], ["a", "b", "c", "d"]), "perplexity": [{"nll": 1.0}]}
    variant = {"multiple_choice": _rows([1, 0, 1, 1], ["a", "x", "y", "d"]), "perplexity": [{"nll": 1.1}]}
    paired = paired_measures(
        {"mc_cloze_acc": 0.75, "perplexity": 2.2, "multiple_choice_n": 4},
        variant,
        {"mc_cloze_acc": 0.75, "perplexity": 2.0, "multiple_choice_n": 4},
        baseline,
        {"multiple_choice": "mc_cloze_acc"},
    )
    assert paired["mc_cloze_acc_delta"] == 0.0
    assert paired["perplexity_rel_delta"] == pytest.approx(0.1)
    assert paired["flip_rate_multiple_choice"] == 0.5  # two answers changed, one right one wrong
    # per-item differences 0, -1, +1, 0: sample variance 2/3, standard error sqrt(2/3 / 4)
    assert paired["mc_cloze_acc_delta_se"] == pytest.approx(math.sqrt(2 / 3 / 4))
    assert "multiple_choice_n_delta" not in paired and "flip_rate_perplexity" not in paired
    # one item gained, one lost: McNemar's discordant pair is a coin toss
    assert (paired["mc_cloze_acc_gained"], paired["mc_cloze_acc_lost"], paired["mc_cloze_acc_mcnemar_p"]) == (1, 1, 1.0)


@pytest.mark.parametrize("gained, lost", [(0, 0), (1, 0), (10, 2), (2, 10), (30, 14), (25, 25), (0, 9)])
def test_mcnemar_is_the_exact_two_sided_binomial_test_of_the_discordant_items(gained, lost):
    from scipy.stats import binomtest

    from llmexp.results.statistics import mcnemar_p

    expected = 1.0 if gained + lost == 0 else binomtest(gained, gained + lost, 0.5).pvalue
    assert mcnemar_p(gained, lost) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_p(10, 2) < 0.05 < mcnemar_p(8, 3)  # 10 vs 2 is significant, 8 vs 3 is not


def test_a_zero_baseline_has_no_relative_delta():
    paired = paired_measures({"em": 0.5}, {}, {"em": 0.0}, {}, {})
    assert paired == {"em_delta": 0.5}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from llmexp.models.loading import load_model

    return load_model(tiny_checkpoint)


DOCUMENTS = ["alice lives in town .", "bob likes the red pet .", "the pet of carol is a cat ."]


def test_token_kl_is_zero_for_the_same_model_and_matches_a_direct_computation(tiny):
    model, tokenizer = tiny
    total, count = next_token_kl(model, copy.deepcopy(model), tokenizer, DOCUMENTS)
    assert count == sum(len(tokenizer(doc).input_ids) for doc in DOCUMENTS)  # EOS appended, first token not predicted
    assert abs(total) < 1e-5
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    total, count = next_token_kl(other, model, tokenizer, DOCUMENTS[:1])
    ids = tokenizer(DOCUMENTS[0]).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        p = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
        q = other(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    assert total == pytest.approx((p.exp() * (p - q)).sum().item(), rel=1e-4) and total > 0
    assert count == len(ids) - 1


def test_throughput_counts_the_tokens_scored(tiny):
    model, tokenizer = tiny
    assert forward_throughput(model, tokenizer, DOCUMENTS, min_seconds=0.05) > 0
    assert len(document_nll(model, tokenizer, DOCUMENTS)) == 3


def test_a_baseline_must_be_an_earlier_evaluation():
    cfg = compose_config(["pipeline=customize", "pipeline.nodes.lora_eval.baseline=sft_eval"])
    assert any("pipeline.nodes.lora_eval.baseline=sft_eval must name an evaluate stage that runs before" in p
               for p in make_plan(cfg).problems)
    fine = compose_config(["pipeline=customize", "pipeline.nodes.lora_eval.baseline=zero_shot"])
    assert not make_plan(fine).problems
