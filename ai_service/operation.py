"""What a worker needs to know about one operation, and the small context a handler gets.

Handlers are plain functions ``handler(request, ctx)`` of a validated pydantic request
and a :class:`JobContext`.  They never see pika: they report through ``ctx.update`` /
``ctx.result``, watch ``ctx.cancelled`` / ``ctx.shutdown``, and may ``ctx.ack_now()``
once their job is safely recorded elsewhere (long jobs, see ``jobs.py``).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import JobRequest, _Message, is_terminal
from ai_service.metrics import Metrics

if TYPE_CHECKING:
    from ai_service.publisher import Receipt


class SettleMode(enum.Enum):
    """When an operation's delivery is settled (the policy: ``ai_service.consumer.policy``)."""

    #: Short jobs (inference): the delivery is held until the handler ends.
    AT_END = "at_end"
    #: Long jobs (training, conversion): acked once the job record is written (``ack_now``);
    #: from then on the job settles through its record and lease messages.
    ONCE_RECORDED = "once_recorded"


@dataclass(frozen=True)
class DeliveryInfo:
    """What the broker told us about a delivery, without pika types."""

    redelivered: bool
    delivery_count: int
    reply_to: str | None
    correlation_id: str | None
    headers: dict[str, Any]
    body: bytes = b""


class Outbox(Protocol):
    """How a handler sends things, bound to one delivery; implemented by the consumer."""

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> "Receipt":
        """Publish ``message`` as this job's ``update`` or ``result``."""

    def republish(self, kind: str, payload: dict[str, Any], message_type: str, message_id: str) -> "Receipt":
        """Send a stored message again, identically (same ``message_id``)."""

    def lease(self, token: str, ttl_ms: int) -> "Receipt":
        """Put this request in the lease holding queue; it comes back after ``ttl_ms``."""

    def resubmit(self) -> "Receipt":
        """Put this request back in the request queue now (a job handed back)."""

    def retry_later(self, delay_ms: int, *, deliveries: int = 0) -> "Receipt":
        """Put this request in the holding queue as a new try; it comes back after ``delay_ms``."""

    def dead_letter(self) -> "Receipt":
        """Put this request in the request queue's ``.dlq``."""


class JobLog(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """Prefixes ``[Handler]`` and the job id; also passes them to the JSON formatter."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[Handler] [{extra.get('job_id', '-')}] {msg}", kwargs


@dataclass
class JobContext:
    """Everything a handler may use; built per delivery by the consumer."""

    op: str
    job_id: str
    settings: Settings
    resources: "Resources"
    delivery: DeliveryInfo
    outbox: Outbox
    ack_now_cb: Callable[[], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    shutdown: threading.Event = field(default_factory=threading.Event)
    terminal: _Message | None = None
    terminal_receipt: "Receipt | None" = None
    acked_early: bool = False

    @property
    def worker(self) -> str:
        return self.settings.worker_name

    @property
    def log(self) -> JobLog:
        return JobLog(logging.getLogger(f"workers.{self.op}"), {"job_id": self.job_id, "op": self.op})

    @property
    def storage(self) -> Any:
        return self.resources.storage

    def update(self, message: _Message) -> "Receipt":
        """Publish a progress message (``<op>.update.<job_id>``)."""
        return self.outbox.emit("update", message)

    def result(self, message: _Message, *, message_id: str | None = None) -> "Receipt":
        """Publish the job's terminal message (``<op>.result.<job_id>`` or ``reply_to``)."""
        receipt = self.outbox.emit("result", message, message_id=message_id)
        if is_terminal(message):
            self.terminal, self.terminal_receipt = message, receipt
        return receipt

    def ack_now(self) -> None:
        """Acknowledge the delivery before the job ends (the job is recorded elsewhere)."""
        if not self.acked_early:
            self.acked_early = True
            self.ack_now_cb()


@dataclass
class Resources:
    """Long-lived things a worker process shares between its jobs."""

    settings: Settings
    storage: Any = None
    metrics: Metrics = field(default_factory=Metrics)
    extras: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Any, JobContext], None]
FailureFactory = Callable[[str, AIServiceError], _Message]


@dataclass(frozen=True)
class Operation:
    """One operation's wiring: request model, handler, failure message, concurrency."""

    name: str
    request_model: type[JobRequest]
    handler: Handler
    failure: FailureFactory
    #: Deliveries in flight at once (basic_qos prefetch and handler threads).
    prefetch: int = 1
    #: Called once in the worker process before consuming (load libraries, warm up).
    setup: Callable[[Resources], None] | None = None
    #: Called (on a helper thread) for every cancel seen on the control exchange.
    on_cancel: Callable[[str, Resources], None] | None = None
    #: How its deliveries settle: held to the end, or acked once the job is recorded.
    settle: SettleMode = SettleMode.AT_END
