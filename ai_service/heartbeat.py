"""Worker heartbeats: every worker process says who and where it is, and what it does.

Every ``HEARTBEAT_SECONDS`` (and at once when its state or job changes) a worker
publishes a :class:`~ai_service.messages.WorkerHeartbeat` to ``EVENTS_EXCHANGE`` with
routing key ``worker.<state>.<name>``:

* ``state``: ``starting`` (not consuming yet), ``idle``, ``busy`` (a job runs),
  ``stopping`` (warm stop asked), ``stopped`` (the last one, on a warm stop);
* ``name``: :func:`routing_name` of ``<WORKER_NAME>/<operation>`` -- every character
  other than ``A-Z a-z 0-9 _ - /`` (dots, ``#``, ``*``, spaces, ...) becomes ``_``, at
  most :data:`MAX_NAME_CHARS` characters -- so it is one routing-key word and two
  operations of one ``WORKER_NAME`` differ.

Heartbeats are ephemeral: non-persistent, ``mandatory=False`` (no queue need be
bound), ``expiration`` = three intervals, and never in the publisher's spool
(:meth:`Publisher.publish` with ``ephemeral=True``).  A beat that cannot go out now
(publisher disconnected) is skipped, never queued up.

Torch is never imported here: the device and GPU name are read from ``torch`` only when
the worker has already imported it (the real workers have).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from ai_service.config import Settings
from ai_service.messages import WorkerHeartbeat, WorkerState, utc_now
from ai_service.registry import OPERATIONS, Registry

if TYPE_CHECKING:
    from ai_service.operation import DeviceInfo, Resources
    from ai_service.publisher import Publisher, Receipt

log = logging.getLogger("ai_service.heartbeat")

#: Routing-key prefix of every heartbeat; bind ``worker.#`` to see them all.
ROUTING_PREFIX = "worker"
MAX_NAME_CHARS = 200
#: A beat expires (and a listener calls the worker lost) after this many intervals.
EXPIRY_INTERVALS = 3
#: How often the thread looks for a state change between beats.
POLL_SECONDS = 0.2
#: How long the last (``stopped``) beat may take to go out.
STOPPED_WAIT_SECONDS = 2.0
#: Packages whose versions a heartbeat reports (importlib.metadata; none is imported).
VERSIONED = ("ai-service", "ultralytics", "torch")

_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


def routing_name(worker_name: str, op: str) -> str:
    """``<worker_name>/<op>`` as one routing-key word (see the module docstring)."""
    return _UNSAFE.sub("_", f"{worker_name}/{op}")[:MAX_NAME_CHARS]


def heartbeat_key(state: str, name: str) -> str:
    return f"{ROUTING_PREFIX}.{state}.{name}"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in VERSIONED:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def device_info(setting: str, chosen: DeviceInfo | None = None) -> tuple[str, str | None]:
    """(device, GPU name): the device the worker picked (``chosen``, a ``torch.device``)
    or, before it did, what ``DEVICE`` will pick; never imports torch."""
    torch: Any = sys.modules.get("torch")
    if chosen is not None:
        device = "cuda:0" if str(chosen).startswith("cuda") else str(chosen)
    elif setting == "cpu" or torch is None:
        device = "cuda:0" if setting == "cuda" else "cpu"
    else:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device != "cuda:0" or torch is None:
        return device, None
    try:
        return device, str(torch.cuda.get_device_name(0))
    except Exception:  # a broken driver must not stop the heartbeat
        log.debug("[RMQ] Could not read the CUDA device name", exc_info=True)
        return device, None


class WorkerView(Protocol):
    """What the heartbeat reads from the consumer (:class:`ai_service.consumer.Consumer`)."""

    started: threading.Event
    resources: Resources  # ``device`` once the operation picked one

    @property
    def stop_requested(self) -> bool: ...

    @property
    def busy(self) -> int: ...

    def current_jobs(self) -> list[tuple[str, float | None]]: ...


class Heartbeat:
    """The heartbeat thread of one worker process (nothing at all with HEARTBEAT_SECONDS=0).

    ``op`` must be one of ``operations`` (the worker's registry): a beat names it, and
    is validated against the registry's names.
    """

    def __init__(self, settings: Settings, op: str, publisher: "Publisher", worker: WorkerView, *,
                 operations: Registry = OPERATIONS) -> None:
        self.settings = settings
        self.op = operations[op].name  # UnknownOperation now, not on the first beat
        self.operations = operations.names()
        self.publisher = publisher
        self.worker = worker
        self.interval = float(settings.heartbeat_seconds)
        self.name = routing_name(settings.worker_name, op)
        self.started_at = utc_now()
        self.versions = versions()
        self.host = socket.gethostname()
        self.sent = 0
        self._device: tuple[str, str | None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread and send the last beat (``stopped``), waiting briefly for it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(5)
        receipt = self.beat("stopped")
        if receipt is not None:
            receipt.wait(STOPPED_WAIT_SECONDS)

    # --- the thread -----------------------------------------------------------------

    def state(self) -> tuple[WorkerState, str | None, float | None, int]:
        """(state, job_id, progress, jobs running) as the consumer says now."""
        jobs = self.worker.current_jobs()
        running = max(self.worker.busy, len(jobs))
        job_id, progress = jobs[0] if jobs else (None, None)
        if self.worker.stop_requested:
            state: WorkerState = "stopping"
        elif not self.worker.started.is_set():
            state = "starting"
        else:
            state = "busy" if running else "idle"
        return state, job_id, progress, running

    def _run(self) -> None:
        last: tuple[str, str | None] | None = None
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                state, job_id, _, _ = self.state()
                now = time.monotonic()
                changed = (state, job_id) != last
                if changed or now >= due:
                    self.beat()
                    last = (state, job_id)
                    # on the beat: every interval from the first, without drift; a change restarts the count
                    due = now + self.interval if changed or now - due > self.interval else due + self.interval
            except Exception:  # the heartbeat must never take the worker down
                log.exception("[RMQ] Heartbeat failed; trying again next interval")
                due = time.monotonic() + self.interval
            self._stop.wait(max(0.0, min(POLL_SECONDS, due - time.monotonic())))

    def message(self, state: WorkerState | None = None) -> WorkerHeartbeat:
        now_state, job_id, progress, running = self.state()
        device = self._device or device_info(self.settings.device, self.worker.resources.device)
        if device[1] is not None:
            self._device = device  # the GPU does not change: ask torch once
        return WorkerHeartbeat.model_validate(dict(
            worker=self.settings.worker_name, name=self.name, operation=self.op,
            state=state or now_state, device=device[0], gpu=device[1],
            job_id=job_id, progress=progress, jobs_running=running,
            versions=self.versions, pid=os.getpid(), host=self.host, started_at=self.started_at,
            interval_seconds=self.interval,
        ), context={"operations": self.operations})

    def beat(self, state: WorkerState | None = None) -> "Receipt | None":
        """Publish one heartbeat now; returns the publisher's receipt (None when off)."""
        if not self.enabled:
            return None
        message = self.message(state)
        receipt = self.publisher.publish(
            self.settings.events_exchange, heartbeat_key(message.state, self.name), message.to_json_bytes(),
            message_type=message.type, mandatory=False, ephemeral=True,
            expiration=str(int(EXPIRY_INTERVALS * self.interval * 1000)),
        )
        self.sent += 1
        return receipt
