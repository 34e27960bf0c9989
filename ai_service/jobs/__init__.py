"""The job record: what makes long jobs safe across crashes, redeliveries and hosts.

A training or conversion job is not held as an unacked delivery for hours (RabbitMQ's
``consumer_timeout`` would close the channel).  Instead the worker that takes a job
writes ``jobs/<op>/<job_id>.json`` to storage (owner, attempt, lease expiry, a token for this
attempt), publishes a *lease message* into ``<request queue>.lease`` -- a holding queue
whose messages expire into the request queue -- and only then acks the delivery.

While it works it renews the lease (every epoch and on a timer).  When a lease message
comes back through the request queue, whoever receives it looks at the record:

* the job finished -> drop it (its terminal message is in the record);
* the lease message belongs to an older attempt -> drop it;
* the lease is still fresh -> publish the next lease message (same TTL) and drop this;
* the lease expired -> the owner is gone: take the job over and resume it.

So a dead worker's job comes back through RabbitMQ itself within about one and a half
lease periods, and any worker on any host can take it; nothing polls storage.

The record also holds the job's terminal message once it is sent: every path
(redelivery, duplicate request, resume, cancel) consults it first, so a job ends with
exactly one terminal message, re-published identically (same ``message_id``) if asked
again.

Modules: :mod:`.records` (the record and its keys), :mod:`.ledger` (storage reads and
writes), :mod:`.longjob` (:class:`LongJob`: take, renew, finish, hand back, retry later,
and :meth:`LongJob.conclude`, which ends a job through the one outcome policy).
"""

from __future__ import annotations

from ai_service.errors import LeaseLost
from ai_service.jobs.ledger import Ledger, announce_lease_protocol, ledger, record_cancel
from ai_service.jobs.longjob import TAKE_SETTLE_SECONDS, Begin, LongJob
from ai_service.jobs.records import (
    LEASE_HEADER,
    RECORD_PREFIX,
    JobRecord,
    cancel_key,
    checkpoint_key,
    legacy_record_key,
    record_key,
)

__all__ = [
    "LEASE_HEADER",
    "RECORD_PREFIX",
    "TAKE_SETTLE_SECONDS",
    "Begin",
    "JobRecord",
    "LeaseLost",
    "Ledger",
    "LongJob",
    "announce_lease_protocol",
    "cancel_key",
    "checkpoint_key",
    "ledger",
    "legacy_record_key",
    "record_cancel",
    "record_key",
]
