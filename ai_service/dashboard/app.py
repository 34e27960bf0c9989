"""The dashboard's routes, on the workers' application factory (same server, same token rules).

* ``GET /`` and ``/static/...``: the page and its files (no data in them: open);
* ``/v1/dashboard/...``: the data and the buttons, behind ``HTTP_TOKEN`` like every
  ``/v1`` route (and not served at all on a non-loopback ``HTTP_HOST`` without a token):

  - ``GET state``: the snapshot (workers, jobs, queues);
  - ``GET jobs/{op}/{job_id}``: one job with its epoch metrics history;
  - ``GET events``: ``text/event-stream`` -- a ``snapshot`` event, then one event per
    change (``worker``, ``job`` with the new metrics point, ``queues``, ``broker``);
  - ``POST jobs/{op}/{job_id}/cancel``, ``GET dlq/{op}``, ``POST dlq/{op}/replay``.

The page reads the stream with ``fetch`` (an ``EventSource`` cannot send the bearer token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from ai_service.config import Settings
from ai_service.dashboard.feed import Actions
from ai_service.dashboard.state import DashboardState
from ai_service.errors import BrokerError
from ai_service.http.app import create_app
from ai_service.metrics import Metrics

STATIC = Path(__file__).resolve().parent / "static"
KEEPALIVE_SECONDS = 15.0
POLL_SECONDS = 0.2

Op = Literal["train", "convert", "infer"]


class Replay(BaseModel):
    """Which dead letter: its ``message_id``, or (a message without one) its place in the listing."""

    message_id: str | None = None
    index: int | None = None


def sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def change_stream(state: DashboardState, *, poll: float = POLL_SECONDS) -> AsyncIterator[bytes]:
    """A snapshot, then every change as it comes (a fresh snapshot when this reader fell behind)."""
    snapshot = state.snapshot()
    seq = int(snapshot["seq"])
    yield sse("snapshot", snapshot, seq)
    quiet_since = time.monotonic()
    while True:
        changes = state.changes_after(seq)
        if changes is None:
            snapshot = state.snapshot()
            seq = int(snapshot["seq"])
            yield sse("snapshot", snapshot, seq)
            changes = []
        for change in changes:
            seq = change.seq
            yield sse(change.kind, change.data, change.seq)
        if changes:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield b": keepalive\n\n"
        await asyncio.sleep(poll)


def dashboard_router(state: DashboardState, actions: Actions) -> APIRouter:
    """The ``/v1/dashboard`` routes (mounted behind the token by :func:`create_app`)."""
    router = APIRouter(prefix="/dashboard", tags=["dashboard"])

    @router.get("/state", summary="Workers, jobs and queues as the dashboard knows them")
    async def snapshot() -> dict[str, Any]:
        return state.snapshot()

    @router.get("/jobs/{op}/{job_id}", summary="One job with its epoch metrics history")
    async def job(op: Op, job_id: str) -> dict[str, Any]:
        found = state.job(op, job_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no {op} job {job_id} seen")
        return found

    @router.get("/events", summary="Every change, as text/event-stream", response_class=StreamingResponse)
    async def events() -> StreamingResponse:
        return StreamingResponse(change_stream(state), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.post("/jobs/{op}/{job_id}/cancel", status_code=202, summary="Cancel a job (the contract's cancel)")
    def cancel(op: Op, job_id: str) -> dict[str, Any]:
        return _broker(lambda: actions.cancel(job_id))

    @router.get("/dlq/{op}", summary="The first dead letters of an operation's .dlq (given back untouched)")
    def dead_letters(op: Op) -> dict[str, Any]:
        return _broker(lambda: actions.dead_letters(op))

    @router.post("/dlq/{op}/replay", summary="Put one dead letter back on its request queue")
    def replay(op: Op, body: Replay) -> dict[str, Any]:
        if body.message_id is None and body.index is None:
            raise HTTPException(status_code=400, detail="name the dead letter: message_id or index")
        answer = _broker(lambda: actions.replay(op, body.message_id, body.index))
        if not answer["replayed"]:
            raise HTTPException(status_code=404, detail=f"no such dead letter in the {op} .dlq")
        return answer

    return router


def _broker(call: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = call()
        return result
    except BrokerError as exc:
        raise HTTPException(status_code=503, detail=f"RabbitMQ: {exc.message}") from None


def create_dashboard_app(settings: Settings, state: DashboardState, actions: Actions) -> FastAPI:
    """The dashboard's application: the page, its files, health, metrics and ``/v1/dashboard``."""

    def ready() -> tuple[bool, str]:
        return (True, "connected") if state.connected else (False, "not connected to RabbitMQ")

    app = create_app(settings, metrics=Metrics(), ready=ready, routers=[dashboard_router(state, actions)])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    return app
