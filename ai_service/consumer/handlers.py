"""The handler side of the consumer: one delivery on a pool thread, from parse to settlement.

A handler's outcome goes through :func:`ai_service.consumer.policy.settle` once; what
it returns is carried out here (answer, metrics, trace) and, for the delivery, on the
I/O thread (:meth:`Settling.settle_delivery`).  Nothing here sleeps: a retry's delay is
a TTL in the holding queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pika

from ai_service import tracing
from ai_service.broker import QueueNames
from ai_service.cancels import CancelStream
from ai_service.config import Settings
from ai_service.consumer.outbox import DeliveryOutbox
from ai_service.consumer.policy import JobFate, Outcome, Settlement, settle
from ai_service.consumer.tracker import RequestTracker, Seen, readable_job_id_from
from ai_service.errors import AIServiceError
from ai_service.limits import Limits
from ai_service.messages import InvalidRequest, parse_request
from ai_service.metrics import Metrics
from ai_service.operation import DeliveryInfo, JobContext, Operation, Resources, SettleMode
from ai_service.publisher import Publisher, Receipt

log = logging.getLogger("ai_service.consumer")

#: How long a finished handler waits for its terminal message's confirm before settling.
TERMINAL_CONFIRM_TIMEOUT = 30.0
#: How long a redelivered request waits for a first run of it still going in this process.
REDELIVERY_WAIT = 300.0


@dataclass
class Delivery:
    tag: int
    generation: int
    info: DeliveryInfo
    ctx: JobContext | None = None
    props: pika.BasicProperties | None = None  # as delivered, for a counted copy
    acked: bool = False
    seen: Seen | None = None  # this run, in the RequestTracker
    prior: Seen | None = None  # for a redelivery: an earlier run of the same request in this process
    digest: bytes = b""

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.tag)


def settlement_for(op: Operation, settings: Settings, error: BaseException | None, delivery: Delivery) -> Settlement:
    """The policy for this delivery: held to the end, or (a long job acked early) its record's."""
    acked = delivery.acked or (delivery.ctx is not None and delivery.ctx.acked_early)
    mode = SettleMode.ONCE_RECORDED if acked and op.settle is SettleMode.ONCE_RECORDED else SettleMode.AT_END
    return settle(error, mode=mode, attempt=delivery.info.delivery_count + 1,
                  limit=settings.rabbitmq_delivery_limit, backoff_base=settings.retry_backoff_seconds,
                  backoff_cap=settings.retry_backoff_max_seconds)


