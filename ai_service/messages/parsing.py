"""Reading a request body: size, JSON and model checks, with one error line naming each bad field.

Also which outgoing message types end a job (:data:`TERMINAL_TYPES`).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ai_service.errors import InvalidInput
from ai_service.limits import Limits
from ai_service.messages.base import JOB_ID_RE, _Message

TERMINAL_TYPES = frozenset(
    {
        "training_completed",
        "training_failed",
        "training_cancelled",
        "conversion_completed",
        "conversion_failed",
        "conversion_cancelled",
        "inference_completed",
        "inference_failed",
    }
)


def is_terminal(message: _Message) -> bool:
    return getattr(message, "type", "") in TERMINAL_TYPES


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, without echoing the (possibly huge) input."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    text = "; ".join(parts)
    return text if len(text) <= 2000 else text[:1997] + "..."


def readable_job_id(payload: Any) -> str | None:
    """The request's job_id when it is present and valid, for answering a bad request."""
    if isinstance(payload, dict):
        job_id = payload.get("job_id")
        if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id):
            return job_id
    return None


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def parse_request(
    model: type[_ModelT], body: bytes, max_bytes: int, limits: Limits | None = None
) -> tuple[_ModelT, Any]:
    """Decode and validate a request body against ``limits`` (the defaults when None).

    Returns ``(request, payload)``. Raises :class:`InvalidRequest`, which carries the
    job_id when one could be read so the caller can answer the BE.
    """
    if len(body) > max_bytes:
        raise InvalidRequest(f"message body is {len(body)} bytes, over the {max_bytes}-byte limit", None)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's limit on
        # integer digits; RecursionError a too deeply nested document.
        raise InvalidRequest(f"message body is not valid JSON ({exc.__class__.__name__})", None) from None
    if not isinstance(payload, dict):
        raise InvalidRequest("message body must be a JSON object", None)
    job_id = readable_job_id(payload)
    try:
        request = model.model_validate(payload, context=(limits or Limits()).context())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc), job_id) from None
    return request, payload


class InvalidRequest(InvalidInput):
    """A request that failed parsing or validation; ``job_id`` set when readable."""

    def __init__(self, message: str, job_id: str | None) -> None:
        super().__init__(f"invalid request: {message}")
        self.job_id = job_id
