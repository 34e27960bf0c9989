"""OpenTelemetry traces across the message boundary (W3C ``traceparent`` in AMQP headers).

Off unless the standard variables ask for it: :func:`setup` installs an SDK
``TracerProvider`` exporting OTLP over HTTP/protobuf only when
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and not
with ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``.  The service name is
``OTEL_SERVICE_NAME`` (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``), else
``ai-service-<op>``; everything else (``OTEL_EXPORTER_OTLP_*`` headers, timeout,
compression, certificates, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``, span limits) is
read by the SDK itself.  Off means free: nothing of OpenTelemetry is imported, no
provider is installed (the API's global stays its proxy), no thread runs, and every
function here returns at once; messages then carry no ``traceparent``.

On, a request's ``traceparent`` / ``tracestate`` headers make the consume span
(``process <queue>``, ``SpanKind.CONSUMER``) a child of the BE's span; without them a job
starts a trace of its own.  Every message published inside a trace gets a
``publish <exchange>`` span (``SpanKind.PRODUCER``, ``messaging.*`` attributes, ended
when the broker confirmed it) and carries its context on in its own headers.  Spans
on other threads take their parent explicitly (:func:`current` on the job's thread).

Tracing never breaks a job: every call here catches its own failures and logs them
(once per kind); the SDK's exporter logs a collector that is down and drops the spans.

Layout: :mod:`.state` holds the tracer this process traces through (and the
once-per-kind failure log), :mod:`.sdk` turning it on from the environment,
:mod:`.spans` the :class:`Span` handle and starting spans, :mod:`.propagation` the
``traceparent`` headers, :mod:`.messaging` the consume and publish spans; every name
is importable from here, as it was when this was one module.
"""

from __future__ import annotations

from ai_service.tracing.messaging import consume, published, publishing
from ai_service.tracing.propagation import extract, inject
from ai_service.tracing.sdk import off_reason, setup, traces_endpoint
from ai_service.tracing.spans import NO_SPAN, Span, current, current_span, span, start, within
from ai_service.tracing.state import (
    INSTRUMENTATION_NAME,
    MESSAGING_SYSTEM,
    TRACEPARENT,
    TRACESTATE,
    _warned,
    configure,
    enabled,
    flush,
)

__all__ = [
    "INSTRUMENTATION_NAME",
    "MESSAGING_SYSTEM",
    "NO_SPAN",
    "TRACEPARENT",
    "TRACESTATE",
    "Span",
    "_warned",
    "configure",
    "consume",
    "current",
    "current_span",
    "enabled",
    "extract",
    "flush",
    "inject",
    "off_reason",
    "published",
    "publishing",
    "setup",
    "span",
    "start",
    "traces_endpoint",
    "within",
]
