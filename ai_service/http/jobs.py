"""``/v1`` routes of the long jobs (training, conversion): submit, look at, follow, cancel.

* ``POST /v1/<op>`` of a recorded operation (train, convert; :mod:`ai_service.registry`): the
  request is parsed and validated exactly as over AMQP (``parse_request``: 400 with the
  ``*_failed`` body naming every bad field); 409 when a job record (or, HTTP-only, a
  job) with that id exists for the operation; 202 ``{"job_id", "events"}``.
  RabbitMQ on: published (confirmed) to the request queue, any worker takes it.
  HTTP-only: run here, through the same handler (:mod:`ai_service.http.outbox`); 429
  with ``Retry-After`` while this worker runs a job.
* ``GET /v1/jobs/{job_id}``: ``op``, ``state``, ``progress``, ``last_update``,
  ``terminal``; 404 when unknown.
* ``GET /v1/jobs/{job_id}/events``: :mod:`ai_service.http.events`.
* ``POST /v1/jobs/{job_id}/cancel``: 202; the cancel marker in storage (as
  ``ai-service cancel --record``), plus, RabbitMQ on, a ``cancel`` on ``CONTROL_EXCHANGE``.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ai_service.config import Settings
from ai_service.http.events import Follower, stream
from ai_service.http.openapi import json_body
from ai_service.http.outbox import Busy, EventLog, LocalJobs
from ai_service.jobs import JobRecord
from ai_service.jobs import ledger as jobs_ledger
from ai_service.limits import Limits
from ai_service.messages import InvalidRequest, JobRequest, _Message, parse_request
from ai_service.operation import Resources
from ai_service.registry import OPERATIONS, OperationSpec, Registry

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: RabbitMQ on: jobs followed at once by one worker (each is a thread and a connection).
MAX_FOLLOWERS = 64


def _problem(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class JobsApi:
    """The state behind the routes of one worker process.

    ``op``'s spec in ``operations`` gives the request and failure models; ``GET
    /v1/jobs/{job_id}`` looks at the records of every recorded operation (``op``'s first).
    """

    def __init__(self, settings: Settings, op: str, resources: Resources | None, *,
                 local: LocalJobs | None = None, publisher: Any = None,
                 operations: Registry = OPERATIONS) -> None:
        self.settings = settings
        self.op = op
        self.spec: OperationSpec = operations[op]
        request_model, failure_model = self.spec.request_model, self.spec.failure_model
        if not issubclass(request_model, JobRequest) or not issubclass(failure_model, _Message):
            raise TypeError(f"{op}: a job's request is a JobRequest and its failure a message")
        self.request_model: type[JobRequest] = request_model
        self.failure_model: type[_Message] = failure_model
        self.long_ops = operations.recorded()
        self.resources = resources
        self.local = local
        self.publisher = publisher
        self.limits = Limits.from_settings(settings)
        self._followers: dict[tuple[str, str], Follower] = {}
        self._lock = threading.Lock()

    @property
    def storage(self) -> Any:
        return self.resources.storage if self.resources is not None else None

    def record(self, op: str, job_id: str) -> JobRecord | None:
        return jobs_ledger(self.storage, self.settings, op=op).load(job_id)

    # --- submit ------------------------------------------------------------------------

    def failure_body(self, job_id: str | None, error: InvalidRequest) -> dict[str, Any]:
        body = self.failure_model.model_validate({"job_id": job_id or "unknown", "error_code": error.error_code,
                                                  "error_message": error.message}).to_json_dict()
        if job_id is None:
            body["job_id"] = None
        return body

    def submit(self, body: bytes) -> JSONResponse:
        try:
            request, _ = parse_request(self.request_model, body, self.settings.max_message_bytes,
                                       self.limits)
        except InvalidRequest as exc:
            return JSONResponse(self.failure_body(exc.job_id, exc), status_code=400)
        job_id = str(request.job_id)
        taken = JSONResponse({"detail": f"job_id {job_id!r} is already taken by a {self.op} job",
                              "job_id": job_id}, status_code=409)
        if self.record(self.op, job_id) is not None:
            return taken
        accepted = {"job_id": job_id, "events": f"/v1/jobs/{job_id}/events"}
        if self.local is not None:
            try:
                if not self.local.submit(job_id, body, request):
                    return taken
            except Busy as exc:
                return JSONResponse({"detail": f"this worker is running job {exc.job_id}; retry later",
                                     "job_id": job_id}, status_code=429,
                                    headers={"Retry-After": str(exc.retry_after)})
            return JSONResponse(accepted, status_code=202)
        with self._lock:
            if (self.op, job_id) in self._followers and not self._followers[(self.op, job_id)].done.is_set():
                return taken
        follower = self.follow(self.op, job_id)  # bound before the request goes out: nothing missed
        receipt = self.publisher.publish("", self.spec.queues(self.settings).request, body,
                                         message_type=f"{self.op}_request", correlation_id=job_id)
        if not receipt.wait(30) or receipt.unroutable or receipt.refused_reason:
            if follower is not None:
                follower.stop()
            why = receipt.refused_reason or ("no request queue" if receipt.unroutable else "no confirm in 30 s")
            return _problem(503, f"the broker did not take the request ({why})")
        return JSONResponse(accepted, status_code=202)

    # --- following (RabbitMQ on) ---------------------------------------------------------

    def follow(self, op: str, job_id: str) -> Follower | None:
        """The job's follower (started and bound), or None when too many run."""
        with self._lock:
            for key, follower in list(self._followers.items()):
                if follower.done.is_set() and follower.events.terminal is None:
                    del self._followers[key]  # gave up (idle, broker lost): a new one next time
            found = self._followers.get((op, job_id))
            if found is not None:
                found.touch()
                return found
            if sum(not f.done.is_set() for f in self._followers.values()) >= MAX_FOLLOWERS:
                return None
            follower = self._followers[(op, job_id)] = Follower(self.settings, op, job_id)
        follower.start()
        return follower

    def followed(self, job_id: str) -> Follower | None:
        with self._lock:
            for op in self._ops():
                found = self._followers.get((op, job_id))
                if found is not None:
                    return found
        return None

    def _ops(self) -> tuple[str, ...]:
        return (self.op, *[op for op in self.long_ops if op != self.op])

    # --- looking at a job ----------------------------------------------------------------

    def find(self, job_id: str) -> tuple[str, JobRecord | None, EventLog | None] | None:
        """(op, record, event log) of a job, or None when unknown."""
        if self.local is not None:
            events = self.local.events(job_id)
            record = self.record(self.op, job_id)
            if events is None and record is None:
                return None
            return self.op, record, events
        follower = self.followed(job_id)
        for op in self._ops():
            record = self.record(op, job_id)
            if record is not None:
                events = follower.events if follower is not None and follower.op == op else None
                return op, record, events
        if follower is not None:
            return follower.op, None, follower.events
        return None

    def describe(self, job_id: str) -> dict[str, Any] | None:
        found = self.find(job_id)
        if found is None:
            return None
        op, record, events = found
        terminal = events.terminal.data if events is not None and events.terminal is not None else None
        if terminal is None and record is not None and record.terminal is not None:
            terminal = record.terminal
        last = events.last_update if events is not None else None
        if terminal is not None:
            state = str(terminal.get("status", "ended"))
        elif self.local is not None and self.local.running(job_id):
            state = "running"
        elif record is not None:
            state = record.status
        else:
            state = "queued"
        progress = events.progress if events is not None else 0.0
        if terminal is not None and isinstance(terminal.get("progress"), (int, float)):
            progress = max(progress, float(terminal["progress"]))
        return {"job_id": job_id, "op": op, "state": state, "progress": progress,
                "last_update": last.data if last is not None else None, "terminal": terminal,
                "current_epoch": record.last_epoch if record is not None else None}

    def events_of(self, job_id: str) -> EventLog | None:
        """The log a stream reads; RabbitMQ on: a follower's, started when needed."""
        found = self.find(job_id)
        if found is None:
            return None
        op, record, events = found
        if events is None and self.local is None and (record is None or record.terminal is None):
            follower = self.follow(op, job_id)
            if follower is None:
                raise HTTPException(503, "this worker follows too many jobs; retry later",
                                    headers={"Retry-After": "10"})
            events = follower.events
            record = self.record(op, job_id)  # it may have ended while the queue was bound
        if events is None:
            events = EventLog()
        if events.terminal is None and record is not None and record.terminal is not None:
            events.append("result", str(record.terminal.get("type", "")), record.terminal,
                          record.terminal_message_id)
        return events

    def alive(self, job_id: str, events: EventLog) -> bool:
        if self.local is not None:
            return not self.local.stopping.is_set()
        follower = self.followed(job_id)
        if follower is None or follower.events is not events:
            return events.terminal is not None
        follower.touch()
        return not follower.done.is_set()

    # --- cancel --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        if self.local is not None:
            self.local.cancel(job_id)
            return {"job_id": job_id, "cancel": "requested"}
        jobs_ledger(self.storage, self.settings, op="").request_cancel(job_id)
        body = json.dumps({"type": "cancel", "job_id": job_id}).encode()
        receipt = self.publisher.publish(self.settings.control_exchange, "", body, message_type="cancel",
                                         correlation_id=job_id)
        receipt.wait(10)
        return {"job_id": job_id, "cancel": "requested"}


def job_router(api: JobsApi) -> APIRouter:
    """The routes of ``api``'s (recorded) operation and of ``/jobs``."""
    router = APIRouter(tags=["jobs"])
    op = api.op
    submit_doc = json_body(api.request_model, description=f"The {op} request, as on the AMQP request queue")

    @router.post(
        f"/{op}", status_code=202, openapi_extra=submit_doc,
        summary=f"Submit a {op} job (the AMQP request body)",
        responses={202: {"description": "Accepted: follow `events`"},
                   400: {"model": api.failure_model,
                         "description": "Invalid request: the `*_failed` body, naming every bad field"},
                   409: {"description": "That job_id is taken"},
                   429: {"description": "HTTP-only mode: this worker is busy (see Retry-After)"},
                   503: {"description": "The broker did not take the request"}},
    )
    async def submit(request: Request) -> JSONResponse:
        body = await request.body()
        return await run_in_threadpool(api.submit, body)

    def known(job_id: str) -> None:
        if not JOB_ID.match(job_id):
            raise HTTPException(404, "no such job")

    @router.get("/jobs/{job_id}", summary="A job: op, state, progress, last update, terminal message",
                responses={404: {"description": "Unknown job"}})
    def job(job_id: str) -> JSONResponse:
        known(job_id)
        described = api.describe(job_id)
        if described is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return JSONResponse(described)

    @router.get("/jobs/{job_id}/events", summary="Every message of the job, as text/event-stream",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`id: <message_id>`, `event: <type>`, `data: <message>`; ends after "
                                                "the terminal message; `Last-Event-ID` resumes"},
                           404: {"description": "Unknown job"}})
    async def events(job_id: str, request: Request) -> StreamingResponse:
        known(job_id)
        log = await run_in_threadpool(api.events_of, job_id)
        if log is None:
            raise HTTPException(404, f"no job {job_id!r}")
        last_id = request.headers.get("last-event-id")
        return StreamingResponse(stream(log, last_id, alive=lambda: api.alive(job_id, log)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/jobs/{job_id}/cancel", status_code=202, summary="Cancel a job (as a `cancel` message)")
    async def cancel(job_id: str) -> JSONResponse:
        if not JOB_ID.match(job_id):
            raise HTTPException(400, "job_id: 1-64 characters of A-Z a-z 0-9 _ -")
        return JSONResponse(await run_in_threadpool(api.cancel, job_id), status_code=202)

    return router


def job_routers(op: str, settings: Settings, resources: Resources | None, *, publisher: Any = None,
                local: LocalJobs | None = None, operations: Registry = OPERATIONS, **_: Any) -> list[APIRouter]:
    """The ``/v1`` job routes of a recorded operation's worker ([] for other operations).

    RabbitMQ on: the worker's ``publisher``; HTTP-only: ``local`` (``ENABLE_RABBITMQ=false``).
    """
    spec = operations.get(op)
    if spec is None or not spec.recorded:
        return []
    return [job_router(JobsApi(settings, op, resources, local=local, publisher=publisher, operations=operations))]
