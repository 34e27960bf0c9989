"""``POST /v1/infer``: an inference request over HTTP, through the worker's own machinery.

The body is an ``InferenceRequest`` (the AMQP message), parsed and validated by
:func:`ai_service.messages.parse_request` exactly as the consumer does, so the
``invalid_request`` messages are the same.  The request then goes to the inference
service the worker set up (``resources.answerer()``): the same model cache and
the same batcher as AMQP requests, so HTTP and AMQP requests arriving together are
predicted together.  The handler runs on at most ``INFER_PREFETCH`` threads, like AMQP
deliveries; its terminal message is captured (:class:`CapturingOutbox`) instead of
published, and becomes the answer:

* 200 with the ``inference_completed`` body;
* the ``inference_failed`` body with 400 (``invalid_request``), 404 (``model_not_found``),
  413 (a body over ``MAX_MESSAGE_BYTES``), 503 (not ready: no inference service yet, or a
  temporary failure such as storage being away), 500 otherwise.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ai_service.config import Settings
from ai_service.errors import AIServiceError, InvalidInput, RetryableError
from ai_service.http.openapi import json_body
from ai_service.limits import Limits
from ai_service.messages import (
    InferenceCompleted,
    InferenceFailed,
    InferenceRequest,
    InvalidRequest,
    _Message,
    is_terminal,
    parse_request,
)
from ai_service.operation import Answerer, DeliveryInfo, JobContext, Resources

log = logging.getLogger("workers.infer")

#: HTTP status of an ``inference_failed`` by its ``error_code`` (anything else: 500).
STATUS_BY_CODE = {"invalid_request": 400, "model_not_found": 404}


class TooLarge(InvalidInput):
    """A request body over ``MAX_MESSAGE_BYTES``: 413."""


class NotReady(RetryableError):
    """The worker cannot run inference now: 503."""


class _Settled:
    """A receipt for a message that is not published: settled at once."""

    def __init__(self) -> None:
        self.message_id = str(uuid.uuid4())
        self.unroutable = False
        self.refused_reason: str | None = None
        self.replaced = False
        self.replacement_id: str | None = None

    def wait(self, timeout: float | None = None) -> bool:
        return True

    @property
    def confirmed(self) -> bool:
        return True


class CapturingOutbox:
    """The :class:`~ai_service.operation.Outbox` of an HTTP request: keeps the terminal
    message for the response instead of publishing it; updates and request copies go nowhere."""

    def __init__(self) -> None:
        self.terminal: _Message | None = None

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> Any:
        if kind == "result" and is_terminal(message):
            self.terminal = message
        return _Settled()

    def republish(self, kind: str, payload: dict[str, Any], message_type: str, message_id: str) -> Any:
        return _Settled()

    def lease(self, token: str, ttl_ms: int) -> Any:
        return _Settled()

    def resubmit(self) -> Any:
        return _Settled()

    def retry_later(self, delay_ms: int, *, deliveries: int = 0) -> Any:
        return _Settled()

    def dead_letter(self) -> Any:
        return _Settled()


def status_of(error: AIServiceError) -> int:
    if isinstance(error, TooLarge):
        return 413
    if isinstance(error, RetryableError):
        return 503
    return STATUS_BY_CODE.get(error.error_code, 500)


def failure(job_id: str | None, error: AIServiceError) -> JSONResponse:
    body = InferenceFailed(job_id=job_id or "", error_code=error.error_code, error_message=error.message)
    headers = {"Retry-After": "1"} if isinstance(error, RetryableError) else None
    return JSONResponse(body.to_json_dict(), status_code=status_of(error), headers=headers)


class InferEndpoint:
    """What ``POST /v1/infer`` needs: the settings, the worker's resources, a thread bound."""

    def __init__(self, settings: Settings, resources: Resources | None) -> None:
        self.settings = settings
        self.resources = resources
        self.limits = Limits.from_settings(settings)
        self.slots = max(1, settings.infer_prefetch)
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Created on the server's event loop (first request), bounded like INFER_PREFETCH.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.slots)
        return self._limiter

    async def read_body(self, request: Request) -> bytes:
        cap = self.settings.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise TooLarge(f"invalid request: message body is {int(declared)} bytes, over the {cap}-byte limit "
                           "(MAX_MESSAGE_BYTES)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise TooLarge(f"invalid request: message body is over the {cap}-byte limit (MAX_MESSAGE_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)

    def run(self, raw: bytes) -> tuple[int, bytes]:
        """Parse, validate and run one request (on a pool thread); returns (status, JSON body).

        The body is the message's bytes, serialised once by pydantic-core (an answer's
        detections are never built as dicts first)."""
        job_id: str | None = None
        try:
            try:
                request, _ = parse_request(InferenceRequest, raw, self.settings.max_message_bytes, self.limits)
            except InvalidRequest as exc:
                job_id = exc.job_id
                raise
            job_id = str(request.job_id)
            resources, service = self.service()
            outbox = CapturingOutbox()
            ctx = JobContext(op="infer", job_id=job_id, settings=self.settings, resources=resources,
                             delivery=DeliveryInfo(redelivered=False, delivery_count=0, reply_to=None,
                                                   correlation_id=None, headers={}, body=raw),
                             outbox=outbox, ack_now_cb=lambda: None)
            ctx.log.info("Received infer request over HTTP")
            service.handle(request, ctx)
            if isinstance(outbox.terminal, InferenceCompleted):
                return 200, outbox.terminal.to_json_bytes()
            if isinstance(outbox.terminal, InferenceFailed):
                code = outbox.terminal.error_code
                return STATUS_BY_CODE.get(code, 500), outbox.terminal.to_json_bytes()
            raise AIServiceError("internal error in the worker: the request ended without an answer")
        except AIServiceError as exc:
            return status_of(exc), InferenceFailed(
                job_id=job_id or "", error_code=exc.error_code, error_message=exc.message).to_json_bytes()
        except Exception:  # a bug answers 500, never kills the server
            log.exception("[Handler] [%s] HTTP inference failed", job_id or "?")
            return 500, InferenceFailed(job_id=job_id or "", error_code="internal_error",
                                        error_message="internal error in the worker").to_json_bytes()

    def service(self) -> tuple[Resources, Answerer]:
        """The worker's resources and the inference service its setup built; NotReady before."""
        service = self.resources.answerer() if self.resources is not None else None
        if self.resources is None or service is None:
            raise NotReady("the inference worker is not ready (still starting)")
        return self.resources, service


def infer_router(settings: Settings, resources: Resources | None) -> APIRouter:
    """The ``/v1/infer`` route (``resources`` may be None: the route answers 503; docs only)."""
    endpoint = InferEndpoint(settings, resources)
    router = APIRouter(tags=["inference"])
    errors = {code: {"model": InferenceFailed, "description": why} for code, why in (
        (400, "Invalid request (`invalid_request`): the message names every bad field"),
        (401, "Missing or wrong bearer token (HTTP_TOKEN set)"),
        (404, "The model does not exist (`model_not_found`)"),
        (413, "The body is over MAX_MESSAGE_BYTES"),
        (500, "Inference failed (`inference_error`, `out_of_memory`, `timeout`, `internal_error`, ...)"),
        (503, "Not ready (still starting) or a temporary failure (`storage_error`); retry"),
    )}
    errors[401] = {"description": errors[401]["description"]}

    @router.post("/infer", response_model=InferenceCompleted, responses=errors,  # type: ignore[arg-type]
                 summary="Run an inference request (the infer_request_q message)",
                 description="Shares the worker's model cache and batcher with AMQP requests.",
                 openapi_extra=json_body(InferenceRequest))
    async def infer(request: Request) -> Response:
        try:
            raw = await endpoint.read_body(request)
        except TooLarge as exc:
            return failure(None, exc)
        status, body = await anyio.to_thread.run_sync(endpoint.run, raw, limiter=endpoint.limiter)
        return Response(body, status_code=status, media_type="application/json",
                        headers={"Retry-After": "1"} if status == 503 else None)

    return router
