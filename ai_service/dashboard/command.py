"""``ai-service dashboard [--port 8080]``: the dashboard process (BE side: no torch).

Parsing is cheap; the web stack is imported only when the command runs, so the other
subcommands do not pay for it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

from ai_service.config import Settings

log = logging.getLogger("ai_service.dashboard")

DEFAULT_PORT = 8080


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``dashboard`` to the ``ai-service`` subcommands."""
    p = sub.add_parser(
        "dashboard", help="serve the live dashboard (workers, jobs, training curves, queues)", formatter_class=fmt,
        description="Serve one web page with every worker (from heartbeats), every job with its live\n"
        "epoch-metrics charts, and the request queues and dead-letter queues (replay, cancel).\n"
        "It binds a queue of its own to EVENTS_EXCHANGE with '#' (the BE's queues lose nothing)\n"
        "and starts from the job records in storage. HTTP_TOKEN, when set, guards the data and\n"
        "the buttons exactly as it guards a worker's /v1 routes.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--host", default=None, help="address to listen on (default HTTP_HOST, 127.0.0.1)")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    """Run the dashboard until SIGTERM or SIGINT."""
    from ai_service.dashboard.app import create_dashboard_app
    from ai_service.dashboard.feed import Actions, Feed
    from ai_service.dashboard.state import DashboardState, load_records
    from ai_service.http.server import HttpServer
    from ai_service.logs import setup_logging

    settings = replace(settings.for_program("dashboard"), http_host=args.host or settings.http_host,
                       http_port=args.port)
    setup_logging(settings, op="dashboard")
    storage = _storage(settings)
    state = DashboardState()

    def rebuild() -> None:
        if storage is not None:
            count = load_records(state, storage, settings.jobs_prefix)
            log.info("[Dashboard] %d job record(s) read from %s", count, storage.describe())

    app = create_dashboard_app(settings, state, Actions(settings, storage))
    try:
        server = HttpServer(app, settings.http_host, args.port)
    except OSError as exc:
        print(f"ai-service: cannot listen on {settings.http_host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    feed = Feed(settings, state, rebuild=rebuild)
    server.start()
    feed.start()
    host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host
    print(f"dashboard: http://{host}:{server.port}/", flush=True)
    _wait_for_signal()
    feed.stop()
    server.stop()
    return 0


def _storage(settings: Settings) -> Any:
    from ai_service.errors import AIServiceError
    from ai_service.storage import open_storage

    try:
        return open_storage(settings)
    except (AIServiceError, ValueError) as exc:
        log.warning("[Dashboard] No storage (%s): no job records at start, cancels not recorded", exc)
        return None


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(1.0):
        pass
