"""The worker's ASGI application: health, metrics, OpenAPI and the ``/v1`` routers.

``create_app`` is the one factory; operations add their routes as ``APIRouter``s, each
mounted under ``/v1`` behind :func:`ai_service.http.auth.require_token`.  On a
non-loopback ``HTTP_HOST`` without ``HTTP_TOKEN`` no router is mounted (health and
metrics only), and the start says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import PlainTextResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ai_service.config import Settings
from ai_service.http import openapi
from ai_service.http.auth import require_token
from ai_service.metrics import Metrics
from ai_service.registry import OPERATIONS, Registry

log = logging.getLogger("ai_service.http")

#: The API document's version (bump with the API, not with the package).
API_VERSION = "1.0.0"
TITLE = "ai-service worker HTTP API"
DESCRIPTION = (
    "The HTTP side of the ai-service message contract (CONTRACT.md, \"HTTP\"). Bodies are the JSON of the "
    "AMQP messages, validated by the same models. `/v1/*` needs `Authorization: Bearer <HTTP_TOKEN>` when "
    "HTTP_TOKEN is set; health and metrics never do."
)


def create_app(
    settings: Settings,
    *,
    metrics: Metrics,
    ready: Callable[[], tuple[bool, str]],
    routers: Sequence[APIRouter] = (),
    refresh: Callable[[], None] | None = None,
) -> FastAPI:
    """The application of one worker process (``routers`` go under ``/v1``)."""
    app = FastAPI(title=TITLE, version=API_VERSION, description=DESCRIPTION, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.http_token = settings.http_token
    app.state.api_ports = None  # every listener serves /v1 (HttpServer narrows it when it has a metrics-only one)
    refresh_fn = refresh or (lambda: None)

    @app.get("/healthz", response_class=PlainTextResponse, tags=["health"],
             summary="The process is alive", responses={200: {"content": {"text/plain": {}}}})
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", response_class=PlainTextResponse, tags=["health"],
             summary="Connected to the broker and able to take or run work",
             responses={200: {"content": {"text/plain": {}}}, 503: {"content": {"text/plain": {}},
                                                                   "description": "Not ready (why, as text)"}})
    async def readyz() -> PlainTextResponse:
        ok, why = ready()
        return PlainTextResponse(why + "\n", status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus() -> Response:
        refresh_fn()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if routers and not settings.http_api_allowed:
        log.warning("[HTTP] HTTP_HOST %s is not a loopback address and HTTP_TOKEN is not set: serving health and "
                    "metrics only (set HTTP_TOKEN to serve /v1)", settings.http_host)
    elif routers:
        for router in routers:
            app.include_router(router, prefix="/v1", dependencies=[Depends(require_token)])
    openapi.install(app)
    return app


def routers_for(op: str, settings: Settings, resources: Any, *, operations: Registry = OPERATIONS,
                **parts: Any) -> list[APIRouter]:
    """The ``/v1`` routers of operation ``op`` in this worker process (``parts``: the
    worker's ``consumer`` and ``publisher``, for routes that need them): an RPC operation
    answers its POST at once, a recorded one has the job routes (submit, status, events)."""
    spec = operations.get(op)
    if spec is not None and spec.rpc:
        from ai_service.http.infer import infer_router

        return [infer_router(settings, resources)]
    if spec is not None and spec.recorded:
        from ai_service.http.jobs import job_routers

        return job_routers(op, settings, resources, operations=operations, **parts)
    return []
