"""The document's components: every message's JSON schema, name, bindings and example.

The schemas are the models' ``model_json_schema()``; the examples are validated by the
models, so neither can drift from what the code accepts and sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ai_service import messages as m
from ai_service.registry import OPERATIONS, MessageDoc, Registry

AMQP = "0.3.0"  # AMQP binding version
SCHEMA_REF = "#/components/schemas/{model}"
TS = "2024-01-15T10:30:45.123456+00:00"


@dataclass(frozen=True)
class _Entry:
    doc: MessageDoc
    request: bool  # BE -> AI
    kind: str  # the AMQP ``type``: the model's ``type``, ``<op>_request`` for a request


def _entries(operations: Registry) -> dict[str, _Entry]:
    """component message name -> entry: every operation's messages, then control's."""
    out = {}
    for spec in operations:
        for doc in spec.messages:
            request = doc is spec.request
            out[doc.name] = _Entry(doc, request, f"{spec.name}_request" if request else _type_of(doc))
    for doc, request in CONTROL_MESSAGES:
        out[doc.name] = _Entry(doc, request, _type_of(doc))
    return out


def _type_of(doc: MessageDoc) -> str:
    type_field = doc.model.model_fields.get("type")
    if type_field is not None and isinstance(type_field.default, str):
        return type_field.default
    return doc.name


#: The messages of no operation: cancel (BE -> AI) and the workers' heartbeats.
CONTROL_MESSAGES: tuple[tuple[MessageDoc, bool], ...] = (
    (MessageDoc("cancel", m.Cancel, "Cancel a training or conversion job.",
                {"type": "cancel", "job_id": "abc12345"}), True),
    (MessageDoc("workerHeartbeat", m.WorkerHeartbeat, "A worker process announcing itself (ephemeral).", {
        "worker": "gpu-01/train-gpu0", "name": "gpu-01/train-gpu0/train", "operation": "train", "state": "busy",
        "device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "job_id": "abc12345", "progress": 15.0,
        "jobs_running": 1, "versions": {"ai-service": "0.1.0", "ultralytics": "8.3.0", "torch": "2.5.1"},
        "pid": 4242, "host": "gpu-01", "started_at": "2024-01-15T09:00:00.000000+00:00",
        "interval_seconds": 5.0, "timestamp": TS,
    }), False),
)

def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/{kind}/{name}"}


def _outgoing_classes() -> dict[str, type[BaseModel]]:
    """Every AI -> BE model (including nested ones like Artifact), by class name."""
    found: dict[str, type[BaseModel]] = {}
    stack: list[type[Any]] = [m._Message]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            stack.append(sub)
    return found


def schemas(operations: Registry = OPERATIONS) -> dict[str, Any]:
    """components/schemas: every model's JSON schema, nested models shared.

    Validation-mode schemas; for AI -> BE models every field the service always sends
    is marked required (all but the optional extras it leaves out when unset), and
    ``additionalProperties`` is left open (messages may gain optional fields).
    """
    models = [(entry.doc.model, "validation") for entry in _entries(operations).values()]
    _, top = models_json_schema(models, ref_template=SCHEMA_REF)  # type: ignore[arg-type]
    defs: dict[str, Any] = top.get("$defs", {})
    outgoing = _outgoing_classes()
    for name, schema in defs.items():
        cls = outgoing.get(name)
        if cls is None:
            continue
        omit: frozenset[str] = getattr(cls, "omit_if_none", frozenset())
        schema["required"] = [field for field in schema.get("properties", {}) if field not in omit]
        schema.pop("additionalProperties", None)
    _registered_operations(defs, operations)
    return {name: defs[name] for name in sorted(defs)}


def _registered_operations(defs: dict[str, Any], operations: Registry) -> None:
    """A heartbeat's ``operation`` is one of the registry's names (the model cannot list
    them: the registry imports it), so the document lists them as an ``enum``."""
    field = defs["WorkerHeartbeat"]["properties"]["operation"]
    defs["WorkerHeartbeat"]["properties"]["operation"] = {
        "enum": list(operations.names()), "title": field["title"], "type": "string"}


def _example(entry: _Entry) -> dict[str, Any]:
    raw = dict(entry.doc.example)
    if entry.request:
        entry.doc.model.model_validate(raw)  # the example is a valid request
        return raw
    message = entry.doc.model.model_validate(raw)
    assert isinstance(message, m._Message)
    return message.to_json_dict()


def components_messages(operations: Registry = OPERATIONS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, entry in _entries(operations).items():
        model, kind = entry.doc.model, entry.kind
        direction = "BE -> AI" if entry.request else "AI -> BE"
        out[name] = {
            "name": kind,
            "title": model.__name__,
            "summary": f"{entry.doc.summary} ({direction})",
            "contentType": "application/json",
            "correlationId": {
                "description": "AMQP correlation_id property: the job_id (or the request's own correlation_id)",
                "location": "$message.header#/correlation_id",
            },
            "payload": {"$ref": SCHEMA_REF.format(model=model.__name__)},
            "bindings": {"amqp": {"messageType": kind, "bindingVersion": AMQP}},
            "examples": [{"name": kind, "payload": _example(entry)}],
        }
    return out
