"""The ledger: reads and writes job records, leases and cancel markers in storage.

Where the store has conditional writes (:meth:`Storage.supports_conditional_writes`: S3
``If-None-Match``/``If-Match``, the local backend's exclusive create and locked rename), a
record is created with :meth:`Storage.create_exclusive` and every later write replaces
exactly the version this ledger read (:meth:`Storage.replace_if_match`): of two workers
on two hosts taking one expired lease, one write wins and the other learns it at once.
A store without them gets the older protocol: write, wait :data:`TAKE_SETTLE_SECONDS`,
read back (``still_ours``), which two takers can both pass in a rare interleaving.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from ai_service.errors import AIServiceError, ObjectNotFound, PreconditionFailed
from ai_service.jobs.records import (
    RECORD_PREFIX,
    JobRecord,
    cancel_key,
    checkpoint_key,
    legacy_record_key,
    record_key,
)
from ai_service.operation import Resources
from ai_service.storage import Storage

log = logging.getLogger("ai_service.jobs")


class Ledger:
    """Reads and writes job records, leases and cancel markers in storage."""

    def __init__(self, storage: Storage, *, op: str, worker: str, lease_seconds: int,
                 prefix: str = RECORD_PREFIX) -> None:
        self.storage = storage
        self.op = op
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.prefix = prefix
        self._conditional: bool | None = None

    @property
    def conditional(self) -> bool:
        """Whether records are written with conditional requests (probed once per storage)."""
        if self._conditional is None:
            self._conditional = self.storage.supports_conditional_writes()
        return self._conditional

    def checkpoint_key(self, job_id: str, name: str) -> str:
        return checkpoint_key(self.op, job_id, name, self.prefix)

    def load(self, job_id: str) -> JobRecord | None:
        key = record_key(self.op, job_id, self.prefix)
        etag: str | None = None
        try:
            if self.conditional:
                raw, info = self.storage.read_versioned(key)
                etag = info.etag
            else:
                raw = self.storage.read_bytes(key)
        except ObjectNotFound:
            return self._load_legacy(job_id)
        try:
            record = JobRecord.from_json(raw)
            record.etag = etag
            return record
        except (ValueError, TypeError) as exc:
            log.error("[Handler] [%s] Unreadable job record (%s); treating the job as new", job_id, exc)
            return None

    def _load_legacy(self, job_id: str) -> JobRecord | None:
        """A record an older release wrote, if it is this operation's (saved per operation next)."""
        try:
            record = JobRecord.from_json(self.storage.read_bytes(legacy_record_key(job_id, self.prefix)))
        except (ObjectNotFound, ValueError, TypeError):
            return None
        return record if record.op == self.op else None

    def save(self, record: JobRecord) -> bool:
        """Write ``record``; with conditional writes only over the version it was read at or
        last written as (``record.etag``; None: as a new object), so False when another
        worker wrote it since."""
        record.updated = time.time()
        key, data = record_key(self.op, record.job_id, self.prefix), record.to_json()
        if not self.conditional:
            self.storage.write_bytes(key, data)
            return True
        try:
            info = (self.storage.create_exclusive(key, data) if record.etag is None
                    else self.storage.replace_if_match(key, data, record.etag))
        except PreconditionFailed:
            return False
        record.etag = info.etag
        return True

    def take(self, record: JobRecord) -> bool:
        """Become the owner of ``record`` (as loaded here) for a new attempt with a fresh
        lease.  With conditional writes False means another worker took it first; without
        them the caller must read back after :data:`TAKE_SETTLE_SECONDS` (``still_ours``).

        A job handed back by a warm shutdown does not count as a failed attempt.
        """
        if record.status != "handed_back":
            record.attempt += 1
        record.owner = self.worker
        record.token = uuid.uuid4().hex
        record.status = "running"
        record.lease_expires = time.time() + self.lease_seconds
        return self.save(record)

    def still_ours(self, record: JobRecord) -> bool:
        """Read the record back: did another worker take the job since we wrote it?"""
        current = self.load(record.job_id)
        return current is not None and current.token == record.token and not current.finished

    def renew(self, record: JobRecord) -> bool:
        """Extend our lease; False when the job is no longer ours (taken over or ended)."""
        current = self.load(record.job_id)
        if current is None or current.token != record.token or current.finished:
            return False
        record.lease_expires = time.time() + self.lease_seconds
        return self.save(record)  # False: taken over between the read and the write

    def hand_back(self, record: JobRecord, *, status: str = "handed_back") -> bool:
        """Give the job up: the next worker may take it at once.

        ``handed_back`` (warm shutdown) does not count as a failed attempt when taken
        again; ``retrying`` (a retryable failure) does.  False when it was not ours.
        """
        current = self.load(record.job_id)
        if current is not None and current.token != record.token:
            return False
        record.status = status
        record.owner = None
        record.token = None  # its lease message is stale now; the resubmitted request takes over
        record.lease_expires = 0.0
        return self.save(record)

    def finish(self, record: JobRecord, status: str, terminal: dict[str, Any], message_id: str) -> bool:
        """Record the terminal message; False when another worker wrote the record since."""
        record.status = status
        record.terminal = terminal
        record.terminal_message_id = message_id
        record.lease_expires = 0.0
        return self.save(record)

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.stat(cancel_key(job_id, self.prefix)) is not None

    def request_cancel(self, job_id: str) -> None:
        """Leave the cancel marker (once: every worker reading the cancel stream asks)."""
        if self.cancel_requested(job_id):
            return
        self.storage.write_bytes(cancel_key(job_id, self.prefix), json.dumps({"requested": time.time()}).encode())


def record_cancel(job_id: str, resources: Resources) -> None:
    """``Operation.on_cancel`` for long jobs: leave a marker any worker will honour,
    also when no worker runs the job right now (cancelled before start, or while its
    worker is gone)."""
    settings = resources.settings
    ledger(resources.require_storage(), settings, op="").request_cancel(job_id)


def announce_lease_protocol(storage: Storage) -> bool:
    """Probe the store once at start and say how job records are written; True when
    conditional.  A store that cannot be reached now is asked again at the first job."""
    try:
        conditional = storage.supports_conditional_writes()
    except AIServiceError as exc:
        log.warning("[Handler] Could not probe %s for conditional writes (%s); asking again at the first job",
                    storage.describe(), exc.message)
        return False
    if conditional:
        log.info("[Handler] Job records in %s: conditional writes (a lease two hosts cannot both win)",
                 storage.describe())
    else:
        log.warning("[Handler] ⚠️ Job records in %s: no conditional writes; leases fall back to write, wait "
                    "and read back", storage.describe())
    return conditional


def ledger(storage: Storage, settings: Any, *, op: str) -> Ledger:
    """The ledger of ``op`` with this worker's name, lease period and ``JOBS_PREFIX``."""
    return Ledger(storage, op=op, worker=settings.worker_name, lease_seconds=settings.lease_seconds,
                  prefix=settings.jobs_prefix)
