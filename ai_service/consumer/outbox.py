"""The delivery outbox: everything a handler publishes for one delivery.

Answers and updates go to the events exchange (or ``reply_to``); copies of the request
(a lease message, a job handed back, a delayed retry, a dead letter) keep its body,
properties and trace.  All of it goes through the shared, spooled :class:`Publisher`.
"""

from __future__ import annotations

from typing import Any

from ai_service import tracing
from ai_service.broker import QueueNames, routing_key
from ai_service.config import Settings
from ai_service.consumer.tracker import DELIVERY_COUNT_HEADER
from ai_service.jobs.records import LEASE_HEADER
from ai_service.message_ids import message_id_of
from ai_service.messages import _Message, json_bytes
from ai_service.operation import DeliveryInfo
from ai_service.publisher import Publisher, Receipt


class DeliveryOutbox:
    """Everything a handler publishes for one delivery goes through the shared publisher."""

    def __init__(self, publisher: Publisher, settings: Settings, names: QueueNames, job_id: str,
                 info: DeliveryInfo) -> None:
        self.publisher = publisher
        self.settings = settings
        self.names = names
        self.op = names.op
        self.job_id = job_id
        self.info = info
        #: The publisher keeps this job's messages in order, whatever correlation_id the BE chose.
        self.order_key = f"{self.op}/{job_id}" if job_id else None
        #: The job's trace context (its consume span), for publishes from other threads.
        self.trace = tracing.current()

    def _correlation(self) -> str:
        return self.info.correlation_id or self.job_id

    #: The last ``progress`` this job published (read by :meth:`Consumer.current_jobs`).
    progress: float | None = None

    def emit(self, kind: str, message: _Message, *, message_id: str | None = None) -> Receipt:
        progress = getattr(message, "progress", None)
        self.progress = float(progress) if isinstance(progress, (int, float)) else self.progress
        message_type = str(getattr(message, "type", ""))
        # Derived from the job: the copy a redelivery, a resume or another worker sends
        # (an inference answer after a broker restart, epoch N again) has the same id.
        message_id = message_id or message_id_of(self.op, self.job_id, message)
        # Straight to bytes: an answer's detections are not built as dicts first.
        return self._send(kind, message.to_json_bytes(), message_type, message_id)

    def republish(
        self, kind: str, payload: dict[str, Any], message_type: str, message_id: str | None
    ) -> Receipt:
        # The bytes emit() would have sent: a replayed NaN metric is null, as the first time.
        return self._send(kind, json_bytes(payload), message_type, message_id)

    def _send(self, kind: str, body: bytes, message_type: str, message_id: str | None) -> Receipt:
        if kind == "result" and self.info.reply_to:
            exchange, key = "", self.info.reply_to
        else:
            exchange, key = self.settings.events_exchange, routing_key(self.op, kind, self.job_id)
        with tracing.within(self.trace):
            return self.publisher.publish(
                exchange, key, body, message_type=message_type, correlation_id=self._correlation(),
                message_id=message_id, order_key=self.order_key,
            )

    def _request(self, exchange: str, key: str, *, keep_lease: bool = True, **extra: Any) -> Receipt:
        """A copy of the request: its own headers (never the broker's ``x-`` ones) and ``extra``."""
        headers = {k: v for k, v in self.info.headers.items()
                   if not k.startswith("x-") or (keep_lease and k == LEASE_HEADER)}
        headers.update(extra.pop("headers", {}))
        with tracing.within(self.trace):
            return self.publisher.publish(
                exchange, key, self.info.body, message_type="request", correlation_id=self.info.correlation_id,
                headers=headers or None, order_key=self.order_key, **extra,
            )

    def lease(self, token: str, ttl_ms: int) -> Receipt:
        return self._request("", self.names.lease, headers={LEASE_HEADER: token}, expiration=str(ttl_ms))

    def resubmit(self) -> Receipt:
        return self._request("", self.names.request, keep_lease=False)

    def retry_later(self, delay_ms: int, *, deliveries: int = 0) -> Receipt:
        """A new try of the job (no lease header) that comes back into the request queue
        after ``delay_ms``, through the holding queue as lease messages do."""
        return self._delayed(delay_ms, deliveries, keep_lease=False)

    def _delayed(self, delay_ms: int, deliveries: int, *, keep_lease: bool) -> Receipt:
        headers = {DELIVERY_COUNT_HEADER: deliveries} if deliveries else {}
        return self._request("", self.names.lease, keep_lease=keep_lease, headers=headers,
                             expiration=str(max(1, delay_ms)))

    def dead_letter(self) -> Receipt:
        return self._request(self.settings.dead_letter_exchange, self.names.request)
