"""A worker process: settings -> logging -> publisher -> consumer, and rq's stop protocol.

The first SIGTERM (or Ctrl-C) is warm: stop taking messages, let the running handler
finish or hand its job back, flush the publisher, exit 0.  A second one forces: hand
unfinished deliveries back to the queue and exit 1 at once.  supervisord's
``stopwaitsecs`` is longer than the warm path needs.  A consumer that ends unasked (a
bug on its I/O thread) exits ``EXIT_CRASHED`` (70), which supervisord restarts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.consumer import Consumer
from ai_service.heartbeat import Heartbeat
from ai_service.metrics import HealthServer, Metrics
from ai_service.operation import Operation, Resources
from ai_service.publisher import Publisher
from ai_service.spool import SpoolLocked

log = logging.getLogger("ai_service.worker")

EXIT_OK = 0
EXIT_FORCED = 1
EXIT_CONFIG = 2
#: The consumer ended without being asked to (a bug on its I/O thread): not in
#: supervisord.conf's ``exitcodes``, so supervisord restarts the worker (70 = EX_SOFTWARE).
EXIT_CRASHED = 70

#: After a crash, how long running handlers get to end (a training job hands itself back).
CRASH_HANDLER_GRACE = 30.0

#: Longer than supervisord.conf's ``startsecs`` (5).
SUPERVISED_MIN_UPTIME = 6.0

#: How long a warm stop waits for the publisher to deliver what is queued.
PUBLISHER_DRAIN_SECONDS = 15.0


def spool_dir(settings: Settings) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.worker_name).strip("_") or "worker"
    return settings.work_dir / "spool" / safe


class StopSignals:
    """Counts SIGTERM/SIGINT: the first asks for a warm stop, the second forces."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.count = 0
        self.forced = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            log.warning("[RMQ] %s received: warm shutdown (finishing or handing back the running job); "
                        "send it again to force", name)
            self.consumer.request_stop()
        else:
            log.warning("[RMQ] %s received again: forced shutdown", name)
            self.forced.set()
            self.consumer.request_stop(force=True)


def make_resources(settings: Settings) -> Resources:
    from ai_service.storage import open_storage

    return Resources(settings=settings, storage=open_storage(settings))


def run_worker(settings: Settings, op: str, load: Callable[[Settings], Operation], *, supervised: bool = False) -> int:
    """Run one operation's worker until stopped; returns the process exit code.

    ``load`` builds the operation (importing its heavy libraries) only when messaging
    is enabled, so a disabled worker exits at once and supervisord leaves it be.
    """
    if not settings.enable_rabbitmq:
        log.warning("[RMQ] Messaging is disabled (ENABLE_RABBITMQ=false): the %s worker has nothing to do; exiting",
                    op)
        if supervised:
            # supervisord counts an exit before `startsecs` as a failed start and retries;
            # outlive it so that the exit is recorded as the expected, final one.
            time.sleep(SUPERVISED_MIN_UPTIME)
        return EXIT_OK
    operation = load(settings)
    insecure = settings.insecurity()
    if insecure:
        log.warning("[RMQ] ⚠️ Insecure RabbitMQ configuration (%s): fine for development, not for production",
                    insecure)
    resources = make_resources(settings)
    log.info("[Handler] %s worker %s, storage %s", operation.name, settings.worker_name,
             resources.storage.describe() if resources.storage is not None else "-")
    if operation.setup is not None:
        operation.setup(resources)
    topology = Topology(settings)
    metrics = resources.metrics
    from ai_service.publisher import failure_replacer  # an answer refused for good becomes the job's *_failed

    publisher = Publisher(settings, spool_dir=spool_dir(settings), topology=topology,
                          client_name=f"ai-service {operation.name} publisher ({settings.worker_name})",
                          on_state=lambda state: publisher_state(metrics, state),
                          replace=failure_replacer(settings, operation.name, operation.failure),
                          on_refused=lambda code, envelope, reason: metrics.publisher_refused.labels(code).inc())
    try:
        publisher.start()
    except SpoolLocked as exc:
        log.error("[RMQ] ❌ %s; give each worker process its own WORKER_NAME (or WORK_DIR)", exc)
        return EXIT_CONFIG
    consumer = Consumer(settings, operation, publisher, resources, topology)
    heartbeat = Heartbeat(settings, operation.name, publisher, consumer)  # worker.<state>.<name> beats
    heartbeat.start()
    health = start_health(settings, metrics, consumer, publisher)
    signals = StopSignals(consumer)
    signals.install()
    log.info("[RMQ] 🐰 Initializing RabbitMQ consumer...")
    consumer.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (consumer.started.is_set() or consumer.first_attempt_done.is_set()):
        time.sleep(0.05)
    log.info("[RMQ] 🚀 Started RabbitMQ consumer in background thread")
    while not consumer.join(0.5):
        pass
    if health is not None:
        health.stop()
    if signals.forced.is_set():
        publisher.stop(timeout=1.0)
        log.warning("[RMQ] Forced exit")
        return EXIT_FORCED
    if consumer.crashed is not None or not consumer.stop_requested:
        return crashed_exit(consumer, publisher)
    heartbeat.stop()  # its last beat says `stopped`
    publisher.stop(timeout=PUBLISHER_DRAIN_SECONDS)
    log.info("[RMQ] Worker stopped cleanly")
    return EXIT_OK


def crashed_exit(consumer: Consumer, publisher: Publisher) -> int:
    """The consumer ended unasked: let running handlers end, flush, exit EXIT_CRASHED."""
    why = repr(consumer.crashed) if consumer.crashed is not None else "no stop was requested"
    log.error("[RMQ] ❌ The consumer ended unexpectedly (%s); exiting with code %d so that the supervisor "
              "restarts the worker", why, EXIT_CRASHED)
    handlers_done = consumer.wait_handlers(CRASH_HANDLER_GRACE)
    publisher.stop(timeout=PUBLISHER_DRAIN_SECONDS)
    if not handlers_done:
        # A handler thread still runs and would hold the interpreter's exit: leave now.
        log.error("[RMQ] A handler is still running after %.0f s; exiting without waiting for it",
                  CRASH_HANDLER_GRACE)
        logging.shutdown()
        os._exit(EXIT_CRASHED)
    return EXIT_CRASHED


def publisher_state(metrics: Metrics, state: str) -> None:
    if state == "connected":
        metrics.publisher_connected.set(1)
    elif state == "reconnected":
        metrics.publisher_connected.set(1)
        metrics.reconnects.labels("publisher").inc()
    else:
        metrics.publisher_connected.set(0)


def start_health(settings: Settings, metrics: Metrics, consumer: Consumer, publisher: Publisher) -> HealthServer | None:
    """Serve /metrics, /healthz, /readyz when METRICS_PORT is set."""
    if settings.metrics_port is None:
        return None

    def ready() -> tuple[bool, str]:
        if not consumer.connected.is_set():
            return False, "consumer not connected to RabbitMQ"
        if not publisher.connected:
            return False, "publisher not connected to RabbitMQ"
        return True, "consuming" if consumer.consuming.is_set() else "connected (running a job)"

    server = HealthServer(settings.metrics_port, metrics, ready,
                          refresh=lambda: metrics.spool_depth.set(publisher.pending),
                          threads=settings.metrics_threads, max_connections=settings.metrics_max_connections,
                          request_timeout=settings.metrics_request_timeout)
    server.start()
    return server
