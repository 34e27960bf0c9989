"""The one place a job's message_ids are made (CONTRACT.md, Common rules).

Every message of a job carries an id derived from (operation, job_id, type, and the
epoch or format it reports), so the copy a redelivery, a resume or a second worker on
another host sends has the id of the first, and a BE that drops message_ids it has seen
sees each message once.  The AMQP publisher, the HTTP-only outbox and the events stream
(``id:`` of each SSE event) all use :func:`job_message_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ai_service.messages import derived_message_id

#: Which field of a progress message tells one of its kind from the next.
_DETAIL_FIELDS = {
    "epoch_update": "current_epoch",
    "conversion_update": "current_format",
    "training_started": "resumed_from_epoch",  # a resume announces itself: a new message
}


def message_id_of(op: str, job_id: str, message: Any) -> str:
    """:func:`job_message_id` of a message object: its detail field read off the model, so
    that the sender need not build the message's JSON dict only to find that field."""
    message_type = str(getattr(message, "type", ""))
    field = _DETAIL_FIELDS.get(message_type)
    value = None if field is None else getattr(message, field, None)
    return derived_message_id(op, job_id, message_type, "" if value is None else str(value))


def job_message_id(op: str, job_id: str, message_type: str, payload: Mapping[str, Any]) -> str:
    """The message_id of ``payload`` (a message of ``op``'s job ``job_id``): the same for the
    same message whoever sends it and however often; terminals are one per job."""
    field = _DETAIL_FIELDS.get(message_type)
    detail = "" if field is None or payload.get(field) is None else str(payload[field])
    return derived_message_id(op, job_id, message_type, detail)
