"""A worker process: settings -> logging -> publisher -> consumer, and rq's stop protocol.

The first SIGTERM (or Ctrl-C) is warm: stop taking messages, let the running handler
finish or hand its job back, flush the publisher, exit 0.  A second one forces: hand
unfinished deliveries back to the queue and exit 1 at once.  supervisord's
``stopwaitsecs`` is longer than the warm path needs.  A consumer that ends unasked (a
bug on its I/O thread) exits ``EXIT_CRASHED`` (70), which supervisord restarts.

Under supervisord (``SUPERVISOR_ENABLED``) a worker whose supervisor dies stops warmly
on its own (:class:`ParentWatch`), so that no orphan holds its spool when a new
supervisord starts.

The pieces: :mod:`~ai_service.worker.spools` (spool paths), :mod:`~ai_service.worker.stopping`
(parent watch, stop signals) and :mod:`~ai_service.worker.health` (the HTTP server); this
module runs them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.consumer import Consumer
from ai_service.errors import SpoolLocked
from ai_service.heartbeat import Heartbeat
from ai_service.metrics import Metrics
from ai_service.operation import Operation, Resources
from ai_service.publisher import Publisher
from ai_service.registry import OPERATIONS, Registry
from ai_service.worker.health import start_health
from ai_service.worker.spools import adopt_legacy_spool, safe_worker_name, spool_dir
from ai_service.worker.stopping import (
    PARENT_POLL_SECONDS,
    PR_SET_PDEATHSIG,
    ParentWatch,
    StopSignals,
    set_parent_death_signal,
    under_supervisor,
)

__all__ = [
    "CRASH_HANDLER_GRACE", "EXIT_CONFIG", "EXIT_CRASHED", "EXIT_FORCED", "EXIT_OK", "PARENT_POLL_SECONDS",
    "PR_SET_PDEATHSIG", "PUBLISHER_DRAIN_SECONDS", "SPOOL_LOCK_WAIT_SECONDS", "SUPERVISED_MIN_UPTIME",
    "ParentWatch", "StopSignals", "adopt_legacy_spool", "crashed_exit", "make_publisher", "make_resources",
    "publisher_state", "run_worker", "safe_worker_name", "serve", "set_parent_death_signal", "spool_dir",
    "start_health", "start_publisher", "under_supervisor",
]

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


#: Under supervisord, how long a worker whose spool is held waits for the holder to stop
#: (an orphan of a supervisord that died, finishing its warm stop) before exiting EXIT_CONFIG.
#: Longer than the longest stopwaitsecs (conversion: 600 s).
SPOOL_LOCK_WAIT_SECONDS = 660.0


def make_resources(settings: Settings) -> Resources:
    from ai_service.storage import open_storage

    return Resources(settings=settings, storage=open_storage(settings))


def run_worker(settings: Settings, op: str, load: Callable[[Settings], Operation], *, supervised: bool = False,
               operations: Registry = OPERATIONS, topology: Topology | None = None) -> int:
    """Run one operation's worker until stopped; returns the process exit code.

    ``load`` builds the operation (importing its heavy libraries) only when messaging
    is enabled, so a disabled worker exits at once and supervisord leaves it be.
    ``topology`` replaces the declarations built from ``operations`` (a test's stub worker).
    """
    if not settings.enable_rabbitmq and settings.http_port is not None:
        from ai_service.http.outbox import serve_http_only  # HTTP-only mode (README "HTTP-only mode")

        return serve_http_only(settings, op, load, operations=operations)
    if not settings.enable_rabbitmq:
        log.warning("[RMQ] Messaging is disabled (ENABLE_RABBITMQ=false): the %s worker has nothing to do; exiting",
                    op)
        if supervised:
            # supervisord counts an exit before `startsecs` as a failed start and retries;
            # outlive it so that the exit is recorded as the expected, final one.
            time.sleep(SUPERVISED_MIN_UPTIME)
        return EXIT_OK
    # Under supervisord: stop warmly, on our own, if supervisord dies (no orphans holding spools).
    parent = ParentWatch.arm(settings.work_dir / "orphaned" / f"{safe_worker_name(settings)}.{op}.log") \
        if under_supervisor() else None
    # OpenTelemetry only when OTEL_EXPORTER_OTLP_*ENDPOINT asks for it (README "Tracing").
    from ai_service import tracing

    tracing.setup(op, worker=settings.worker_name)
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
    topology = topology or Topology(settings, operations=operations)
    publisher = make_publisher(settings, operation, resources.metrics, topology)
    try:
        start_publisher(publisher, SPOOL_LOCK_WAIT_SECONDS if parent is not None else 0.0)
    except SpoolLocked as exc:
        log.error("[RMQ] ❌ %s; give each worker process of an operation its own WORKER_NAME (or WORK_DIR)", exc)
        return EXIT_CONFIG
    consumer = Consumer(settings, operation, publisher, resources, topology)
    return serve(settings, operation, resources, publisher, consumer, parent)


def make_publisher(settings: Settings, operation: Operation, metrics: Metrics, topology: Topology) -> Publisher:
    """The worker's one publisher, on its own spool; an answer refused for good becomes the job's *_failed."""
    from ai_service.publisher import failure_replacer

    adopt_legacy_spool(settings, operation.name)
    return Publisher(settings, spool_dir=spool_dir(settings, operation.name), topology=topology,
                     client_name=f"ai-service {operation.name} publisher ({settings.worker_name})",
                     on_state=lambda state: publisher_state(metrics, state),
                     replace=failure_replacer(settings, operation.name, operation.failure),
                     on_refused=lambda code, envelope, reason: metrics.publisher_refused.labels(code).inc(),
                     on_node=lambda node: metrics.on_broker_node("publisher", node))


def serve(settings: Settings, operation: Operation, resources: Resources, publisher: Publisher,
          consumer: Consumer, parent: ParentWatch | None) -> int:
    """Consume until stopped (signals, the parent's death, a crash); returns the exit code."""
    heartbeat = Heartbeat(settings, operation.name, publisher, consumer,  # worker.<state>.<name> beats
                          operations=consumer.topology.operations)
    heartbeat.start()
    health = start_health(settings, resources.metrics, consumer, publisher, resources, operation.name)
    signals = StopSignals(consumer, parent)
    signals.install()
    if parent is not None:
        parent.start(signals.parent_died)
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


def start_publisher(publisher: Publisher, wait: float) -> None:
    """Start ``publisher``; while its spool is held by another process, retry for ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            publisher.start()
            return
        except SpoolLocked as exc:
            if time.monotonic() >= deadline:
                raise
            if wait:
                log.warning("[RMQ] %s: waiting up to %.0f s for it to stop (an orphan of a supervisor that died, "
                            "finishing its warm stop?)", exc, deadline - time.monotonic())
                wait = 0.0  # say it once
        time.sleep(1.0)


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
