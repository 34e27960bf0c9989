"""HTTP-only mode (``ENABLE_RABBITMQ=false``): the worker runs the jobs it is given over
HTTP itself, through the operation's own handler, with an outbox that writes to disk.

Event log: every message a job sends goes, instead of to ``EVENTS_EXCHANGE``, to
``WORK_DIR/events/<op>/<job_id>.jsonl``, one JSON line per message,
``{"id": <message_id>, "kind": "update"|"result", "type": ..., "data": <the message>}``
(the same bodies and message_ids the queues would have carried), flushed and fsynced
before the handler goes on.  The request itself is kept beside it
(``<job_id>.request.json``) so that a restarted worker can run it again.

* A log is append-only and idempotent: a message_id already in it, a second
  ``epoch_update`` for an epoch it has, or anything after the terminal message is not
  appended again.  So a job resumed after a crash, whose handler announces an epoch or
  republishes its stored terminal message a second time, leaves no repeat in the log.
* ``lease`` / ``resubmit`` / ``dead_letter`` have no queue to go to: no-ops.  Job
  records, leases, checkpoints and cancel markers in storage work as with RabbitMQ.
* On start (:meth:`LocalJobs.resume_unfinished`) the worker looks for logs without a
  terminal message; for each, once the job record's lease has expired (at once when
  the job was handed back by a warm stop), it runs the stored request again: the
  handler resumes from the last checkpoint (or re-sends the stored terminal message).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.jobs import Ledger
from ai_service.jobs import ledger as jobs_ledger
from ai_service.message_ids import job_message_id
from ai_service.messages import _Message, new_message_id
from ai_service.operation import DeliveryInfo, JobContext, Operation, Resources
from ai_service.publisher import Receipt
from ai_service.registry import OPERATIONS, Registry

log = logging.getLogger("ai_service.http")


@dataclass(frozen=True)
class Entry:
    """One message of a job, as the events stream serves it."""

    id: str
    kind: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """A result: every operation's terminal messages, and only they, are ``<op>.result.<job_id>``."""
        return self.kind == "result"


class EventLog:
    """The messages of one job, in order; in memory, and on disk when ``path`` is set.

    ``max_entries`` bounds a memory-only log (the RabbitMQ-on follower): past it further
    progress messages are dropped (the terminal message never is).
    """

    def __init__(self, path: Path | None = None, *, max_entries: int = 100_000) -> None:
        self.path = path
        self.max_entries = max_entries
        self.entries: list[Entry] = []
        self.dropped = 0
        self._ids: set[str] = set()
        self._epochs: set[tuple[str, Any]] = set()
        self._lock = threading.Lock()
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        for line in path.read_bytes().splitlines():
            try:
                raw = json.loads(line)
                entry = Entry(str(raw["id"]), str(raw["kind"]), str(raw["type"]), dict(raw["data"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash mid-write: the handler sends it again
            self._remember(entry)

    def _remember(self, entry: Entry) -> bool:
        if entry.id in self._ids or self.terminal is not None:
            return False
        step = _step(entry)
        if step is not None and step in self._epochs:
            return False
        self._ids.add(entry.id)
        if step is not None:
            self._epochs.add(step)
        self.entries.append(entry)
        return True

    @property
    def terminal(self) -> Entry | None:
        return self.entries[-1] if self.entries and self.entries[-1].terminal else None

    def append(self, kind: str, message_type: str, data: dict[str, Any], message_id: str | None = None) -> Entry:
        """Append one message (durably when on disk); returns the entry (the stored one for a repeat)."""
        entry = Entry(message_id or new_message_id(), kind, message_type, data)
        with self._lock:
            if self.path is None and len(self.entries) >= self.max_entries and not entry.terminal:
                self.dropped += 1
                return entry
            if not self._remember(entry):
                return entry
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                line = json.dumps({"id": entry.id, "kind": kind, "type": message_type, "data": data},
                                  separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return entry

    def index_after(self, last_id: str | None) -> int:
        """Where a stream resuming after ``last_id`` starts (0 when None or unknown)."""
        if last_id:
            for i, entry in enumerate(self.entries):
                if entry.id == last_id:
                    return i + 1
        return 0

    @property
    def last_update(self) -> Entry | None:
        for entry in reversed(self.entries):
            if entry.kind == "update":
                return entry
        return None

    @property
    def progress(self) -> float:
        values = [float(e.data["progress"]) for e in self.entries if isinstance(e.data.get("progress"), (int, float))]
        return max(values, default=0.0)


def _step(entry: Entry) -> tuple[str, Any] | None:
    """What makes a progress message one of a kind: its epoch or its format."""
    if entry.type == "epoch_update":
        return entry.type, entry.data.get("current_epoch")
    if entry.type == "conversion_update":
        return entry.type, entry.data.get("current_format")
    return None


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



# --- the HTTP-only worker -------------------------------------------------------------


def serve_http_only(settings: Settings, op: str, load: Any, *, operations: Registry = OPERATIONS) -> int:
    """``ENABLE_RABBITMQ=false`` with ``HTTP_PORT`` set: serve the API and run its jobs here.

    The first SIGTERM/SIGINT stops warmly (a running job hands itself back and is
    resumed on the next start), a second one exits 1 at once.
    """
    import signal

    from ai_service.http.app import create_app, routers_for
    from ai_service.http.server import HttpServer
    from ai_service.storage import open_storage

    operation = load(settings)
    resources = Resources(settings=settings, storage=open_storage(settings))
    if operation.setup is not None:
        operation.setup(resources)
    local = LocalJobs(settings, operation, resources) if operations[op].recorded else None
    routers = routers_for(op, settings, resources, local=local, operations=operations)

    def ready() -> tuple[bool, str]:
        if local is not None and local.busy:
            return True, "HTTP-only (ENABLE_RABBITMQ=false): running a job"
        return True, "HTTP-only (ENABLE_RABBITMQ=false): idle"

    metrics = resources.metrics
    app = create_app(settings, metrics=metrics, ready=ready, routers=routers)
    assert settings.http_port is not None
    server = HttpServer(app, settings.http_host, settings.http_port, limit_concurrency=settings.metrics_max_connections,
                        timeout_keep_alive=settings.metrics_request_timeout,
                        request_timeout=settings.metrics_request_timeout, metrics=metrics)
    stop = threading.Event()
    count = [0]

    def handle(signum: int, frame: Any) -> None:
        count[0] += 1
        if count[0] > 1:
            log.warning("[HTTP] %s received again: forced exit", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        log.warning("[HTTP] %s received: warm shutdown (the running job hands itself back)",
                    signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    server.start()
    log.warning("[HTTP] Messaging is disabled (ENABLE_RABBITMQ=false): HTTP-only %s worker on http://%s:%d; "
                "jobs' messages go to %s", operation.name, settings.http_host, server.port,
                local.root if local is not None else "the HTTP answers")
    if local is not None:
        local.resume_unfinished()
    while not stop.wait(0.5):
        pass
    if local is not None:
        local.stop()
    server.stop()
    log.info("[HTTP] Worker stopped cleanly")
    return 0
