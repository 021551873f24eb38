"""Errors in OpenAI's body (``{"error": {"message", "type", "param", "code"}}``), and the 400 of a body pydantic refused.

Every refusal names the field, the value sent and what to give instead, in the words of
``llmexp.serving.limits.FIELD_RULES``; a failed generation is a 422 when it is the request's
alone, a 500 when the whole batch failed.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from llmexp.serving.generation import GenerationFailed, QueueFull, RequestFailed, UnknownModel
from llmexp.serving.limits import FIELD_RULES, InvalidRequest, shown


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.headers = status, message, error_type, param, headers


def refused(error: InvalidRequest) -> ApiError:
    return ApiError(400, str(error), param=error.param)


RETRY_AFTER_SECONDS = 1


def not_admitted(error: Exception) -> ApiError:
    """The answer to a request the engine does not take in: a model it does not serve (404), or a full queue (429,
    with when to retry)."""
    if isinstance(error, UnknownModel):
        return ApiError(404, str(error), param="model", error_type="not_found_error")
    assert isinstance(error, QueueFull)
    return ApiError(429, f"the server is busy: {error}", error_type="rate_limit_error",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def generation_error(error: GenerationFailed) -> ApiError:
    if isinstance(error, RequestFailed):
        return ApiError(422, str(error))
    return ApiError(500, str(error), error_type="server_error")


def error_body(error: ApiError) -> Dict[str, Any]:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.status}}


def error_json(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def invalid_body(error: RequestValidationError, content_type: str) -> ApiError:
    """The 400 for a body pydantic refused: each wrong field with the value sent and what to give instead."""
    problems = error.errors()
    if problems and problems[0].get("type") == "json_invalid":
        reason = (problems[0].get("ctx") or {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON ({reason}); send one JSON object.")
    body = error.body
    if isinstance(body, bytes):  # FastAPI parses JSON only when the Content-Type says so
        return ApiError(400, f"the body was sent as Content-Type {shown(content_type)}, not as JSON; send one JSON "
                             "object with Content-Type: application/json.")
    if not isinstance(body, dict):
        return ApiError(400, f"the body is {shown(body)}; send one JSON object, e.g. "
                             '{"model": "...", "prompt": "..."}.')
    by_field: Dict[str, List[Dict[str, Any]]] = {}
    for problem in problems:
        location = [part for part in problem.get("loc", ()) if part != "body"]
        by_field.setdefault(str(location[0]) if location else "body", []).append(problem)
    sentences = [field_problem(field, field_problems, body) for field, field_problems in by_field.items()]
    return ApiError(400, " ".join(sentences), param=next(iter(by_field)))


def field_problem(field: str, problems: List[Dict[str, Any]], body: Dict[str, Any]) -> str:
    """One sentence for one top-level field, placed where its problems meet (``messages[0].content``). Several
    problems at one place are the alternatives of a union, where the field's rule says more than each miss."""
    rule = FIELD_RULES.get(field, "a value of the documented type")
    locations = [[part for part in problem["loc"] if part != "body"] for problem in problems]
    common = [parts[0] for parts in itertools.takewhile(lambda parts: len(set(parts)) == 1, zip(*locations))]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in common).lstrip(".")
    value: Any = body
    for part in common:
        if not (isinstance(value, dict) and part in value
                or isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)):
            return f"{where} is required: give {rule}."
        value = value[part]
    if len(problems) > 1:
        return f"{where}={shown(value)} is none of the accepted forms: give {rule}."
    return f"{where}={shown(value)}: {problems[0].get('msg', 'invalid')}; give {rule}."
