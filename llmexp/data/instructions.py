"""Instruction data for SFT and LoRA: prompt/response pairs, tokenized so loss falls on the response only.

Files are JSON Lines in any of the common layouts (``FORMATS``). A prompt stays plain text
until ``format_prompt`` wraps it in the tokenizer's chat template; evaluation builds its
prompts the same way, so a model is asked exactly as it was trained. torch is imported when a
batch is padded: the plan checks read the data without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Sequence, Tuple

from llmexp.data.embedded import build_world
from llmexp.data.jsonl import PathLike, read_jsonl_numbered
from llmexp.data.knowledge import knowledge_examples
from llmexp.data.records import Example
from llmexp.data.splits import read_train_and_validation, split_validation
from llmexp.data.text2sql import text2sql_examples
from llmexp.data.word_problems import word_problem_examples
from llmexp.errors import UserError

IGNORE_INDEX = -100  # label of a token the loss skips (PyTorch's cross_entropy default)


@dataclass(frozen=True)
class RecordFormat:
    """One JSONL layout: the prompt is ``prompt_fields`` joined by newlines, the target ``response_field``."""

    name: str
    prompt_fields: Tuple[str, ...]
    response_field: str
    optional: Tuple[str, ...] = ()

    def matches(self, record: Dict) -> bool:
        required = (set(self.prompt_fields) - set(self.optional)) | {self.response_field}
        return required <= record.keys()


# Tried in order, the first match wins; other fields on a line are ignored.
FORMATS: Sequence[RecordFormat] = (
    RecordFormat("instruction+(input)+output", ("instruction", "input"), "output", optional=("input",)),
    RecordFormat("prompt+completion", ("prompt",), "completion"),
    RecordFormat("input+output", ("input",), "output"),
)


def read_instruction_file(path: PathLike) -> List[Example]:
    """The examples in a JSONL file, in file order; a bad line raises ``UserError`` naming ``file:line``."""
    examples = []
    for line, record in read_jsonl_numbered(path):
        layout = next((f for f in FORMATS if f.matches(record)), None)
        if layout is None:
            expected = ", ".join(f.name for f in FORMATS)
            raise UserError(f"{path}:{line}: has fields {sorted(record)}; expected one of: {expected}.")
        parts = [record.get(field, "") for field in layout.prompt_fields]
        response = record[layout.response_field]
        for field, value in [*zip(layout.prompt_fields, parts), (layout.response_field, response)]:
            if not isinstance(value, str):
                raise UserError(f"{path}:{line}: the {field!r} field is not text. Give it as a JSON string.")
        prompt = "\n".join(part for part in parts if part.strip())
        for field, value in (("/".join(layout.prompt_fields), prompt), (layout.response_field, response)):
            if not value.strip():
                raise UserError(f"{path}:{line}: the {field!r} text is empty. Fill it in or delete the line.")
        examples.append(Example(prompt, response))
    return examples


def instruction_data(data_cfg) -> Tuple[List[Example], List[Example]]:
    """(train, validation) examples for the ``data`` option of an SFT or LoRA run."""
    if data_cfg.name == "embedded":
        return split_validation(text2sql_examples(build_world(data_cfg.seed, data_cfg.num_people)), data_cfg)
    if data_cfg.name == "jsonl":
        if not data_cfg.path:
            raise UserError(
                "data=jsonl needs data.path=<train.jsonl>: a JSONL file of prompt+completion, input+output "
                "or instruction+(input)+output records (data.validation_path=<valid.jsonl> optional)."
            )
        return read_train_and_validation(data_cfg, read_instruction_file)
    if data_cfg.name == "word_problems":
        return word_problem_examples(data_cfg)
    if data_cfg.name == "knowledge":
        return knowledge_examples(data_cfg)
    if data_cfg.name == "preference":  # the preferred responses: SFT on the chosen side, before DPO or RL
        # imported when used: llmexp.data.preference encodes its pairs with this module's encode_example
        from llmexp.data.preference import preference_data

        train, validation = preference_data(data_cfg)
        return [Example(p.prompt, p.chosen) for p in train], [Example(p.prompt, p.chosen) for p in validation]
    raise UserError(
        f"data={data_cfg.name} holds no instruction data. For SFT and LoRA use data=embedded "
        "(the built-in Text2SQL set), data=word_problems (worked arithmetic answers), data=preference (the "
        "chosen responses), data=knowledge (reading from a context, or the second world's facts) or data=jsonl "
        "data.path=<train.jsonl>."
    )


def format_prompt(prompt_text: str, tokenizer) -> str:
    """The text a model sees before its answer: the chat template's user turn, or the prompt and a newline."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt_text}], tokenize=False, add_generation_prompt=True
        )
    return prompt_text + "\n"


def prompt_ids(prompt_text: str, tokenizer) -> List[int]:
    """The token ids of ``format_prompt``; a chat template writes its own BOS, so none is added twice."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(format_prompt(prompt_text, tokenizer), add_special_tokens=not has_template)["input_ids"]


def encode_example(example: Example, tokenizer, max_len: int) -> Tuple[List[int], List[int]]:
    """``(input_ids, labels)`` of prompt + response + EOS, with the prompt masked out of the loss.

    Longer than ``max_len``, the prompt loses tokens from its start (a leading BOS stays) so
    the answer survives; a response that alone is too long loses its end.
    """
    prompt = prompt_ids(example.prompt, tokenizer)
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_len:
        bos = prompt[:1] if prompt[:1] == [tokenizer.bos_token_id] else []
        response = response[: max_len - len(bos)]
        body = prompt[len(bos):]
        prompt = bos + body[len(body) - (max_len - len(bos) - len(response)):]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def pad_batch(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int, length: int) -> Dict[str, Any]:
    """``(input_ids, labels)`` rows right-padded to ``length`` as LongTensors, with their attention mask."""
    import torch

    def padded(values: List[int], fill: int) -> List[int]:
        return values + [fill] * (length - len(values))

    return {
        "input_ids": torch.tensor([padded(ids, pad_id) for ids, _ in rows], dtype=torch.long),
        "labels": torch.tensor([padded(labels, IGNORE_INDEX) for _, labels in rows], dtype=torch.long),
        "attention_mask": torch.tensor([padded([1] * len(ids), 0) for ids, _ in rows], dtype=torch.long),
    }


def pad_collate(pad_id: int) -> Callable[[Sequence[Tuple[List[int], List[int]]]], Dict[str, Any]]:
    """A DataLoader ``collate_fn`` padding each batch to its longest row; picklable for worker processes."""
    return partial(_pad_to_longest, pad_id=pad_id)


def _pad_to_longest(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, Any]:
    return pad_batch(rows, pad_id, max(len(ids) for ids, _ in rows))
