"""How a reward model scores a response: the one tokenization its training, its diagnostics and its users share.

A (prompt, response) pair is the token ids of ``llmexp.data.instructions.encode_example``: the
prompt as the model is asked (``format_prompt``: the tokenizer's chat template, else the prompt
text and a newline, with the tokenizer's special tokens such as BOS), the response's tokens
without special tokens, then EOS; a sequence longer than ``data.seq_len`` loses the prompt's
start first. Rows are right-padded with the tokenizer's pad token, which the saved config names
as ``pad_token_id``, so the classifier reads its score at each row's last real token (the EOS).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from llmexp.data.instructions import encode_example
from llmexp.data.records import Example, PreferencePair
from llmexp.sdk import evaluating


def reward_input_ids(prompt: str, response: str, tokenizer, max_len: int) -> List[int]:
    """The token ids a reward model reads for ``response`` to the plain-text ``prompt``.

    Step by step, for a user of a saved reward model (its directory's tokenizer; ``max_len`` is
    its ``tokenizer.model_max_length``, the stage's ``data.seq_len``):

    1. the prompt text: ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
       tokenize=False, add_generation_prompt=True)`` if the tokenizer has a chat template, else
       ``prompt + "\n"``;
    2. its ids: ``tokenizer(text, add_special_tokens=<no chat template>)["input_ids"]`` (BOS first);
    3. the response's ids: ``tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_token_id]``;
    4. longer than ``max_len`` in all: the response keeps its first ``max_len`` tokens (after a
       leading BOS), and the prompt loses tokens from its start, keeping its BOS;
    5. prompt ids + response ids.

    The reward is ``model(input_ids, attention_mask).logits[:, 0]`` of rows right-padded with
    ``tokenizer.pad_token_id`` (``reward_scores``).
    """
    return encode_example(Example(prompt, response), tokenizer, max_len)[0]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int):
    """``input_ids`` and ``attention_mask`` of ``rows`` right-padded to the longest, as LongTensors."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(row, dtype=torch.long) for row in rows]
    return (pad_sequence(ids, batch_first=True, padding_value=pad_id),
            pad_sequence([torch.ones_like(row) for row in ids], batch_first=True, padding_value=0))


def reward_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int,
                  batch_size: int = 32) -> List[float]:
    """The reward of each (prompt, response) under ``model`` (an ``AutoModelForSequenceClassification`` with one
    label), in batches of ``batch_size``, without grad; the model's training flag is kept."""
    import torch

    rows = [reward_input_ids(p, r, tokenizer, max_len) for p, r in zip(prompts, responses, strict=True)]
    device = next(model.parameters()).device
    scores: List[float] = []
    with evaluating(model):
        for begin in range(0, len(rows), batch_size):
            input_ids, mask = pad_right(rows[begin:begin + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            scores.extend(logits[:, 0].float().tolist())
    return scores


def encode_pair(pair: PreferencePair, margin: float, tokenizer, max_len: int) -> Dict[str, Any]:
    """A training example: both sides' ``reward_input_ids`` and the margin the chosen reward must clear."""
    return {"chosen_ids": reward_input_ids(pair.prompt, pair.chosen, tokenizer, max_len),
            "rejected_ids": reward_input_ids(pair.prompt, pair.rejected, tokenizer, max_len),
            "margin": margin}


class PairCollate:
    """A DataLoader ``collate_fn`` (picklable): the chosen rows, then the rejected ones, right-padded to one length
    (the layout of TRL's ``DataCollatorForPreference``), and the margins."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        import torch

        rows = [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs]
        input_ids, mask = pad_right(rows, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask,
                "margin": torch.tensor([pair["margin"] for pair in pairs], dtype=torch.float)}
