"""The HTTP-only worker (``ENABLE_RABBITMQ=false`` with ``HTTP_PORT`` set).

:func:`serve_http_only` serves the API and runs its jobs in this process through
:class:`~ai_service.http.outbox.local.LocalJobs`; FastAPI and uvicorn are imported on
the call only.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ai_service.config import Settings
from ai_service.http.outbox.local import LocalJobs
from ai_service.operation import Resources
from ai_service.registry import OPERATIONS, Registry

log = logging.getLogger("ai_service.http")


def serve_http_only(settings: Settings, op: str, load: Any, *, operations: Registry = OPERATIONS) -> int:
    """``ENABLE_RABBITMQ=false`` with ``HTTP_PORT`` set: serve the API and run its jobs here.

    The first SIGTERM/SIGINT stops warmly (a running job hands itself back and is
    resumed on the next start), a second one exits 1 at once.
    """
    import signal

    from ai_service.http.app import create_app, routers_for
    from ai_service.http.server import HttpServer
    from ai_service.storage import open_storage

    operation = load(settings)
    resources = Resources(settings=settings, storage=open_storage(settings))
    if operation.setup is not None:
        operation.setup(resources)
    local = LocalJobs(settings, operation, resources) if operations[op].recorded else None
    routers = routers_for(op, settings, resources, local=local, operations=operations)

    def ready() -> tuple[bool, str]:
        if local is not None and local.busy:
            return True, "HTTP-only (ENABLE_RABBITMQ=false): running a job"
        return True, "HTTP-only (ENABLE_RABBITMQ=false): idle"

    metrics = resources.metrics
    app = create_app(settings, metrics=metrics, ready=ready, routers=routers)
    assert settings.http_port is not None
    server = HttpServer(app, settings.http_host, settings.http_port, limit_concurrency=settings.metrics_max_connections,
                        timeout_keep_alive=settings.metrics_request_timeout,
                        request_timeout=settings.metrics_request_timeout, metrics=metrics)
    stop = threading.Event()
    count = [0]

    def handle(signum: int, frame: Any) -> None:
        count[0] += 1
        if count[0] > 1:
            log.warning("[HTTP] %s received again: forced exit", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(1)
        log.warning("[HTTP] %s received: warm shutdown (the running job hands itself back)",
                    signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    server.start()
    log.warning("[HTTP] Messaging is disabled (ENABLE_RABBITMQ=false): HTTP-only %s worker on http://%s:%d; "
                "jobs' messages go to %s", operation.name, settings.http_host, server.port,
                local.root if local is not None else "the HTTP answers")
    if local is not None:
        local.resume_unfinished()
    while not stop.wait(0.5):
        pass
    if local is not None:
        local.stop()
    server.stop()
    log.info("[HTTP] Worker stopped cleanly")
    return 0
