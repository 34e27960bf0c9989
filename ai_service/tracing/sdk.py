"""Turning tracing on: the standard ``OTEL_*`` switches, the SDK provider and its OTLP/HTTP exporter."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ai_service.tracing.state import _version, configure

log = logging.getLogger("ai_service.tracing")  # the package's one logger (state.log)


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
