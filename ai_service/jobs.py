"""The job record: what makes long jobs safe across crashes, redeliveries and hosts.

A training or conversion job is not held as an unacked delivery for hours (RabbitMQ's
``consumer_timeout`` would close the channel).  Instead the worker that takes a job
writes ``jobs/<op>/<job_id>.json`` to storage (owner, attempt, lease expiry, a token for this
attempt), publishes a *lease message* into ``<request queue>.lease`` -- a holding queue
whose messages expire into the request queue -- and only then acks the delivery.

While it works it renews the lease (every epoch and on a timer).  When a lease message
comes back through the request queue, whoever receives it looks at the record:

* the job finished -> drop it (its terminal message is in the record);
* the lease message belongs to an older attempt -> drop it;
* the lease is still fresh -> publish the next lease message (same TTL) and drop this;
* the lease expired -> the owner is gone: take the job over and resume it.

So a dead worker's job comes back through RabbitMQ itself within about one and a half
lease periods, and any worker on any host can take it; nothing polls storage.

The record also holds the job's terminal message once it is sent: every path
(redelivery, duplicate request, resume, cancel) consults it first, so a job ends with
exactly one terminal message, re-published identically (same ``message_id``) if asked
again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ai_service.errors import AIServiceError, InvalidInput, ObjectNotFound
from ai_service.messages import _Message, new_message_id
from ai_service.operation import JobContext, Resources
from ai_service.storage import Storage

log = logging.getLogger("ai_service.jobs")

LEASE_HEADER = "x-ai-lease"
#: ``JOBS_PREFIX``'s default; the service's own area, which no request key may name.
RECORD_PREFIX = "jobs/"

# Records are per operation (CONTRACT.md: a job_id names one job per operation), so a
# conversion with a finished training job's id never sees, or answers with, its record.


def record_key(op: str, job_id: str, prefix: str = RECORD_PREFIX) -> str:
    return f"{prefix}{op}/{job_id}.json"


def legacy_record_key(job_id: str, prefix: str = RECORD_PREFIX) -> str:
    """Where releases before per-operation records kept them (read once, on upgrade)."""
    return f"{prefix}{job_id}.json"


def cancel_key(job_id: str, prefix: str = RECORD_PREFIX) -> str:
    """A cancel names a job_id, not an operation: one marker for any job with that id."""
    return f"{prefix}{job_id}.cancel"


def checkpoint_key(op: str, job_id: str, name: str, prefix: str = RECORD_PREFIX) -> str:
    return f"{prefix}{op}/{job_id}/{name}"


@dataclass
class JobRecord:
    """The state of one job, as stored at ``jobs/<op>/<job_id>.json``."""

    job_id: str
    op: str
    status: str = "new"  # running | handed_back | completed | failed | cancelled
    attempt: int = 0
    owner: str | None = None
    token: str | None = None
    lease_expires: float = 0.0
    last_epoch: int = 0
    checkpoints: dict[str, str] = field(default_factory=dict)
    terminal: dict[str, Any] | None = None
    terminal_message_id: str | None = None
    terminal_sent: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)
    updated: float = 0.0

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def lease_live(self, now: float | None = None) -> bool:
        return self.status == "running" and self.lease_expires > (now if now is not None else time.time())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "JobRecord":
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class Ledger:
    """Reads and writes job records, leases and cancel markers in storage."""

    def __init__(self, storage: Storage, *, op: str, worker: str, lease_seconds: int,
                 prefix: str = RECORD_PREFIX) -> None:
        self.storage = storage
        self.op = op
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.prefix = prefix

    def checkpoint_key(self, job_id: str, name: str) -> str:
        return checkpoint_key(self.op, job_id, name, self.prefix)

    def load(self, job_id: str) -> JobRecord | None:
        try:
            raw = self.storage.read_bytes(record_key(self.op, job_id, self.prefix))
        except ObjectNotFound:
            return self._load_legacy(job_id)
        try:
            return JobRecord.from_json(raw)
        except (ValueError, TypeError) as exc:
            log.error("[Handler] [%s] Unreadable job record (%s); treating the job as new", job_id, exc)
            return None

    def _load_legacy(self, job_id: str) -> JobRecord | None:
        """A record an older release wrote, if it is this operation's (saved per operation next)."""
        try:
            record = JobRecord.from_json(self.storage.read_bytes(legacy_record_key(job_id, self.prefix)))
        except (ObjectNotFound, ValueError, TypeError):
            return None
        return record if record.op == self.op else None

    def save(self, record: JobRecord) -> None:
        record.updated = time.time()
        self.storage.write_bytes(record_key(self.op, record.job_id, self.prefix), record.to_json())

    def take(self, record: JobRecord) -> JobRecord:
        """Become the owner of ``record`` for a new attempt with a fresh lease.

        A job handed back by a warm shutdown does not count as a failed attempt.
        """
        if record.status != "handed_back":
            record.attempt += 1
        record.owner = self.worker
        record.token = uuid.uuid4().hex
        record.status = "running"
        record.lease_expires = time.time() + self.lease_seconds
        self.save(record)
        return record

    def still_ours(self, record: JobRecord) -> bool:
        """Read the record back: did another worker take the job since we wrote it?"""
        current = self.load(record.job_id)
        return current is not None and current.token == record.token and not current.finished

    def renew(self, record: JobRecord) -> bool:
        """Extend our lease; False when the job is no longer ours (taken over or ended)."""
        current = self.load(record.job_id)
        if current is None or current.token != record.token or current.finished:
            return False
        record.lease_expires = time.time() + self.lease_seconds
        self.save(record)
        return True

    def hand_back(self, record: JobRecord) -> None:
        """Give the job up (warm shutdown): the next worker may take it at once."""
        current = self.load(record.job_id)
        if current is not None and current.token != record.token:
            return
        record.status = "handed_back"
        record.owner = None
        record.token = None  # its lease message is stale now; the resubmitted request takes over
        record.lease_expires = 0.0
        self.save(record)

    def finish(self, record: JobRecord, status: str, terminal: dict[str, Any], message_id: str) -> None:
        record.status = status
        record.terminal = terminal
        record.terminal_message_id = message_id
        record.lease_expires = 0.0
        self.save(record)

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.stat(cancel_key(job_id, self.prefix)) is not None

    def request_cancel(self, job_id: str) -> None:
        self.storage.write_bytes(cancel_key(job_id, self.prefix), json.dumps({"requested": time.time()}).encode())


