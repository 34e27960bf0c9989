"""Job records and where they live in storage (``jobs/<op>/<job_id>.json``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

LEASE_HEADER = "x-ai-lease"
#: ``JOBS_PREFIX``'s default; the service's own area, which no request key may name.
RECORD_PREFIX = "jobs/"

# Records are per operation (CONTRACT.md: a job_id names one job per operation), so a
# conversion with a finished training job's id never sees, or answers with, its record.


def record_key(op: str, job_id: str, prefix: str = RECORD_PREFIX) -> str:
    return f"{prefix}{op}/{job_id}.json"


def legacy_record_key(job_id: str, prefix: str = RECORD_PREFIX) -> str:
    """Where releases before per-operation records kept them (read once, on upgrade)."""
    return f"{prefix}{job_id}.json"


def cancel_key(job_id: str, prefix: str = RECORD_PREFIX) -> str:
    """A cancel names a job_id, not an operation: one marker for any job with that id."""
    return f"{prefix}{job_id}.cancel"


def checkpoint_key(op: str, job_id: str, name: str, prefix: str = RECORD_PREFIX) -> str:
    return f"{prefix}{op}/{job_id}/{name}"


@dataclass
class JobRecord:
    """The state of one job, as stored at ``jobs/<op>/<job_id>.json``."""

    job_id: str
    op: str
    status: str = "new"  # running | handed_back | retrying | completed | failed | cancelled
    attempt: int = 0
    owner: str | None = None
    token: str | None = None
    lease_expires: float = 0.0
    last_epoch: int = 0
    checkpoints: dict[str, str] = field(default_factory=dict)
    terminal: dict[str, Any] | None = None
    terminal_message_id: str | None = None
    terminal_sent: bool = False
    last_metrics: dict[str, float] = field(default_factory=dict)
    updated: float = 0.0
    #: The store's version of this record as read or last written (not stored): with
    #: conditional writes the next write replaces exactly that version, or fails.
    etag: str | None = field(default=None, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.terminal is not None

    def lease_live(self, now: float | None = None) -> bool:
        return self.status == "running" and self.lease_expires > (now if now is not None else time.time())

    def to_json(self) -> bytes:
        data = asdict(self)
        del data["etag"]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "JobRecord":
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__} - {"etag"}
        return cls(**{k: v for k, v in data.items() if k in known})
