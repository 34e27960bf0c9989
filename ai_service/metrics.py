"""Prometheus metrics and health endpoints of one worker process.

Every worker has a :class:`Metrics` (its own registry, no global state); with
``METRICS_PORT`` set it is served on ``/metrics`` beside ``/healthz`` (the process is
alive) and ``/readyz`` (connected to the broker and able to take or run work).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("ai_service.metrics")

#: consumer state gauge values
DISCONNECTED, CONNECTED, CONSUMING = 0, 1, 2


class Metrics:
    """The worker's instruments; cheap enough to exist whether served or not."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("ai_jobs_total", "Jobs handled, by operation and final status", ["op", "status"],
                            registry=r)
        self.job_seconds = Histogram(
            "ai_job_duration_seconds", "Wall time from delivery to settle", ["op"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
        )
        self.epoch_seconds = Histogram(
            "ai_epoch_duration_seconds", "Training epoch duration", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.inference_seconds = Histogram(
            "ai_inference_latency_seconds", "Inference request latency (decode to answer)", registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.batch_size = Histogram("ai_inference_batch_size", "Images per predict call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.model_cache = Counter("ai_model_cache_total", "Model cache lookups", ["result"], registry=r)
        self.spool_depth = Gauge("ai_publisher_spool_messages", "Messages waiting for a broker confirm",
                                 registry=r)
        self.reconnects = Counter("ai_broker_reconnects_total", "Reconnections to RabbitMQ", ["component"],
                                  registry=r)
        self.consumer_state = Gauge("ai_consumer_state", "0 disconnected, 1 connected (paused), 2 consuming",
                                    registry=r)
        self.publisher_connected = Gauge("ai_publisher_connected", "1 when the publisher is connected",
                                         registry=r)
        self.publisher_refused = Counter(
            "ai_publisher_refused_total",
            "Messages not published because they were larger than MAX_MESSAGE_BYTES or the broker refused "
            "them for good (reason: too_large, precondition_failed, nacked)",
            ["reason"], registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread."""

    def __init__(self, port: int, metrics: Metrics, ready: Callable[[], tuple[bool, str]],
                 refresh: Callable[[], None] | None = None, host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.ready = ready
        self.refresh = refresh or (lambda: None)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    outer.refresh()
                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok, why = outer.ready()
                    self._send(200 if ok else 503, (why + "\n").encode())
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("[RMQ] Metrics and health on :%d (/metrics, /healthz, /readyz)", self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
