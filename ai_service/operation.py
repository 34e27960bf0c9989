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
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import JobRequest, _Message, is_terminal
from ai_service.metrics import Metrics

if TYPE_CHECKING:
    from ai_service.publisher import Receipt
    from ai_service.storage import Storage

StateT = TypeVar("StateT")


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
    def storage(self) -> Storage:
        """The worker's storage (:meth:`Resources.require_storage`)."""
        return self.resources.require_storage()

    def state(self, kind: type[StateT]) -> StateT:
        """The operation's own state (what its setup built), typed; a bug when setup did not build one."""
        state = self.resources.state_as(kind)
        if state is None:
            raise RuntimeError(f"{self.op}: no {kind.__name__} (the operation's setup did not run)")
        return state

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


class DeviceInfo(Protocol):
    """The compute device an operation's setup picked: a ``torch.device``, typed without torch."""

    @property
    def type(self) -> str:
        """``cpu`` or ``cuda``."""

    @property
    def index(self) -> int | None:
        """The device index among the visible ones (None: the default)."""


@runtime_checkable
class Answerer(Protocol):
    """An operation state that answers one request on the caller's thread (the inference
    service: the HTTP route shares it with the AMQP handlers)."""

    def handle(self, request: Any, ctx: JobContext) -> None:
        """Run ``request`` to its terminal message (``ctx.result``)."""


@dataclass
class Resources:
    """Long-lived things a worker process shares between its jobs.

    Typed slots rather than a dict of named extras: the operation's setup fills ``device``
    and ``state`` (its own dataclass, e.g. an ``InferenceState``), and readers get them
    typed through :meth:`state_as` / :meth:`answerer`.
    """

    settings: Settings
    #: None only in tests that build a consumer without storage.
    storage: Storage | None = None
    metrics: Metrics = field(default_factory=Metrics)
    #: The device the operation's setup picked (heartbeats report it); None before setup.
    device: DeviceInfo | None = None
    #: The operation's own state, built once by its setup; None before (or for none).
    state: object = None

    def require_storage(self) -> Storage:
        """The storage; a worker built without one has no business asking (a bug)."""
        if self.storage is None:
            raise RuntimeError("this worker has no storage (Resources.storage is None)")
        return self.storage

    def state_as(self, kind: type[StateT]) -> StateT | None:
        """The operation's state when it is a ``kind``, else None (setup has not built it)."""
        return self.state if isinstance(self.state, kind) else None

    def answerer(self) -> Answerer | None:
        """The operation's state when it answers requests directly (inference), else None."""
        return self.state if isinstance(self.state, Answerer) else None


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
