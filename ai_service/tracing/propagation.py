"""W3C trace context (``traceparent`` / ``tracestate``) in AMQP message headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ai_service.tracing import state
from ai_service.tracing.state import TRACEPARENT, TRACESTATE, _warn_once

if TYPE_CHECKING:
    from opentelemetry.context import Context


def _header_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The remote parent named by ``traceparent``/``tracestate`` in AMQP ``headers``: an
    empty context (a new trace) without them; None when tracing is off."""
    if state._tracer is None:
        return None
    try:
        from opentelemetry.context import Context as OtelContext
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {}
        for key in (TRACEPARENT, TRACESTATE):
            text = _header_text((headers or {}).get(key))
            if text is not None:
                carrier[key] = text
        return TraceContextTextMapPropagator().extract(carrier, context=OtelContext())
    except Exception:  # noqa: BLE001
        _warn_once("extract")
        return None


def inject(headers: dict[str, Any], context: Context | None = None) -> dict[str, Any]:
    """Write ``context``'s (default: the current) ``traceparent``/``tracestate`` into
    ``headers`` (replacing what was there); returns ``headers``."""
    if state._tracer is None:
        return headers
    try:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=context)
        if carrier.get(TRACEPARENT):
            headers.pop(TRACESTATE, None)
            headers.update(carrier)
    except Exception:  # noqa: BLE001
        _warn_once("inject")
    return headers
