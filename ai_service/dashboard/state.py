"""What the dashboard knows: workers, jobs (with their epoch metrics) and queue depths.

Everything is in memory and bounded (jobs, points per job, workers, the change log), so
a dashboard left open for months costs what it cost after an hour.  Every change gets a
sequence number and goes into a short change log that the page's event stream reads;
a reader that fell behind the log gets a fresh snapshot instead.

State comes from three places: the messages on ``EVENTS_EXCHANGE`` (:meth:`apply`),
the job records in storage at start (:func:`load_records`), and the queue depths the
feed reads (:meth:`set_queues`).  A job's terminal message is final: anything about the
job after it (a late update, an older record) changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from ai_service.errors import StorageError
from ai_service.messages import TERMINAL_TYPES
from ai_service.registry import OPERATIONS
from ai_service.storage import Storage

log = logging.getLogger("ai_service.dashboard")

#: The operations with a job record in storage (inference keeps none).
RECORDED_OPS = OPERATIONS.recorded()
#: What the page shows of one inference answer (its detections stay out of memory).
_DROPPED_FIELDS = ("results",)


@dataclass
class Job:
    """One job as the page shows it."""

    op: str
    job_id: str
    state: str = "queued"
    progress: float | None = None
    eta_seconds: float | None = None
    worker: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    current_epoch: int | None = None
    total_epochs: int | None = None
    current_format: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    terminal: dict[str, Any] | None = None
    updated: float = 0.0
    history: deque[dict[str, float]] = field(default_factory=deque)

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def summary(self) -> dict[str, Any]:
        """The job's row: everything but the metrics history."""
        return {
            "op": self.op, "job_id": self.job_id, "state": self.state, "progress": self.progress,
            "eta_seconds": self.eta_seconds, "worker": self.worker, "error_code": self.error_code,
            "error_message": self.error_message, "current_epoch": self.current_epoch,
            "total_epochs": self.total_epochs, "current_format": self.current_format, "metrics": self.metrics,
            "artifacts": self.artifacts, "terminal": self.terminal, "updated": self.updated,
            "points": len(self.history),
        }

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "history": list(self.history)}

    def add_point(self, epoch: int, metrics: dict[str, float], max_points: int) -> dict[str, float]:
        """Record epoch ``epoch``'s metrics; a resumed job's repeated epochs replace the old ones."""
        while self.history and self.history[-1].get("epoch", 0) >= epoch:
            self.history.pop()
        point = {"epoch": float(epoch), **{k: float(v) for k, v in metrics.items() if _number(v)}}
        self.history.append(point)
        while len(self.history) > max_points:
            self.history.popleft()
        return point

    def set_progress(self, value: Any) -> None:
        if _number(value):
            self.progress = max(float(value), self.progress or 0.0)  # never decreasing (CONTRACT.md)


@dataclass(frozen=True)
class Change:
    """One entry of the change log: ``kind`` is ``worker``, ``job`` or ``queues``."""

    seq: int
    kind: str
    data: dict[str, Any]


