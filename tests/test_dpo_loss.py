"""The DPO objective against its closed form on hand-computed log-probabilities."""

import math

import pytest
import torch

from llmexp.plugins.customize.losses import DPOLoss, dpo_loss, sequence_logprobs


def test_dpo_loss_matches_the_closed_form():
    # log pi(chosen)=-1, log pi(rejected)=-3, log ref(chosen)=-2, log ref(rejected)=-2, beta 0.1:
    # rewards 0.1*(-1+2)=0.1 and 0.1*(-3+2)=-0.1; loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1
    )
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-7)
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-7)


def test_dpo_loss_is_the_mean_over_pairs_and_log2_when_policy_equals_reference():
    same = torch.tensor([-4.0, -7.0])
    loss, _, _ = dpo_loss(same, same - 1, same, same - 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2))
    loss, _, _ = dpo_loss(torch.tensor([0.0, 0.0]), torch.tensor([-2.0, 2.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_sequence_logprobs_sums_the_labelled_tokens_only():
    # vocabulary of 3; logits at positions 0 and 1 predict tokens 1 and 2; position 0's label is masked
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, -100, 0, 2]])  # tokens 2 and 3 are labelled: predicted from positions 1, 2
    expected = (2.0 - math.log(math.exp(2) + 2)) + (1.0 - math.log(3 * math.e))
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_object_on_a_model_equals_the_formula(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    chosen = torch.tensor([[1, 20, 21, 22, 23, 2]])
    rejected = torch.tensor([[1, 20, 21, 30, 31, 2]])
    labels_of = lambda ids: torch.where(torch.arange(ids.shape[1]) < 3, torch.tensor(-100), ids)  # noqa: E731
    batch = {
        "chosen_input_ids": chosen, "chosen_labels": labels_of(chosen), "chosen_attention_mask": torch.ones_like(chosen),
        "rejected_input_ids": rejected, "rejected_labels": labels_of(rejected),
        "rejected_attention_mask": torch.ones_like(rejected),
    }
    output = DPOLoss(reference, beta=0.2)(policy, batch)

    def logp(model, ids):
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        return sum(log_probs[t - 1, ids[0, t]].item() for t in range(3, ids.shape[1]))

    with torch.no_grad():
        margin = 0.2 * ((logp(policy, chosen) - logp(reference, chosen)) - (logp(policy, rejected) - logp(reference, rejected)))
    assert output.loss.item() == pytest.approx(math.log(1 + math.exp(-margin)), abs=1e-5)
    assert output.tokens == 12
    assert float(output.logs["reward_accuracy"]) == float(margin > 0)