# --- the long-job protocol ------------------------------------------------------------

#: How long to wait before reading our own record back (two takers racing for one job).
TAKE_SETTLE_SECONDS = 0.3


class LeaseLost(AIServiceError):
    """Another worker took the job over (our lease had expired); stop without a result."""


@dataclass
class Begin:
    """What :meth:`LongJob.begin` decided: run the job (``record``), or nothing to do."""

    record: JobRecord | None
    reason: str


class LongJob:
    """The life of one long job around its handler: take, lease, renew, finish.

    ``cancelled_message(record)`` and ``failed_message(record, error)`` build the
    operation's terminal messages for the paths this class ends by itself (cancelled
    before start, retry bound exceeded).
    """

    def __init__(
        self,
        ctx: JobContext,
        ledger: Ledger,
        *,
        cancelled_message: Callable[[JobRecord], _Message],
        failed_message: Callable[[JobRecord, AIServiceError], _Message],
    ) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.cancelled_message = cancelled_message
        self.failed_message = failed_message
        self.record: JobRecord | None = None
        self.lost = threading.Event()
        self._lock = threading.Lock()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def lease_ttl_ms(self) -> int:
        """Lease messages come back twice per lease period: a dead owner is noticed in
        at most one and a half periods.  One TTL for all (messages expire at the head)."""
        return max(1000, self.ledger.lease_seconds * 500)

    # --- taking the job ----------------------------------------------------------------

    def begin(self) -> Begin:
        ctx, ledger = self.ctx, self.ledger
        record = ledger.load(ctx.job_id)
        lease_token = ctx.delivery.headers.get(LEASE_HEADER)
        if record is not None and record.finished:
            if lease_token is None or not record.terminal_sent:
                self._republish_terminal(record)
            return Begin(None, "finished")
        if lease_token is not None:
            if record is None:
                # A lease message is only ever sent after its record was written.
                raise InvalidInput(f"the {LEASE_HEADER} header is internal to ai-service and names no job here; "
                                   "send requests without it")
            if record.token != lease_token:
                return Begin(None, "stale lease")
            if record.lease_live():
                ctx.outbox.lease(lease_token, self.lease_ttl_ms).wait(30)
                return Begin(None, "lease renewed elsewhere")
            ctx.log.warning("Lease of %s expired (owner %s): taking the job over", ctx.job_id, record.owner)
        elif record is not None and record.lease_live():
            ctx.log.info("Duplicate request: %s is running on %s; dropped", ctx.job_id, record.owner)
            return Begin(None, "duplicate")
        record = record or JobRecord(job_id=ctx.job_id, op=ctx.op)
        if ledger.cancel_requested(ctx.job_id):
            self.finish(record, "cancelled", self.cancelled_message(record))
            return Begin(None, "cancelled before start")
        limit = ctx.settings.rabbitmq_delivery_limit
        if record.attempt >= limit and record.status != "handed_back":
            error = AIServiceError(
                f"job failed {record.attempt} times (worker lost each time); giving up after "
                f"RABBITMQ_DELIVERY_LIMIT={limit}",
                error_code="internal_error",
            )
            ctx.outbox.dead_letter().wait(30)
            self.finish(record, "failed", self.failed_message(record, error))
            return Begin(None, "retry bound")
        ledger.take(record)
        time.sleep(TAKE_SETTLE_SECONDS)
        if not ledger.still_ours(record):
            return Begin(None, "taken by another worker")
        receipt = ctx.outbox.lease(record.token or "", self.lease_ttl_ms)
        receipt.wait(30)
        ctx.ack_now()  # the job now lives in storage and in the lease message
        self.record = record
        self._start_renewing()
        return Begin(record, "taken")

    # --- while it runs -----------------------------------------------------------------

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-{self.ctx.job_id}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        period = max(0.5, self.ledger.lease_seconds / 3)
        while not self._stop_renewing.wait(period):
            try:
                self.renew()
                if self.ledger.cancel_requested(self.ctx.job_id):
                    self.ctx.cancelled.set()
            except AIServiceError as exc:
                self.ctx.log.warning("Lease renewal failed (%s); retrying", exc.message)

    def renew(self, **changes: Any) -> None:
        """Extend the lease, saving ``changes`` (last epoch, checkpoints) with it."""
        record = self.record
        if record is None:
            return
        with self._lock:
            for name, value in changes.items():
                setattr(record, name, value)
            if not self.ledger.renew(record):
                self.ctx.log.warning("Lost the lease of %s to another worker; stopping", record.job_id)
                self.lost.set()
                raise LeaseLost("the job was taken over by another worker")

    def stop_renewing(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join(10)

    # --- ending it ---------------------------------------------------------------------

    def finish(self, record: JobRecord, status: str, message: _Message) -> None:
        """Record the terminal message, send it, then mark it sent: exactly one."""
        self.stop_renewing()
        with self._lock:
            if self.record is not None and not self.ledger.still_ours(record):
                self.ctx.log.warning("Not reporting %s: the job belongs to another worker now", status)
                return
            message_id = new_message_id()
            self.ledger.finish(record, status, message.to_json_dict(), message_id)
            self.ctx.result(message, message_id=message_id).wait(60)
            record.terminal_sent = True
            self.ledger.save(record)

    def hand_back(self) -> None:
        """Warm shutdown: give the job back so that a worker resumes it right away."""
        self.stop_renewing()
        record = self.record
        if record is None:
            return
        with self._lock:
            self.ledger.hand_back(record)
            self.ctx.outbox.resubmit().wait(30)
        self.ctx.log.info("Handed %s back at epoch %d", record.job_id, record.last_epoch)

    def _republish_terminal(self, record: JobRecord) -> None:
        assert record.terminal is not None and record.terminal_message_id is not None
        self.ctx.log.info("%s already ended (%s): re-publishing its terminal message", record.job_id, record.status)
        self.ctx.outbox.republish(
            "result", record.terminal, str(record.terminal.get("type", "")), record.terminal_message_id
        ).wait(30)
        if not record.terminal_sent:
            record.terminal_sent = True
            self.ledger.save(record)


def record_cancel(job_id: str, resources: Resources) -> None:
    """``Operation.on_cancel`` for long jobs: leave a marker any worker will honour,
    also when no worker runs the job right now (cancelled before start, or while its
    worker is gone)."""
    settings = resources.settings
    ledger(resources.storage, settings, op="").request_cancel(job_id)


def ledger(storage: Storage, settings: Any, *, op: str) -> Ledger:
    """The ledger of ``op`` with this worker's name, lease period and ``JOBS_PREFIX``."""
    return Ledger(storage, op=op, worker=settings.worker_name, lease_seconds=settings.lease_seconds,
                  prefix=settings.jobs_prefix)
