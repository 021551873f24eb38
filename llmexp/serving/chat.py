"""Chat messages to prompt tokens, the way the framework's fine-tuned models were trained.

A tokenizer with a chat template formats the conversation itself (with the generation prompt
for the assistant's turn). Without one (the embedded word-level tokenizer), a conversation is
the SFT format of ``llmexp.data.instructions``: each user turn is ``format_prompt``-ed (its text
and a newline; system messages go first in the next user turn's text, one per line, as an
instruction precedes its input), each earlier assistant turn is its text followed by EOS, and
the whole starts with the tokenizer's special tokens (BOS). A lone user message thus becomes
exactly ``llmexp.data.instructions.prompt_ids(text)``, what SFT and LoRA trained on.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from llmexp.data.instructions import format_prompt
from llmexp.serving.limits import InvalidRequest, check_text, shown

ROLES = ("system", "user", "assistant")


def chat_prompt_ids(messages: Sequence[Dict[str, str]], tokenizer) -> List[int]:
    """The token ids the model sees before its answer to ``messages`` ([{"role", "content"}], content as text);
    messages that cannot form a prompt are an ``InvalidRequest`` (HTTP 400)."""
    if not messages:
        raise InvalidRequest("messages is empty; give at least one {\"role\": \"user\", \"content\": ...} message.",
                             param="messages")
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise InvalidRequest(f"messages[{i}].role={shown(message['role'])}: give one of {', '.join(ROLES)}.",
                                 param="messages")
        check_text(message["content"], f"messages[{i}].content")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if messages[-1]["role"] != "user":
        raise InvalidRequest(
            f"the last message has role {messages[-1]['role']!r}; this model has no chat template, so a conversation "
            "must end with a user message (the model answers it).", param="messages"
        )
    ids: List[int] = []
    pending_system: List[str] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending_system.append(content)
            continue
        if role == "user":
            text = format_prompt("\n".join([*pending_system, content]), tokenizer)
            pending_system = []
        else:
            text = content
        ids += tokenizer(text, add_special_tokens=not ids)["input_ids"]
        if role == "assistant" and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids
