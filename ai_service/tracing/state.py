"""The tracer this process traces through, and the log of tracing's own failures.

Every other module of the package reads ``state._tracer`` at call time (None: tracing
is off), so :func:`configure` is the one place that turns it on or off.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

log = logging.getLogger("ai_service.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION_NAME = "ai_service"
MESSAGING_SYSTEM = "rabbitmq"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_warned: set[str] = set()


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
