"""Spans: the never-raising :class:`Span` handle, starting one, and the current context across threads."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ai_service.tracing import state
from ai_service.tracing.propagation import inject
from ai_service.tracing.state import TRACEPARENT, _warn_once

if TYPE_CHECKING:
    from opentelemetry.context import Context


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
    tracer = state._tracer
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
    if state._tracer is None:
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
    if state._tracer is None:
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
    if context is not None and state._tracer is not None:
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
