"""HTTP-only mode (``ENABLE_RABBITMQ=false``): the worker runs the jobs it is given over
HTTP itself, through the operation's own handler, with an outbox that writes to disk.

Event log: every message a job sends goes, instead of to ``EVENTS_EXCHANGE``, to
``WORK_DIR/events/<op>/<job_id>.jsonl``, one JSON line per message,
``{"id": <message_id>, "kind": "update"|"result", "type": ..., "data": <the message>}``
(the same bodies and message_ids the queues would have carried), flushed and fsynced
before the handler goes on.  The request itself is kept beside it
(``<job_id>.request.json``) so that a restarted worker can run it again.

* A log is append-only and idempotent: a message_id already in it, a second
  ``epoch_update`` for an epoch it has, or anything after the terminal message is not
  appended again.  So a job resumed after a crash, whose handler announces an epoch or
  republishes its stored terminal message a second time, leaves no repeat in the log.
* ``lease`` / ``resubmit`` / ``dead_letter`` have no queue to go to: no-ops.  Job
  records, leases, checkpoints and cancel markers in storage work as with RabbitMQ.
* On start (:meth:`LocalJobs.resume_unfinished`) the worker looks for logs without a
  terminal message; for each, once the job record's lease has expired (at once when
  the job was handed back by a warm stop), it runs the stored request again: the
  handler resumes from the last checkpoint (or re-sends the stored terminal message).

The package, along the seams:

* :mod:`~ai_service.http.outbox.eventlog` -- :class:`Entry` and :class:`EventLog`, the
  append-only, idempotent log of one job's messages;
* :mod:`~ai_service.http.outbox.local` -- :class:`LocalOutbox` (the job's outbox) and
  :class:`LocalJobs` (runs jobs on threads, resumes the unfinished ones);
* :mod:`~ai_service.http.outbox.serve` -- :func:`serve_http_only`, the HTTP-only worker.
"""

from __future__ import annotations

from ai_service.http.outbox.eventlog import Entry, EventLog
from ai_service.http.outbox.local import Busy, LocalJobs, LocalOutbox, settled
from ai_service.http.outbox.serve import serve_http_only

__all__ = ["Busy", "Entry", "EventLog", "LocalJobs", "LocalOutbox", "serve_http_only", "settled"]
