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
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer, TracerProvider

log = logging.getLogger("ai_service.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION_NAME = "ai_service"
MESSAGING_SYSTEM = "rabbitmq"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_warned: set[str] = set()


# --- turning it on ----------------------------------------------------------------------


def off_reason(env: Mapping[str, str]) -> str | None:
    """Why tracing stays off under ``env``, or None when it is to be on."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "OTEL_SDK_DISABLED=true"
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if "none" in exporters:
        return "OTEL_TRACES_EXPORTER=none"
    if exporters and "otlp" not in exporters:
        return f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')}: only the otlp exporter is installed"
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return "no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    return None


def traces_endpoint(env: Mapping[str, str]) -> str:
    """Where the OTLP/HTTP exporter sends spans (as it resolves it), without any userinfo."""
    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or ""
    if not url:
        url = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/") + "/v1/traces"
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def setup(op: str, *, worker: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Install the SDK provider and OTLP/HTTP exporter when ``env`` (default: the
    process environment) asks for tracing; True when it is on.  Never raises."""
    env = os.environ if env is None else env
    why = off_reason(env)
    if why is not None:
        log.info("[Tracing] Off (%s)", why)
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(name, "").strip()
            if protocol and protocol != "http/protobuf":
                log.warning("[Tracing] %s=%s is not supported (only http/protobuf is installed); exporting over "
                            "HTTP/protobuf", name, protocol)
                break
        resource = _resource(op, worker)
        provider = SdkTracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, default parent-based
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        configure(provider)
    except Exception:  # tracing must never stop a worker
        log.warning("[Tracing] Could not set up OpenTelemetry; going on without traces", exc_info=True)
        return False
    log.info("[Tracing] Exporting traces over OTLP/HTTP to %s as service %s", traces_endpoint(env),
             resource.attributes.get("service.name"))
    return True


def _resource(op: str, worker: str | None) -> Any:
    from opentelemetry.sdk.resources import Resource

    found = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    attributes: dict[str, Any] = dict(found.attributes)
    if str(attributes.get("service.name", "")).startswith("unknown_service"):
        attributes["service.name"] = f"ai-service-{op}"
    attributes.setdefault("service.version", _version())
    if worker:
        attributes.setdefault("service.instance.id", f"{worker}/{op}")
    return Resource(attributes, found.schema_url)


def configure(provider: TracerProvider | None) -> None:
    """Trace through ``provider`` from now on (tests: an SDK provider with an in-memory
    exporter); None turns tracing off again.  The API's global provider is left alone."""
    global _tracer, _provider
    if provider is None:
        _tracer = _provider = None
        return
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version())


