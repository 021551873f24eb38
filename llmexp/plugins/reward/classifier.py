"""The reward model itself: a one-output sequence classifier on the starting causal LM, full or with LoRA.

transformers' ``<Arch>ForSequenceClassification`` is the backbone of ``<Arch>ForCausalLM`` with a
``score`` head (hidden -> 1) in place of the LM head, reading the hidden state of each row's
last token that is not ``config.pad_token_id``. The backbone's weights are copied from the
starting model and the head starts from the model's initializer (seeded by the caller), as
``AutoModelForSequenceClassification.from_pretrained(<causal LM dir>, num_labels=1)`` would make it.
"""

from __future__ import annotations

import copy
from llmexp.sdk import UserError


def with_pad_token(tokenizer):
    """``tokenizer``, or a copy whose pad token is EOS when it has none (TRL's choice): a batch must be padded, and
    the classifier finds each row's end by its pad token. The caller's tokenizer is left as it was."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token
    return padded


def sequence_classifier(causal_lm, tokenizer, key: str):
    """A new one-label classifier with ``causal_lm``'s backbone weights and dtype, padding with ``tokenizer``'s pad."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    try:
        classifier = AutoModelForSequenceClassification.from_config(config)
    except ValueError as error:  # transformers has no sequence-classification class for this architecture
        raise UserError(
            f"{key} (technique=reward_model): a {config.model_type} model has no sequence-classification form in "
            f"transformers ({error}); start from a model whose architecture has one (Llama, Qwen2, Mistral, ...)."
        ) from None
    classifier.base_model.load_state_dict(causal_lm.base_model.state_dict())
    classifier.config.architectures = [type(classifier).__name__]
    return classifier.to(causal_lm.dtype)


def add_lora(classifier, node):
    """``classifier`` with LoRA adapters (PEFT, task SEQ_CLS: the score head trained in full beside them)."""
    from peft import LoraConfig, get_peft_model

    targets = list(node.target_modules)
    config = LoraConfig(
        r=node.lora_rank, lora_alpha=node.lora_alpha, lora_dropout=node.lora_dropout, task_type="SEQ_CLS",
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )
    return get_peft_model(classifier, config)


def plain_classifier(model):
    """The plain transformers classifier of a trained ``model``: a PEFT one with its adapters merged in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
