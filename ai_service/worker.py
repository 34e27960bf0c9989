"""A worker process: settings -> logging -> publisher -> consumer, and rq's stop protocol.

The first SIGTERM (or Ctrl-C) is warm: stop taking messages, let the running handler
finish or hand its job back, flush the publisher, exit 0.  A second one forces: hand
unfinished deliveries back to the queue and exit 1 at once.  supervisord's
``stopwaitsecs`` is longer than the warm path needs.  A consumer that ends unasked (a
bug on its I/O thread) exits ``EXIT_CRASHED`` (70), which supervisord restarts.

Under supervisord (``SUPERVISOR_ENABLED``) a worker whose supervisor dies stops warmly
on its own (:class:`ParentWatch`), so that no orphan holds its spool when a new
supervisord starts.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ai_service.broker import Topology
from ai_service.config import Settings
from ai_service.consumer import Consumer
from ai_service.errors import SpoolLocked
from ai_service.heartbeat import Heartbeat
from ai_service.metrics import Metrics
from ai_service.operation import Operation, Resources
from ai_service.publisher import Publisher
from ai_service.registry import OPERATIONS, Registry

if TYPE_CHECKING:
    from ai_service.http.server import HttpServer

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

#: How often the parent watch looks at os.getppid().
PARENT_POLL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1


def safe_worker_name(settings: Settings) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.worker_name).strip("_") or "worker"


def spool_dir(settings: Settings, op: str) -> Path:
    """``<WORK_DIR>/spool/<worker>/<op>``: processes of different operations may share a
    WORKER_NAME and WORK_DIR; two processes of one operation may not (the spool is locked)."""
    return settings.work_dir / "spool" / safe_worker_name(settings) / op


def adopt_legacy_spool(settings: Settings, op: str) -> int:
    """Move the messages an older version left in ``<WORK_DIR>/spool/<worker>/`` (before the
    operation was part of the path) into this operation's spool; returns how many."""
    new = spool_dir(settings, op)
    old = new.parent
    if not any(old.glob("*.msg")):
        return 0
    locks = []
    try:
        for directory in (old, new):
            directory.mkdir(parents=True, exist_ok=True)
            lock = open(directory / ".lock", "wb")  # noqa: SIM115 - held (flock) until closed below
            locks.append(lock)
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live process holds one of them; the publisher's own lock says so
        if any(new.glob("*.msg")):
            log.warning("[RMQ] Old-layout spool %s still holds messages; %s has its own, so they stay there",
                        old, new)
            return 0
        moved = sorted(old.glob("*.msg"))
        for path in moved:
            os.replace(path, new / path.name)
        log.warning("[RMQ] Moved %d unconfirmed message(s) from the old-layout spool %s to %s", len(moved), old, new)
        return len(moved)
    finally:
        for lock in locks:
            lock.close()


def under_supervisor() -> bool:
    """supervisord sets SUPERVISOR_ENABLED=1 in its children's environment."""
    return bool(os.environ.get("SUPERVISOR_ENABLED"))


