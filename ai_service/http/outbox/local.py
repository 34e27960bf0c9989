"""HTTP-only jobs: the outbox that writes to a job's log and the runner of the jobs.

:class:`LocalOutbox` is the :class:`ai_service.operation.Outbox` of a job run over HTTP
(messages go to its :class:`~ai_service.http.outbox.eventlog.EventLog`; queue-only
actions are no-ops); :class:`LocalJobs` runs the jobs on threads, one at a time per the
operation's prefetch, and after a restart runs the unfinished ones again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.http.outbox.eventlog import EventLog
from ai_service.jobs import Ledger
from ai_service.jobs import ledger as jobs_ledger
from ai_service.message_ids import job_message_id
from ai_service.messages import _Message, new_message_id
from ai_service.operation import DeliveryInfo, JobContext, Operation, Resources
from ai_service.publisher import Receipt

log = logging.getLogger("ai_service.http")


def settled(message_id: str) -> Receipt:
    receipt = Receipt(message_id)
    receipt._set()
    return receipt


class LocalOutbox:
    """:class:`ai_service.operation.Outbox` for HTTP-only mode: messages go to the job's log."""

    def __init__(self, events: EventLog, *, op: str, job_id: str) -> None:
        self.events = events
        self.op = op
        self.job_id = job_id

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> Receipt:
        payload, message_type = message.to_json_dict(), str(getattr(message, "type", ""))
        message_id = message_id or job_message_id(self.op, self.job_id, message_type, payload)  # as over AMQP
        return self.republish(kind, payload, message_type, message_id)

    def republish(self, kind: str, payload: dict[str, Any], message_type: str, message_id: str | None) -> Receipt:
        return settled(self.events.append(kind, message_type, payload, message_id).id)

    def lease(self, token: str, ttl_ms: int) -> Receipt:
        return settled(new_message_id())  # nothing comes back through a queue: resume_unfinished does

    def resubmit(self) -> Receipt:
        return settled(new_message_id())

    def retry_later(self, delay_ms: int, *, deliveries: int = 0) -> Receipt:
        return settled(new_message_id())  # resume_unfinished resumes it on the next start

    def dead_letter(self) -> Receipt:
        return settled(new_message_id())


class Busy(Exception):
    """The worker runs a job already (HTTP 429)."""

    def __init__(self, job_id: str, retry_after: int) -> None:
        super().__init__(f"busy with job {job_id}")
        self.job_id = job_id
        self.retry_after = retry_after


