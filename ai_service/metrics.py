"""Prometheus metrics of one worker process.

Every worker has a :class:`Metrics` (its own registry, no global state); with
``HTTP_PORT`` or ``METRICS_PORT`` set the worker's HTTP server (``ai_service.http``)
serves it on ``/metrics`` beside ``/healthz`` (the process is alive) and ``/readyz``
(connected to the broker and able to take or run work).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

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
        self.broker_node = Gauge(
            "ai_broker_node_info",
            "1 for the RabbitMQ node (of RABBITMQ_HOST) each component's connection is on now",
            ["component", "node"], registry=r,
        )
        self._broker_nodes: dict[str, str] = {}
        self.publisher_connected = Gauge("ai_publisher_connected", "1 when the publisher is connected",
                                         registry=r)
        self.control_messages = Counter(
            "ai_control_messages_total",
            "Control messages seen: queued for the cancel hook, duplicate (already waiting), dropped (control "
            "queue full), malformed, no_hook",
            ["result"], registry=r,
        )
        self.retries_republished = Counter(
            "ai_retries_republished_total",
            "Copies of a request republished with its delivery count (classic queues: a retry, or a redelivery "
            "after a worker died), the original acked",
            ["op"], registry=r,
        )
        self.http_connections_closed = Counter(
            "ai_http_connections_closed_total",
            "HTTP connections closed by the server without an answer: full (too many open), timeout "
            "(no complete request in time), too_large (request head over the limit)",
            ["reason"], registry=r,
        )
        self.publisher_refused = Counter(
            "ai_publisher_refused_total",
            "Messages not published because they were larger than MAX_MESSAGE_BYTES or the broker refused "
            "them for good (reason: too_large, precondition_failed, nacked)",
            ["reason"], registry=r,
        )

    def on_broker_node(self, component: str, node: str) -> None:
        """``component`` (consumer, publisher) is connected to ``node`` now: one series
        per component, so a move to another node replaces the old one."""
        old = self._broker_nodes.get(component)
        if old is not None and old != node:
            self.broker_node.remove(component, old)
        self._broker_nodes[component] = node
        self.broker_node.labels(component, node).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
