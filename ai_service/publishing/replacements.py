"""What the worker publishes in place of an answer the broker refused for good: that
job's ``*_failed`` (:func:`failure_replacer`, the publisher's ``replace`` hook)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from ai_service.config import Settings
from ai_service.errors import AIServiceError, PermanentError
from ai_service.registry import OPERATIONS
from ai_service.spool import Envelope

#: ``replace(refused, reason)``: the small message to publish instead, or None.
Replacer = Callable[[Envelope, str], Envelope | None]

_JOB_KEY = re.compile(r"^(?P<op>[a-z]+)\.(?P<kind>update|result)\.(?P<job_id>[A-Za-z0-9_-]{1,64})$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: ``error_code`` of the replacement, by operation (its spec's).
ERROR_CODES = {spec.name: spec.error_code for spec in OPERATIONS}

#: What to change so that the answer fits, by operation (its spec's).
HINTS = {spec.name: spec.too_big_hint for spec in OPERATIONS}


def replacement_envelope(refused: Envelope, exchange: str, routing_key: str, body: bytes,
                         message_type: str) -> Envelope:
    """A message standing in for ``refused``: same correlation_id, a message_id derived from its."""
    properties = {k: v for k, v in refused.properties.items() if k not in ("headers", "expiration")}
    properties.update({
        "message_id": f"{refused.message_id}-refused",
        "type": message_type,
        "timestamp": int(time.time()),
    })
    return Envelope(exchange, routing_key, body, properties, refused.mandatory, replacement=True,
                    order=refused.order)


def failure_replacer(settings: Settings, op: str,
                     failure: Callable[[str, AIServiceError], Any]) -> Replacer:
    """The worker's ``replace`` hook: a refused answer becomes that job's ``*_failed``.

    ``failure`` is the operation's ``failure(job_id, error)`` (``Operation.failure``).
    An ``<op>.result.<job_id>`` answer on the events exchange is replaced by a failure
    there (a refused ``<op>.update.<job_id>`` is only dropped: the job goes on and ends
    with its own terminal message); an RPC answer (default
    exchange, the request's ``reply_to``) by a failure to the same queue.  Requests the
    worker re-publishes (leases, hand-backs, dead-letters) are not replaced.
    """
    code = ERROR_CODES.get(op, "internal_error")
    hint = HINTS.get(op, "raise the broker's max_message_size and MAX_MESSAGE_BYTES with it")

    def replace(refused: Envelope, reason: str) -> Envelope | None:
        if refused.properties.get("type") == "request":
            return None
        job_id: str | None = None
        if refused.exchange == settings.events_exchange:
            m = _JOB_KEY.match(refused.routing_key)
            if m is None:
                return None
            if ".update." in refused.routing_key:
                return None  # progress is dropped (logged, counted); a *_failed here would be a second terminal
            job_id, key = m.group("job_id"), f"{m.group('op')}.result.{m.group('job_id')}"
        elif refused.exchange == "":
            key = refused.routing_key
            try:
                found = json.loads(refused.body).get("job_id")
            except (ValueError, UnicodeDecodeError, AttributeError):
                found = None
            job_id = found if isinstance(found, str) else refused.properties.get("correlation_id")
        else:
            return None
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            return None
        kind = str(refused.properties.get("type") or "answer")
        error = PermanentError(f"the {kind} could not be delivered: {reason}; {hint}", error_code=code)
        message = failure(job_id, error)
        body = json.dumps(message.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode()
        return replacement_envelope(refused, refused.exchange, key, body, str(message.type))

    return replace