def _version() -> str:
    try:
        return importlib.metadata.version("ai-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_s: float = 5.0) -> None:
    """Export what is buffered (the SDK also does it at exit)."""
    provider = _provider
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        try:
            force_flush(int(timeout_s * 1000))
        except Exception:  # noqa: BLE001
            _warn_once("flush")


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("[Tracing] %s failed; the job goes on (further %s failures are logged at debug level)",
                    what, what, exc_info=True)
    else:
        log.debug("[Tracing] %s failed", what, exc_info=True)


# --- spans ------------------------------------------------------------------------------


class Span:
    """A started span, or none at all (tracing off, or outside a trace): every method is
    safe to call either way and never raises."""

    __slots__ = ("_span", "_token", "context")

    def __init__(self, span: Any = None, context: Context | None = None, token: Any = None) -> None:
        self._span = span
        self._token = token
        #: The OpenTelemetry context with this span in it: the parent for spans elsewhere.
        self.context = context

    @property
    def recording(self) -> bool:
        return self._span is not None and bool(self._span.is_recording())

    def set(self, key: str, value: Any) -> None:
        if self._span is not None and value is not None:
            try:
                self._span.set_attribute(key, value)
            except Exception:  # noqa: BLE001
                _warn_once("set_attribute")

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set(key, value)

    def fail(self, error: BaseException | str) -> None:
        """Mark the span failed (an exception is recorded as an event)."""
        if self._span is None:
            return
        try:
            from opentelemetry.trace import Status, StatusCode

            code = getattr(error, "error_code", None)
            if isinstance(error, BaseException):
                self._span.record_exception(error)
                text = f"{type(error).__name__}: {error}"
                self._span.set_attribute("error.type", str(code or type(error).__qualname__))
            else:
                text = error
            self._span.set_status(Status(StatusCode.ERROR, text[:500]))
        except Exception:  # noqa: BLE001
            _warn_once("set_status")

    def inject(self, headers: dict[str, Any] | None) -> dict[str, Any] | None:
        """``headers`` with this span's ``traceparent`` (and ``tracestate``) in a copy;
        ``headers`` itself when there is no span, or when they name a trace already: a
        request the worker puts back (lease, hand-back, dead-letter) stays in the trace of
        its first delivery, so a job's lease checks are siblings, not an ever-deeper chain."""
        if self._span is None or self.context is None or (headers and headers.get(TRACEPARENT)):
            return headers
        return inject(dict(headers or {}), self.context)

    def end(self, error: BaseException | None = None) -> None:
        """End the span (once); leaves its context if it was entered."""
        span, token, self._span, self._token = self._span, self._token, None, None
        if span is None:
            return
        try:
            if token is not None:
                from opentelemetry import context as otel_context

                otel_context.detach(token)
            if error is not None:
                Span(span).fail(error)
            span.end()
        except Exception:  # noqa: BLE001
            _warn_once("end")


NO_SPAN = Span()

_KINDS = ("internal", "consumer", "producer", "client", "server")


def start(
    name: str,
    *,
    parent: Context | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Context | None] = (),
    attach: bool = False,
    only_in_trace: bool = False,
) -> Span:
    """Start a span, a child of ``parent`` (an OpenTelemetry context, e.g. from
    :func:`current` or :func:`extract`) or of the current context; linked to each of
    ``links``.  ``attach``: make it current on this thread until :meth:`Span.end` (which
    must then be called on this thread).  ``only_in_trace``: no span unless the parent
    is part of a trace.  End it with :meth:`Span.end`."""
    tracer = _tracer
    if tracer is None:
        return NO_SPAN
    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        if only_in_trace and not trace.get_current_span(parent).get_span_context().is_valid:
            return NO_SPAN
        linked = []
        for ctx in links:
            if ctx is not None:
                span_context = trace.get_current_span(ctx).get_span_context()
                if span_context.is_valid:
                    linked.append(trace.Link(span_context))
        span = tracer.start_span(name, context=parent, kind=trace.SpanKind[kind.upper()],
                                 attributes=_attributes(attributes), links=linked)
        context = trace.set_span_in_context(span, parent)
        token = otel_context.attach(context) if attach else None
        return Span(span, context, token)
    except Exception:  # noqa: BLE001 - tracing must never break a job
        _warn_once("start_span")
        return NO_SPAN


@contextmanager
def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Context | None] = (),
) -> Iterator[Span]:
    """``with tracing.span("name"):`` -- a current span for the block; an exception
    leaving the block marks it failed (and goes on)."""
    started = start(name, parent=parent, kind=kind, attributes=attributes, links=links, attach=True)
    try:
        yield started
    except BaseException as exc:
        started.end(exc)
        raise
    started.end()


def _attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def current() -> Context | None:
    """This thread's context, to parent spans on another thread (None when off)."""
    if _tracer is None:
        return None
    try:
        from opentelemetry import context as otel_context

        return otel_context.get_current()
    except Exception:  # noqa: BLE001
        _warn_once("get_current")
        return None


class _Current(Span):
    """:func:`current_span` must not end a span it did not start."""

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.fail(error)


def current_span() -> Span:
    """The current span (to add attributes to), or none."""
    if _tracer is None:
        return NO_SPAN
    try:
        from opentelemetry import trace

        found = trace.get_current_span()
        return _Current(found, trace.set_span_in_context(found)) if found.is_recording() else NO_SPAN
    except Exception:  # noqa: BLE001
        _warn_once("get_current_span")
        return NO_SPAN


@contextmanager
def within(context: Context | None) -> Iterator[None]:
    """Make ``context`` current for the block unless this thread is in a trace already
    (a job's publishes from threads of its own, e.g. the lease timer)."""
    token = None
    if context is not None and _tracer is not None:
        try:
            from opentelemetry import context as otel_context
            from opentelemetry import trace

            if not trace.get_current_span().get_span_context().is_valid:
                token = otel_context.attach(context)
        except Exception:  # noqa: BLE001
            _warn_once("attach")
    try:
        yield
    finally:
        if token is not None:
            try:
                from opentelemetry import context as otel_context

                otel_context.detach(token)
            except Exception:  # noqa: BLE001
                _warn_once("detach")


# --- propagation (W3C trace context in AMQP headers) ------------------------------------


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
    if _tracer is None:
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
    if _tracer is None:
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


# --- the messaging spans ----------------------------------------------------------------


def consume(queue: str, headers: Mapping[str, Any] | None, *, op: str, correlation_id: str | None,
            redelivered: bool, delivery_count: int, body_size: int) -> Span:
    """The span of taking one delivery: a CONSUMER child of the request's ``traceparent``
    (a new trace without one), current on this thread until ended."""
    if _tracer is None:
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
    if _tracer is None:
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
