"""The messaging spans: consuming one delivery (CONSUMER) and publishing one message (PRODUCER)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ai_service.tracing import state
from ai_service.tracing.propagation import extract
from ai_service.tracing.spans import NO_SPAN, Span, start
from ai_service.tracing.state import MESSAGING_SYSTEM


def consume(queue: str, headers: Mapping[str, Any] | None, *, op: str, correlation_id: str | None,
            redelivered: bool, delivery_count: int, body_size: int) -> Span:
    """The span of taking one delivery: a CONSUMER child of the request's ``traceparent``
    (a new trace without one), current on this thread until ended."""
    if state._tracer is None:
        return NO_SPAN
    return start(f"process {queue}", parent=extract(headers), kind="consumer", attach=True, attributes={
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.body.size": body_size,
        "messaging.rabbitmq.message.redelivered": redelivered,
        "ai.operation": op,
        "ai.delivery_count": delivery_count,
    })


def publishing(exchange: str, routing_key: str, *, message_type: str, message_id: str,
               correlation_id: str | None, body_size: int) -> Span:
    """The PRODUCER span of one publish inside a trace (none outside one: heartbeats);
    :meth:`Span.inject` puts its context in the message's headers."""
    if state._tracer is None:
        return NO_SPAN
    destination = exchange or "amq.default"
    return start(f"publish {destination}", kind="producer", only_in_trace=True, attributes={
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": destination,
        "messaging.rabbitmq.destination.routing_key": routing_key,
        "messaging.message.id": message_id,
        "messaging.message.conversation_id": correlation_id,
        "messaging.message.body.size": body_size,
        "ai.message.type": message_type,
    })


def published(span: Span, *, unroutable: bool, refused_reason: str | None, replaced: bool) -> None:
    """End a publish span when its message is settled (confirmed, or given up)."""
    if span is NO_SPAN:
        return
    span.set("ai.publish.outcome", "unroutable" if unroutable else "refused" if refused_reason else "confirmed")
    span.set("ai.publish.replaced", replaced or None)
    if refused_reason:
        span.fail(refused_reason)
    span.end()
