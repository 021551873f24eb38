"""Rails on the HTTP API (``llmexp serve --rails``): the request's input checked before generation, the answer
after, and what they found in the response.

A blocked request is answered as NeMo Guardrails' server answers it: HTTP 200 with the refusal as the
completion, here with ``finish_reason: "content_filter"`` (OpenAI's value for filtered content) and no
tokens generated. Every guarded response carries ``rails: {input: ..., output: ...}``, each side's
``Verdict.report()``: ``blocked``, the ``rail`` that fired, its ``reason``, the entities ``masked``, the
``seconds`` each flow took and the model's ``answers`` to the self checks. The self checks ask the model (or
adapter) the request names, through the same engine and batch as every request, greedily.

The input checked is a completion's prompt (as text) or a chat's last user message; a masking input rail
hands the masked text to the model. Output rails read the whole answer, so a guarded request cannot stream.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from llmexp.rails import REFUSAL, Ask, Rails, Verdict
from llmexp.serving.api_errors import ApiError, generation_error, not_admitted
from llmexp.serving.engine import Engine
from llmexp.serving.generation import GenerationChunk, GenerationFailed, GenerationRequest, QueueFull, UnknownModel
from llmexp.serving.limits import InvalidRequest
from llmexp.serving.request_bodies import SamplingFields


def served_model_asker(engine: Engine, model: str) -> Ask:
    """Ask ``model`` on ``engine`` a self check's prompt, greedily; what keeps it from answering is the request's
    error, as it would be for the request itself (an unknown model, a full queue, a prompt the context cannot hold)."""

    async def ask(prompt: str, max_tokens: int) -> str:
        try:
            stream = engine.submit(GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0.0))
            return (await stream.aread_all()).text
        except (UnknownModel, QueueFull) as error:
            raise not_admitted(error) from None
        except InvalidRequest as error:
            raise ApiError(400, f"the rails self check's prompt, which holds the message: {error}",
                           param=error.param) from None
        except GenerationFailed as error:
            raise generation_error(error) from None

    return ask


@dataclasses.dataclass
class Guarded:
    """One request under rails: its input's verdict, and what checks its answer."""

    rails: Rails
    ask: Ask
    user_input: str
    input: Verdict

    async def check_output(self, result: GenerationChunk) -> Tuple[GenerationChunk, Dict[str, Any]]:
        """The answer as the client gets it (masked, or the refusal) and the response's ``rails`` field."""
        output = await self.rails.check_output(result.text, self.user_input, self.ask)
        text, finish = (REFUSAL, "content_filter") if output.blocked else (output.text, result.finish_reason)
        return (dataclasses.replace(result, text=text, finish_reason=finish),
                {"rails": {"input": self.input.report(), "output": output.report()}})

    def refusal(self, body: SamplingFields, id_prefix: str, kind: str,
                choice: Callable[[GenerationChunk, bool, bool], Dict[str, Any]]) -> Dict[str, Any]:
        """The response to a request its input rails blocked: the refusal, nothing generated."""
        return {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": body.model, "choices": [choice(GenerationChunk(REFUSAL, (), "content_filter"), False, False)],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "rails": {"input": self.input.report(), "output": None}}


async def guard_input(rails: Optional[Rails], engine: Engine, body: SamplingFields,
                      user_input: Optional[str]) -> Optional[Guarded]:
    """The input rails' verdict on ``user_input`` (None without rails); a request rails cannot check is a 400."""
    if rails is None:
        return None
    if body.stream:
        raise ApiError(400, "stream=true: this server checks whole answers with output rails before sending them, "
                       "so it does not stream; send stream: false.", param="stream")
    if user_input is None:
        raise ApiError(400, "the prompt is token ids: this server's rails check text; send the prompt as text.",
                       param="prompt")
    ask = served_model_asker(engine, body.model)
    return Guarded(rails, ask, user_input, await rails.check_input(user_input, ask))


async def guard_chat(rails: Optional[Rails], engine: Engine, body: SamplingFields,
                     messages: List[Dict[str, Any]]) -> Optional[Guarded]:
    """``guard_input`` on a chat's last user message, which a masking input rail rewrites in ``messages``."""
    users = [message for message in messages if message["role"] == "user"] or messages[-1:]
    guarded = await guard_input(rails, engine, body, users[-1]["content"] if users else "")
    if guarded is not None and users:
        users[-1]["content"] = guarded.input.text
    return guarded
