"""A stub runtime (Dramatiq's StubBroker): long-job logic without a broker.

:class:`StubRuntime` hands out :class:`~ai_service.operation.JobContext` objects whose
outbox is a :class:`StubOutbox`: every publish is recorded (answers, updates, lease
messages, hand-backs, delayed retries, dead letters) and its receipt is settled at once.
Copies of the request wait in :attr:`StubRuntime.held` until a test delivers them again
(:meth:`StubRuntime.redeliver`), which is what the lease holding queue does after their
TTL.  Storage is whatever the test passes (a ``LocalStorage`` in a temporary directory).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ai_service.config import Settings
from ai_service.jobs.records import LEASE_HEADER
from ai_service.messages import _Message
from ai_service.operation import DeliveryInfo, JobContext, Resources
from ai_service.publisher import Receipt


def settled_receipt(message_id: str | None = None) -> Receipt:
    """A receipt the broker has confirmed already."""
    receipt = Receipt(message_id or "stub")
    receipt._set()
    return receipt


@dataclass(frozen=True)
class Sent:
    """One thing a job published through its outbox."""

    #: ``update``, ``result``, ``lease``, ``resubmit``, ``retry_later`` or ``dead_letter``.
    kind: str
    payload: dict[str, Any] | None = None
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    delay_ms: int | None = None

    @property
    def type(self) -> str:
        return str((self.payload or {}).get("type", ""))


@dataclass
class StubOutbox:
    """Records what one delivery's handler publishes; implements ``Outbox``."""

    runtime: StubRuntime
    info: DeliveryInfo

    def _record(self, sent: Sent) -> Receipt:
        self.runtime.record(sent, self.info)
        return settled_receipt(sent.message_id)

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> Receipt:
        return self._record(Sent(kind, message.to_json_dict(), message_id))

    def republish(self, kind: str, payload: dict[str, Any], message_type: str, message_id: str | None) -> Receipt:
        return self._record(Sent(kind, payload, message_id))

    def lease(self, token: str, ttl_ms: int) -> Receipt:
        return self._record(Sent("lease", headers={LEASE_HEADER: token}, delay_ms=ttl_ms))

    def resubmit(self) -> Receipt:
        return self._record(Sent("resubmit", delay_ms=0))

    def retry_later(self, delay_ms: int, *, deliveries: int = 0) -> Receipt:
        return self._record(Sent("retry_later", delay_ms=delay_ms, headers={"deliveries": deliveries}))

    def dead_letter(self) -> Receipt:
        return self._record(Sent("dead_letter"))


class StubRuntime:
    """An in-memory broker for one operation's long jobs."""

    def __init__(self, settings: Settings, storage: Any, *, op: str = "train") -> None:
        self.settings = settings
        self.resources = Resources(settings=settings, storage=storage)
        self.op = op
        self.sent: list[Sent] = []
        #: Request copies waiting to come back (lease messages, hand-backs, retries).
        self.held: list[tuple[Sent, DeliveryInfo]] = []
        self.acks = 0
        self._lock = threading.Lock()

    def record(self, sent: Sent, info: DeliveryInfo) -> None:
        with self._lock:
            self.sent.append(sent)
            if sent.kind in ("lease", "resubmit", "retry_later"):
                self.held.append((sent, info))

    def context(self, body: dict[str, Any], *, headers: dict[str, Any] | None = None,
                delivery_count: int = 0) -> JobContext:
        """The context a handler gets for a delivery of ``body``."""
        info = DeliveryInfo(redelivered=False, delivery_count=delivery_count, reply_to=None,
                            correlation_id=None, headers=dict(headers or {}),
                            body=json.dumps(body).encode())
        return JobContext(op=self.op, job_id=str(body["job_id"]), settings=self.settings, resources=self.resources,
                         delivery=info, outbox=StubOutbox(self, info), ack_now_cb=self._ack)

    def _ack(self) -> None:
        with self._lock:
            self.acks += 1

    def redeliver(self, kind: str) -> JobContext:
        """Deliver the oldest held copy of ``kind`` again (its TTL ran out), as the broker would."""
        with self._lock:
            index = next(i for i, (sent, _) in enumerate(self.held) if sent.kind == kind)
            sent, info = self.held.pop(index)
        headers = {k: v for k, v in info.headers.items() if k != LEASE_HEADER}
        if sent.kind == "lease":
            headers.update(sent.headers)
        return self.context(json.loads(info.body), headers=headers)

    def of(self, kind: str) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.kind == kind]

    def terminals(self) -> list[Sent]:
        """Every ``result`` published (a job must end with exactly one message id)."""
        return self.of("result")