class LocalJobs:
    """Runs one job at a time (the operation's prefetch) on a thread, logs its messages."""

    #: Seconds a 429 asks the client to wait.
    RETRY_AFTER = 10

    def __init__(self, settings: Settings, operation: Operation, resources: Resources) -> None:
        self.settings = settings
        self.operation = operation
        self.resources = resources
        self.root = settings.work_dir / "events" / operation.name
        self._logs: dict[str, EventLog] = {}
        self._lock = threading.Lock()
        self._running: dict[str, JobContext] = {}
        self._threads: list[threading.Thread] = []
        self.stopping = threading.Event()

    @property
    def op(self) -> str:
        return self.operation.name

    def ledger(self) -> Ledger:
        return jobs_ledger(self.resources.require_storage(), self.settings, op=self.op)

    def log_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.jsonl"

    def request_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.request.json"

    def events(self, job_id: str) -> EventLog | None:
        with self._lock:
            found = self._logs.get(job_id)
            if found is None and self.log_path(job_id).exists():
                found = self._logs[job_id] = EventLog(self.log_path(job_id))
            return found

    def known(self, job_id: str) -> bool:
        return self.request_path(job_id).exists() or self.log_path(job_id).exists()

    def running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._running

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def submit(self, job_id: str, body: bytes, request: Any) -> EventLog | None:
        """Start the job; None when that job_id was given before (raises :class:`Busy`)."""
        with self._lock:
            if self.known(job_id):
                return None
            if len(self._running) >= max(1, self.operation.prefetch):
                raise Busy(next(iter(self._running)), self.RETRY_AFTER)
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.request_path(job_id).with_suffix(".tmp")
            tmp.write_bytes(body)
            os.replace(tmp, self.request_path(job_id))
            events = self._logs[job_id] = EventLog(self.log_path(job_id))
            self._start(job_id, body, request, events)
        return events

    def _start(self, job_id: str, body: bytes, request: Any, events: EventLog) -> None:
        ctx = JobContext(op=self.op, job_id=job_id, settings=self.settings, resources=self.resources,
                         delivery=DeliveryInfo(False, 0, None, None, {}, body),
                         outbox=LocalOutbox(events, op=self.op, job_id=job_id), ack_now_cb=lambda: None)
        if self.stopping.is_set():
            ctx.shutdown.set()
        self._running[job_id] = ctx
        thread = threading.Thread(target=self._run, args=(request, ctx), name=f"job-{job_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, request: Any, ctx: JobContext) -> None:
        try:
            ctx.log.info("Received %s request over HTTP", self.op)
            self.operation.handler(request, ctx)
        except BaseException as exc:  # the job ends with a terminal message
            error = exc if isinstance(exc, AIServiceError) else AIServiceError(
                f"internal error: {type(exc).__name__}", error_code="internal_error")
            log.warning("[Handler] [%s] %s: %s", ctx.job_id, error.error_code, error.message,
                        exc_info=not isinstance(exc, AIServiceError))
            if ctx.terminal is None and not ctx.shutdown.is_set():
                ctx.result(self.operation.failure(ctx.job_id, error))
        finally:
            with self._lock:
                self._running.pop(ctx.job_id, None)
            ctx.log.info("Done")

    def cancel(self, job_id: str) -> None:
        """Leave the cancel marker (as ``ai-service cancel --record``) and stop the job if it runs here."""
        self.ledger().request_cancel(job_id)
        with self._lock:
            ctx = self._running.get(job_id)
        if ctx is not None:
            ctx.cancelled.set()

    # --- after a restart -----------------------------------------------------------------

    def unfinished(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*.request.json")):
            job_id = path.name[: -len(".request.json")]
            events = self.events(job_id) or EventLog(self.log_path(job_id))
            if events.terminal is None:
                found.append(job_id)
        return found

    def resume_unfinished(self, *, poll: float = 0.5) -> threading.Thread | None:
        """Run the unfinished jobs again, each once its lease expired (background thread)."""
        pending = self.unfinished()
        if not pending:
            return None
        log.warning("[Handler] HTTP-only: %d unfinished job(s) from before the restart: %s", len(pending),
                    ", ".join(pending))
        thread = threading.Thread(target=self._resume, args=(pending, poll), name="http-resume", daemon=True)
        thread.start()
        return thread

    def _resume(self, pending: list[str], poll: float) -> None:
        ledger = self.ledger()
        while pending and not self.stopping.is_set():
            job_id = pending[0]
            record = ledger.load(job_id)
            if record is not None and record.lease_live():
                self.stopping.wait(min(poll, max(0.05, record.lease_expires - time.time())))
                continue
            try:
                body = self.request_path(job_id).read_bytes()
                request = self.operation.request_model.model_validate_json(body)
            except (OSError, ValueError) as exc:
                log.error("[Handler] [%s] Cannot resume: unreadable stored request (%s)", job_id, exc)
                pending.pop(0)
                continue
            with self._lock:
                if self._running and len(self._running) >= max(1, self.operation.prefetch):
                    busy = True
                else:
                    busy = False
                    events = self._logs.get(job_id) or EventLog(self.log_path(job_id))
                    self._logs[job_id] = events
                    log.warning("[Handler] [%s] Resuming after the restart (lease expired)", job_id)
                    self._start(job_id, body, request, events)
            if busy:
                self.stopping.wait(poll)
                continue
            pending.pop(0)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm stop: running jobs hand themselves back (resumed on the next start)."""
        self.stopping.set()
        with self._lock:
            contexts = list(self._running.values())
        for ctx in contexts:
            ctx.shutdown.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
