"""The worker's HTTP server: health, metrics and the operation's ``/v1`` routes
(README "HTTP").  Apart from :mod:`ai_service.worker` because it only wires the HTTP
package to a running consumer and publisher."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ai_service.config import Settings
from ai_service.consumer import Consumer
from ai_service.metrics import Metrics
from ai_service.operation import Resources
from ai_service.publisher import Publisher

if TYPE_CHECKING:
    from ai_service.http.server import HttpServer

log = logging.getLogger("ai_service.worker")


def start_health(settings: Settings, metrics: Metrics, consumer: Consumer, publisher: Publisher,
                 resources: Resources | None = None, op: str | None = None) -> HttpServer | None:
    """The worker's HTTP server (README "HTTP"), or None when neither port is set.

    ``HTTP_PORT``: health, metrics and ``op``'s ``/v1`` routes on ``HTTP_HOST``; with
    ``METRICS_PORT`` set too, the same server also serves health and metrics (no ``/v1``)
    on all interfaces there.  ``METRICS_PORT`` alone: health and metrics only, on all
    interfaces, as before ``HTTP_PORT`` existed.
    """
    if settings.http_port is None and settings.metrics_port is None:
        return None
    from ai_service.http.app import create_app, routers_for
    from ai_service.http.server import HttpServer

    def ready() -> tuple[bool, str]:
        if not consumer.connected.is_set():
            return False, "consumer not connected to RabbitMQ"
        if not publisher.connected:
            return False, "publisher not connected to RabbitMQ"
        return True, "consuming" if consumer.consuming.is_set() else "connected (running a job)"

    api = settings.http_port is not None
    routers = routers_for(op, settings, resources, consumer=consumer, publisher=publisher,
                          operations=consumer.topology.operations) \
        if api and op is not None and resources is not None else []
    app = create_app(settings, metrics=metrics, ready=ready, routers=routers,
                     refresh=lambda: metrics.spool_depth.set(publisher.pending))
    extra: list[tuple[str, int]] = []
    if settings.http_port is not None:
        host, port = settings.http_host, settings.http_port
        if settings.metrics_port is not None and settings.metrics_port != settings.http_port:
            extra.append(("0.0.0.0", settings.metrics_port))
    else:
        assert settings.metrics_port is not None
        host, port = "0.0.0.0", settings.metrics_port
    server = HttpServer(app, host, port, limit_concurrency=settings.metrics_max_connections,
                        timeout_keep_alive=settings.metrics_request_timeout,
                        request_timeout=settings.metrics_request_timeout, metrics=metrics, extra=extra)
    if extra or not api:
        app.state.api_ports = frozenset({server.port} if api else ())
    server.start()
    where = f"http://{host}:{server.port}" + (f" (health and metrics also on :{server.ports[1]})" if extra else "")
    served = "/v1, " if api and routers and settings.http_api_allowed else ""
    log.info("[HTTP] Serving %s%s on %s", served, "/metrics, /healthz, /readyz", where)
    return server
