"""A fake fourth operation, ``echo``, defined only by its spec (tests/test_registry.py).

Its queues are named after the test's private events exchange, so that every test's
echo queues are its own; the spec's ``worker_module`` is this module.  It is a recorded
operation (``POST /v1/echo`` and the job routes) that writes no record.
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import Field

from ai_service import forms
from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import JobRequest, _Message, utc_now
from ai_service.operation import JobContext, Operation
from ai_service.registry import MessageDoc, OperationSpec, Supervision


class EchoRequest(JobRequest):
    text: str


class EchoCompleted(_Message):
    type: Literal["echo_completed"] = "echo_completed"
    job_id: str
    status: Literal["completed"] = "completed"
    text: str
    timestamp: str = Field(default_factory=utc_now)


class EchoFailed(_Message):
    type: Literal["echo_failed"] = "echo_failed"
    job_id: str
    status: Literal["failed"] = "failed"
    error_code: str
    error_message: str
    timestamp: str = Field(default_factory=utc_now)


def _arguments(g: forms.Group) -> None:
    g.add_argument("--text", help="what to echo")


def _payload(args: argparse.Namespace, job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "text": args.text or ""}


ECHO = OperationSpec(
    name="echo",
    word="echo",
    worker_module="tests.support.echo_operation",
    queue_settings=lambda s: (f"{s.events_exchange}.echo_request_q", None, f"{s.events_exchange}.echo_result_q"),
    request=MessageDoc("echoRequest", EchoRequest, "Say it back.", {"job_id": "echo1", "text": "hello"}),
    updates=(),
    results=(
        MessageDoc("echoCompleted", EchoCompleted, "Said back.",
                   {"job_id": "echo1", "text": "hello", "timestamp": "2024-01-15T10:30:45.123456+00:00"}),
        MessageDoc("echoFailed", EchoFailed, "Could not say it back.",
                   {"job_id": "echo1", "error_code": "internal_error", "error_message": "no",
                    "timestamp": "2024-01-15T10:30:45.123456+00:00"}),
    ),
    submit=forms.SubmitForm(help="an echo", description="Echo --text.", group="echo request",
                            add_arguments=_arguments, flags=("text",), build=_payload),
    supervision=Supervision(9400, 8400, 10, "nothing to finish"),
    recorded=True,  # so it has the HTTP job routes; it keeps no record (the routes follow its messages)
)


def handle(request: EchoRequest, ctx: JobContext) -> None:
    ctx.result(EchoCompleted(job_id=request.job_id, text=request.text))


def failure(job_id: str, error: AIServiceError) -> EchoFailed:
    return EchoFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def operation(settings: Settings) -> Operation:
    """What ``ai-service worker echo`` loads (the spec's ``worker_module``)."""
    return Operation(name="echo", request_model=EchoRequest, handler=handle, failure=failure)