class DashboardState:
    """Workers, jobs and queues, safe to use from the feed thread and the HTTP loop at once."""

    def __init__(self, *, max_jobs: int = 200, max_points: int = 2000, max_workers: int = 256,
                 max_changes: int = 2000) -> None:
        self.max_jobs = max_jobs
        self.max_points = max_points
        self.max_workers = max_workers
        self.jobs: OrderedDict[tuple[str, str], Job] = OrderedDict()
        self.workers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.queues: list[dict[str, Any]] = []
        self.seq = 0
        self.connected = False
        self._changes: deque[Change] = deque(maxlen=max_changes)
        self._lock = threading.Lock()

    # --- reading -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page starts from (jobs without their histories)."""
        with self._lock:
            return {
                "seq": self.seq, "now": time.time(), "connected": self.connected,
                "workers": list(self.workers.values()),
                "jobs": [job.summary() for job in reversed(self.jobs.values())],
                "queues": list(self.queues),
            }

    def job(self, op: str, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get((op, job_id))
            return job.detail() if job is not None else None

    def changes_after(self, seq: int) -> list[Change] | None:
        """The changes after ``seq``; None when the log no longer reaches back that far."""
        with self._lock:
            if seq >= self.seq:
                return []
            if not self._changes or self._changes[0].seq > seq + 1:
                return None
            return [change for change in self._changes if change.seq > seq]

    # --- writing -----------------------------------------------------------------------

    def apply(self, routing_key: str, body: dict[str, Any]) -> None:
        """One message from ``EVENTS_EXCHANGE``: a heartbeat or a job's message."""
        words = routing_key.split(".", 2)
        if words[0] == "worker" and body.get("type") == "worker_heartbeat":
            self._heartbeat(body)
        elif len(words) == 3 and words[1] in ("update", "result"):
            job_id = str(body.get("job_id") or words[2])
            with self._lock:
                job = self._job(words[0], job_id)
                point = _apply_message(job, body, self.max_points)
                self._emit("job", {"job": job.summary(), **({"point": point} if point else {})})

    def set_queues(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            if rows != self.queues:
                self.queues = rows
                self._emit("queues", {"queues": rows})

    def set_connected(self, connected: bool) -> None:
        with self._lock:
            if connected != self.connected:
                self.connected = connected
                self._emit("broker", {"connected": connected})

    def load_record(self, op: str, record: dict[str, Any]) -> None:
        """A job record from storage (``jobs/<op>/<job_id>.json``): what the job was at its last save."""
        job_id = str(record.get("job_id") or "")
        if not job_id:
            return
        with self._lock:
            job = self._job(op, job_id)
            if job.finished:
                return
            job.worker = job.worker or record.get("owner")
            job.updated = max(job.updated, float(record.get("updated") or 0.0))
            terminal = record.get("terminal")
            epoch = int(record.get("last_epoch") or 0)
            metrics = record.get("last_metrics") or {}
            if epoch > 0 and isinstance(metrics, dict) and not job.history:
                job.current_epoch = epoch
                job.metrics = dict(metrics)
                job.add_point(epoch, metrics, self.max_points)
            if isinstance(terminal, dict):
                _apply_message(job, terminal, self.max_points)
            elif job.state == "queued":
                job.state = str(record.get("status") or "running")
            self._emit("job", {"job": job.summary()})

    def _heartbeat(self, beat: dict[str, Any]) -> None:
        name = str(beat.get("name") or beat.get("worker") or "?")
        row = {key: beat.get(key) for key in ("worker", "name", "operation", "state", "device", "gpu", "job_id",
                                               "progress", "jobs_running", "host", "pid", "interval_seconds",
                                               "started_at")}
        row["last_seen"] = time.time()
        with self._lock:
            self.workers.pop(name, None)
            self.workers[name] = row
            while len(self.workers) > self.max_workers:
                self.workers.popitem(last=False)
            self._emit("worker", {"worker": row})

    def _job(self, op: str, job_id: str) -> Job:
        """The job (created when new; the most recently touched goes last). Lock held."""
        key = (op, job_id)
        job = self.jobs.pop(key, None) or Job(op=op, job_id=job_id)
        self.jobs[key] = job
        if len(self.jobs) > self.max_jobs:
            victims = [k for k, j in self.jobs.items() if j.finished and k != key] or [next(iter(self.jobs))]
            self.jobs.pop(victims[0])
        return job

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.seq += 1
        self._changes.append(Change(self.seq, kind, data))


def _apply_message(job: Job, body: dict[str, Any], max_points: int) -> dict[str, float] | None:
    """Fold one message into ``job``; returns the new metrics point of an ``epoch_update``."""
    if job.finished:
        return None
    kind = str(body.get("type", ""))
    job.updated = time.time()
    job.worker = str(body["worker"]) if body.get("worker") else job.worker
    job.set_progress(body.get("progress"))
    if kind in TERMINAL_TYPES:
        _apply_terminal(job, body)
        return None
    job.state = "running"
    if _number(body.get("total_epochs")):
        job.total_epochs = int(body["total_epochs"])
    if kind == "conversion_update":
        job.current_format = str(body.get("current_format") or "") or None
        if isinstance(body.get("artifact"), dict):
            job.artifacts.append(body["artifact"])
    if kind != "epoch_update":
        return None
    job.eta_seconds = float(body["eta_seconds"]) if _number(body.get("eta_seconds")) else None
    metrics = _mapping(body.get("metrics"))
    job.current_epoch = int(body.get("current_epoch") or 0)
    job.metrics = {k: float(v) for k, v in metrics.items() if _number(v)}
    return job.add_point(job.current_epoch, job.metrics, max_points)


def _apply_terminal(job: Job, body: dict[str, Any]) -> None:
    job.terminal = {k: v for k, v in body.items() if k not in _DROPPED_FIELDS}
    if isinstance(body.get("results"), list):
        job.terminal["images"] = len(body["results"])
        job.terminal["detections"] = sum(len(r.get("detections") or []) for r in body["results"]
                                         if isinstance(r, dict))
    job.state = str(body.get("status") or str(body.get("type", "")).rsplit("_", 1)[-1])
    job.eta_seconds = None
    job.error_code = body.get("error_code")
    job.error_message = body.get("error_message")
    if isinstance(body.get("artifacts"), list):
        job.artifacts = [a for a in body["artifacts"] if isinstance(a, dict)]
    if _number(body.get("current_epoch")):
        job.current_epoch = int(body["current_epoch"])
    final = _mapping(body.get("final_metrics"))
    if _number(final.get("training_epochs")):
        job.total_epochs = job.total_epochs or int(final["training_epochs"])
        job.current_epoch = int(final["training_epochs"])
    if job.state == "completed":
        job.progress = 100.0


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_records(state: DashboardState, storage: Storage, prefix: str, *, limit: int | None = None) -> int:
    """Fill ``state`` from the newest job records under ``<prefix><op>/``; returns how many were read."""
    limit = state.max_jobs if limit is None else limit
    found: list[tuple[str, str]] = []
    try:
        for op in RECORDED_OPS:
            base = f"{prefix}{op}/"
            found += [(op, info.key) for info in storage.list(base)
                      if info.key.endswith(".json") and "/" not in info.key[len(base):]]
    except StorageError as exc:
        log.warning("[Dashboard] Cannot list the job records (%s); starting from the broker's messages only",
                    exc.message)
        return 0
    records = []
    for op, key in found:
        try:
            records.append((op, json.loads(storage.read_bytes(key))))
        except (StorageError, ValueError) as exc:
            log.warning("[Dashboard] Skipping the unreadable job record %s (%s)", key, exc)
    records = [(op, r) for op, r in records if isinstance(r, dict)]
    records.sort(key=lambda item: float(item[1].get("updated") or 0.0))
    for op, record in records[-limit:]:
        state.load_record(op, record)
    return len(records[-limit:])
