"""Messages that belong to no job: the BE's cancel request and the workers' heartbeats."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from ai_service.messages.base import JobId, OperationName, _Message, _Request, utc_now


class Cancel(_Request):
    type: Literal["cancel"]
    job_id: JobId


# --- worker heartbeats (ai_service/heartbeat.py) --------------------------------------

WorkerState = Literal["starting", "idle", "busy", "stopping", "stopped"]


class WorkerHeartbeat(_Message):
    """A worker process announcing itself: ``worker.<state>.<name>`` on EVENTS_EXCHANGE.

    Ephemeral (non-persistent, unspooled, expiring after about three intervals): a BE
    or ``ai-service workers`` binds a queue of its own to ``worker.#`` to see them.
    ``job_id`` / ``progress`` are null while no job runs (``progress`` also until the
    job first reports one); ``gpu`` is null on CPU workers.
    """

    type: Literal["worker_heartbeat"] = "worker_heartbeat"
    worker: str  # WORKER_NAME as configured
    name: str  # the routing key's <name>: "<WORKER_NAME>/<operation>", made routing-key safe
    operation: OperationName  # one of the registry's (validation context ``operations``)
    state: WorkerState
    device: str  # cpu or cuda:0 (the first visible GPU)
    gpu: str | None = None
    job_id: str | None = None
    progress: float | None = None
    jobs_running: int = 0
    versions: dict[str, str | None]
    pid: int
    host: str
    started_at: str
    interval_seconds: float
    timestamp: str = Field(default_factory=utc_now)

    @field_validator("operation")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """A name the registry has, when the caller passes its names as ``operations``."""
        known = (info.context or {}).get("operations")
        if known is not None and value not in known:
            raise ValueError(f"{value!r} is not a registered operation ({', '.join(known)})")
        return value