class Handlers:
    """Mixed into :class:`~ai_service.consumer.loop.Consumer`: what runs on the pool threads."""

    settings: Settings
    op: Operation
    names: QueueNames
    publisher: Publisher
    resources: Resources
    metrics: Metrics
    tracker: RequestTracker
    limits: Limits
    cancels: CancelStream | None
    handled: int
    _stop: threading.Event
    _handlers_running: int
    _handlers_cond: threading.Condition

    if TYPE_CHECKING:  # the I/O side, in Settling and Consumer
        def _call_on_io(self, fn: Callable[[], None]) -> None: ...

        def settle_delivery(self, delivery: Delivery, settlement: Settlement) -> None: ...

        def ack_early(self, delivery: Delivery) -> None: ...

    def outbox_for(self, job_id: str, info: DeliveryInfo) -> DeliveryOutbox:
        return DeliveryOutbox(self.publisher, self.settings, self.names, job_id, info)

    def _handle(self, delivery: Delivery) -> None:
        with self._handlers_cond:
            self._handlers_running += 1
        info = delivery.info
        span = tracing.consume(self.names.request, info.headers, op=self.op.name, correlation_id=info.correlation_id,
                               redelivered=info.redelivered, delivery_count=info.delivery_count,
                               body_size=len(info.body))
        try:
            self._handle_delivery(delivery)
        finally:
            span.end()
            with self._handlers_cond:
                self._handlers_running -= 1
                self._handlers_cond.notify_all()

    def _handle_delivery(self, delivery: Delivery) -> None:
        started = time.monotonic()
        prior = delivery.prior
        if prior is not None and prior.done.wait(REDELIVERY_WAIT) and prior.answered:
            log.info("[Handler] [%s] Answered before the connection dropped; acknowledging the redelivery only",
                     readable_job_id_from(delivery.info.body) or "?")
            self._call_on_io(lambda: self.settle_delivery(delivery, settle(
                None, mode=SettleMode.AT_END, attempt=1, limit=1)))
            return
        seen = delivery.seen = delivery.seen or self.tracker.begin(delivery.digest)
        job_id, error = self._run_handler(delivery)
        settlement = settlement_for(self.op, self.settings, error, delivery)
        self._log_outcome(job_id, error, settlement)
        self._trace_outcome(job_id, error, settlement, delivery.ctx)
        receipt = self._answer(delivery, job_id, settlement)
        if receipt is not None:
            seen.answered = True  # spooled at least: it reaches the BE
        seen.done.set()
        if receipt is not None:
            receipt.wait(TERMINAL_CONFIRM_TIMEOUT)
        self.handled += 1
        self._count(delivery, settlement, started)
        self._call_on_io(lambda: self.settle_delivery(delivery, settlement))

    def _run_handler(self, delivery: Delivery) -> tuple[str | None, BaseException | None]:
        """Parse and run; every outcome comes back as (job id, error or None)."""
        job_id: str | None = None
        try:
            request, _ = parse_request(self.op.request_model, delivery.info.body, self.settings.max_message_bytes,
                                       self.limits)
            job_id = str(request.job_id)
            tracing.current_span().set("ai.job_id", job_id)
            ctx = JobContext(
                op=self.op.name,
                job_id=job_id,
                settings=self.settings,
                resources=self.resources,
                delivery=delivery.info,
                outbox=self.outbox_for(job_id, delivery.info),
                ack_now_cb=lambda: self._call_on_io(lambda: self.ack_early(delivery)),
            )
            if self._stop.is_set():
                ctx.shutdown.set()
            delivery.ctx = ctx
            if self.cancels is not None and self.cancels.seen(job_id):
                ctx.cancelled.set()  # its cancel came (from the stream) before the request
            ctx.log.info("Received %s request (delivery %d)", self.op.name, delivery.info.delivery_count + 1)
            self.op.handler(request, ctx)
        except InvalidRequest as exc:
            return exc.job_id, exc
        except BaseException as exc:  # noqa: BLE001 - every outcome goes through settle()
            return job_id or readable_job_id_from(delivery.info.body), exc
        return job_id, None

    def _answer(self, delivery: Delivery, job_id: str | None, settlement: Settlement) -> Receipt | None:
        """The policy's answer (a ``*_failed``) unless the job answered itself."""
        ctx = delivery.ctx
        if settlement.report is not None and job_id is not None and (ctx is None or ctx.terminal is None):
            failure = self.op.failure(job_id, settlement.report)
            return self.outbox_for(job_id, delivery.info).emit("result", failure)
        return ctx.terminal_receipt if ctx is not None else None

    @staticmethod
    def _trace_outcome(job_id: str | None, error: BaseException | None, settlement: Settlement,
                       ctx: JobContext | None) -> None:
        span = tracing.current_span()
        span.set("ai.job_id", job_id)
        span.set("ai.outcome", _delivery_word(settlement))
        terminal = ctx.terminal if ctx is not None else None
        span.set("ai.job.status", getattr(terminal, "status", None))
        if settlement.report is not None:
            span.fail(settlement.report if error is None or isinstance(error, AIServiceError) else error)
        elif getattr(terminal, "error_code", None):
            span.fail(f"{getattr(terminal, 'type', 'failed')}: {getattr(terminal, 'error_code', '')}")

    def _count(self, delivery: Delivery, settlement: Settlement, started: float) -> None:
        ctx = delivery.ctx
        if ctx is not None and ctx.terminal is not None:
            status = str(getattr(ctx.terminal, "status", "completed"))
        elif settlement.report is not None:
            status = "invalid" if settlement.delivery is Outcome.REJECT else "failed"
        elif settlement.job in (JobFate.RETRY, JobFate.HANDED_BACK):
            status = "requeued"
        else:
            status = "no_result"
        self.metrics.jobs.labels(self.op.name, status).inc()
        self.metrics.job_seconds.labels(self.op.name).observe(time.monotonic() - started)

    def _log_outcome(self, job_id: str | None, error: BaseException | None, settlement: Settlement) -> None:
        prefix = f"[Handler] [{job_id or '?'}]"
        extra = {"job_id": job_id, "op": self.op.name}
        word = _delivery_word(settlement)
        if error is None:
            log.info("%s Done", prefix, extra=extra)
        elif isinstance(error, AIServiceError):
            log.warning("%s %s: %s -> %s", prefix, error.error_code, error.message, word, extra=extra)
        else:
            log.error("%s Unexpected error -> %s", prefix, word, exc_info=error, extra=extra)


def _delivery_word(settlement: Settlement) -> str:
    """The delivery outcome as logs and traces have always said it (a retry is a requeue)."""
    if settlement.delivery is Outcome.RETRY_LATER:
        return Outcome.REQUEUE.value
    if settlement.delivery is Outcome.NONE:
        return Outcome.ACK.value
    return str(settlement.delivery.value)