def set_parent_death_signal(sig: int) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` when the parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError) as exc:
        log.warning("[RMQ] prctl(PR_SET_PDEATHSIG) unavailable (%s); the parent watch alone notices "
                    "supervisord's death", exc)
        return False
    if result != 0:
        code = ctypes.get_errno()
        log.warning("[RMQ] prctl(PR_SET_PDEATHSIG) failed (%s); the parent watch alone notices supervisord's death",
                    errno.errorcode.get(code, code))
        return False
    return True


def _is_supervisord(pid: int) -> bool:
    try:
        return b"supervisord" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell: assume it is


class ParentWatch:
    """Notices that the parent process (supervisord) died, so that the worker stops warmly.

    Two ways, because neither is enough alone: ``PR_SET_PDEATHSIG`` (SIGTERM when the
    parent *thread* exits; lost across some exec paths), and a thread that compares
    ``os.getppid()`` every second with the parent read at start.  The parent read at start
    is checked again right after ``prctl`` (it may have died in between), and a parent
    that is already pid 1 but not supervisord means it died before the worker looked.
    """

    def __init__(self, parent: int, orphan_log: Path | None = None) -> None:
        self.parent = parent
        self.orphan_log = orphan_log
        self.pdeathsig = False
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    @classmethod
    def arm(cls, orphan_log: Path | None = None) -> "ParentWatch":
        watch = cls(os.getppid(), orphan_log)
        watch.pdeathsig = set_parent_death_signal(signal.SIGTERM)
        return watch

    def gone(self) -> str | None:
        """Why the parent is gone, or None while it lives."""
        now = os.getppid()
        if now != self.parent:
            return f"the supervisor (parent pid {self.parent}) is gone: this worker is now a child of pid {now}"
        if now == 1 and not _is_supervisord(1):
            return "the supervisor exited before this worker started watching it (parent is now pid 1)"
        return None

    def start(self, on_death: Callable[[str], None]) -> None:
        """Call ``on_death(why)`` once, from a daemon thread, when the parent is gone (checked at once)."""

        def watch() -> None:
            while not self._done.is_set():
                why = self.gone()
                if why is not None:
                    on_death(why)
                    return
                self._done.wait(PARENT_POLL_SECONDS)

        self._thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def detach_output(self) -> Path | None:
        """Point stdout/stderr away from supervisord's pipes (nobody reads them now: a write
        would raise BrokenPipeError in whatever prints) to ``orphan_log``; returns it."""
        if self.orphan_log is None:
            return None
        pipes = [fd for fd in (1, 2) if _is_pipe(fd)]
        if not pipes:
            return None
        try:
            self.orphan_log.parent.mkdir(parents=True, exist_ok=True)
            target = os.open(self.orphan_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            target = os.open(os.devnull, os.O_WRONLY)
        for fd in pipes:
            os.dup2(target, fd)
        os.close(target)
        return self.orphan_log


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class StopSignals:
    """Counts SIGTERM/SIGINT: the first asks for a warm stop, the second forces.

    Once the parent (``parent``, a :class:`ParentWatch`) is gone, a signal is its
    ``PR_SET_PDEATHSIG`` SIGTERM (or comes after it): a warm stop that never forces.
    """

    def __init__(self, consumer: Consumer, parent: ParentWatch | None = None) -> None:
        self.consumer = consumer
        self.count = 0
        self.forced = threading.Event()
        self.parent = parent
        self.orphaned = False
        self._orphan_lock = threading.Lock()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        why = self.parent.gone() if self.parent is not None else None
        if why is not None:
            self.parent_died(why)
            return
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

    def parent_died(self, why: str) -> None:
        """Stop warmly because nobody supervises this worker any more (once; any thread)."""
        if not self._orphan_lock.acquire(blocking=False):
            return
        try:
            if self.orphaned:
                return
            self.orphaned = True
        finally:
            self._orphan_lock.release()
        moved = self.parent.detach_output() if self.parent is not None else None
        log.warning("[RMQ] %s: warm shutdown (finishing or handing back the running job)%s", why,
                    f"; output continues in {moved}" if moved else "")
        self.count = max(self.count, 1)
        self.consumer.request_stop()


def make_resources(settings: Settings) -> Resources:
    from ai_service.storage import open_storage

    return Resources(settings=settings, storage=open_storage(settings))


def run_worker(settings: Settings, op: str, load: Callable[[Settings], Operation], *, supervised: bool = False,
               operations: Registry = OPERATIONS) -> int:
    """Run one operation's worker until stopped; returns the process exit code.

    ``load`` builds the operation (importing its heavy libraries) only when messaging
    is enabled, so a disabled worker exits at once and supervisord leaves it be.
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
    topology = Topology(settings, operations=operations)
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
                     on_refused=lambda code, envelope, reason: metrics.publisher_refused.labels(code).inc())


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
