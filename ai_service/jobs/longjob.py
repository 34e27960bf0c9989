"""The long-job protocol: take a job, lease it, renew, and end it exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ai_service.consumer.policy import JobFate, Settlement, SettleMode, settle
from ai_service.errors import AIServiceError, InvalidInput, LeaseLost
from ai_service.jobs.ledger import Ledger
from ai_service.jobs.records import LEASE_HEADER, JobRecord
from ai_service.message_ids import job_message_id
from ai_service.messages import _Message
from ai_service.operation import JobContext

#: How long to wait before reading our own record back (two takers racing for one job),
#: on a store without conditional writes (see :mod:`ai_service.jobs.ledger`).
TAKE_SETTLE_SECONDS = 0.3


@dataclass
class Begin:
    """What :meth:`LongJob.begin` decided: run the job (``record``), or nothing to do."""

    record: JobRecord | None
    reason: str


class LongJob:
    """The life of one long job around its handler: take, lease, renew, finish.

    ``cancelled_message(record)`` and ``failed_message(record, error)`` build the
    operation's terminal messages for the paths this class ends by itself (cancelled
    before start, retry bound exceeded, and every outcome :meth:`conclude` is given).
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
        if ctx.cancelled.is_set() or ledger.cancel_requested(ctx.job_id):
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
        if not self._take(record):
            return Begin(None, "taken by another worker")
        if ctx.cancelled.is_set():  # its cancel came while we took it
            self.finish(record, "cancelled", self.cancelled_message(record))
            return Begin(None, "cancelled before start")
        receipt = ctx.outbox.lease(record.token or "", self.lease_ttl_ms)
        receipt.wait(30)
        ctx.ack_now()  # the job now lives in storage and in the lease message
        self.record = record
        self._start_renewing()
        return Begin(record, "taken")

    def _take(self, record: JobRecord) -> bool:
        """Take ``record``: one conditional write, or (the fallback) write, settle, read back."""
        ledger = self.ledger
        if not ledger.take(record):  # a conditional write another worker's take beat
            return False
        if ledger.conditional:
            return True
        time.sleep(TAKE_SETTLE_SECONDS)  # did a second taker's write land after ours?
        return ledger.still_ours(record)

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
            payload = message.to_json_dict()
            message_id = job_message_id(self.ctx.op, record.job_id, str(payload.get("type", "")), payload)
            if not self.ledger.finish(record, status, payload, message_id):
                self.ctx.log.warning("Not reporting %s: another worker wrote the job's record first", status)
                return
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

    def retry_later(self, delay: float) -> None:
        """A retryable failure: give the job back to resume from its checkpoint after
        ``delay`` seconds, through the holding queue (a new try, counted in the record).

        When the record cannot be written (storage is what failed), the job stays ours in
        the record and comes back when its lease expires, through the lease messages.
        """
        self.stop_renewing()
        record = self.record
        if record is None:
            return
        with self._lock:
            try:
                ours = self.ledger.hand_back(record, status="retrying")
            except AIServiceError as exc:
                self.ctx.log.warning("Could not record the retry (%s): the job resumes once its lease expires",
                                     exc.message)
                return
            if not ours:
                self.ctx.log.warning("Not retrying %s: another worker owns the job now", record.job_id)
                return
            self.ctx.outbox.retry_later(int(delay * 1000)).wait(30)
        self.ctx.log.info("Trying %s again from epoch %d in %.1f s (attempt %d of %d)", record.job_id,
                          record.last_epoch, delay, record.attempt + 1, self.ctx.settings.rabbitmq_delivery_limit)

    def conclude(self, record: JobRecord, error: BaseException, *, where: str = "") -> Settlement:
        """Every way a taken job ends but success, through the one policy
        (:func:`ai_service.consumer.policy.settle`); returns what it decided."""
        s = self.ctx.settings
        settlement = settle(error, mode=SettleMode.ONCE_RECORDED, attempt=record.attempt,
                            limit=s.rabbitmq_delivery_limit, backoff_base=s.retry_backoff_seconds,
                            backoff_cap=s.retry_backoff_max_seconds)
        at = f" {where}" if where else ""
        if settlement.job is JobFate.CANCELLED:
            self.ctx.log.info("Cancelled%s", at)
            self.finish(record, "cancelled", self.cancelled_message(record))
        elif settlement.job is JobFate.FAILED and settlement.report is not None:
            report = settlement.report
            self.ctx.log.warning("Failed%s: %s: %s", at, report.error_code, report.message,
                                 exc_info=error if not isinstance(error, AIServiceError) else None)
            self.finish(record, "failed", self.failed_message(record, report))
            if settlement.dead_letter:
                self.ctx.outbox.dead_letter().wait(30)
        elif settlement.job is JobFate.RETRY:
            message = error.message if isinstance(error, AIServiceError) else type(error).__name__
            self.ctx.log.warning("Retryable failure%s (attempt %d of %d): %s", at, record.attempt,
                                 s.rabbitmq_delivery_limit, message)
            self.retry_later(settlement.delay)
        elif settlement.job is JobFate.HANDED_BACK:
            self.hand_back()
        else:
            self.stop_renewing()
            self.ctx.log.warning("Stopped%s: another worker owns the job now", at)
        return settlement

    def _republish_terminal(self, record: JobRecord) -> None:
        assert record.terminal is not None
        assert record.terminal_message_id is not None
        self.ctx.log.info("%s already ended (%s): re-publishing its terminal message", record.job_id, record.status)
        self.ctx.outbox.republish(
            "result", record.terminal, str(record.terminal.get("type", "")), record.terminal_message_id
        ).wait(30)
        if not record.terminal_sent:
            record.terminal_sent = True
            self.ledger.save(record)
