"""The AsyncAPI 3.0.0 document of the message contract, generated from the pydantic
models (:mod:`ai_service.messages`) and the default names (:class:`Settings`).

``ai-service asyncapi`` prints it; ``docs/asyncapi.yaml`` is this output, checked in, and
a test fails when it is stale.  Regenerate with ``ai-service asyncapi -o docs/asyncapi.yaml``.

The document describes the ai-service application: it *receives* the request queues and
the control exchange, and *sends* updates and results through the events exchange (or to
an inference request's ``reply_to``).  Payload schemas are the models'
``model_json_schema()``; the examples are built from the models too, so they cannot
drift from what the code accepts and sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ai_service import messages as m
from ai_service.config import Settings
from ai_service.registry import OPERATIONS, MessageDoc, OperationSpec, Registry, listed

ASYNCAPI_VERSION = "3.0.0"
#: Version of the contract this document describes; bump with CONTRACT.md.
DOC_VERSION = "1.0.0"
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

DESCRIPTION = """\
The message contract between a backend (BE) and the ai-service workers (CONTRACT.md):
RabbitMQ only, JSON bodies (UTF-8).

Every AI -> BE message is published to the topic exchange `{events}` with routing key
`<op>.<update|result>.<job_id>` (`op` = {ops}) and these AMQP properties:
`content_type=application/json`, `delivery_mode=2`, a unique `message_id` (drop duplicates
by it), `correlation_id` = the job's `job_id` (or the request's own `correlation_id`),
`type` = the message's `type` field, `timestamp`, `app_id=ai-service`. The service binds
`<op>_update_q` / `<op>_result_q` with `<op>.<update|result>.#`; another observer may
bind its own queue to one job's keys without draining the BE's queues.

Requests are validated strictly (unknown fields, wrong types and ranges, unsafe storage
keys are refused). An invalid request is answered `*_failed` with
`error_code: invalid_request` when its `job_id` is readable, and dead-lettered to
`<request queue>.dlq`. Every job ends with exactly one terminal message
(`*_completed`, `*_failed` or `*_cancelled`). Consumers must ignore fields they do not
know: messages may gain optional fields.

Every queue and exchange name is configurable through the environment variable in its
description; the names here are the defaults. Request queues are durable quorum queues
(`RABBITMQ_QUEUE_TYPE`), with `x-delivery-limit` (`RABBITMQ_DELIVERY_LIMIT`)."""


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
    return {name: defs[name] for name in sorted(defs)}


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


def _queue(name: str, *, exclusive: bool = False, auto_delete: bool = False, durable: bool = True) -> dict[str, Any]:
    return {"amqp": {"is": "queue", "queue": {"name": name, "durable": durable, "exclusive": exclusive,
                                                "autoDelete": auto_delete, "vhost": "/"},
                     "bindingVersion": AMQP}}


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {"amqp": {"is": "routingKey", "exchange": {"name": name, "type": kind, "durable": True,
                                                      "autoDelete": False, "vhost": "/"},
                     "bindingVersion": AMQP}}


def _msgs(*names: str) -> dict[str, Any]:
    return {name: _ref("components/messages", name) for name in names}


JOB_ID_PARAMETER = {"description": "The job's job_id (1-64 characters of A-Z a-z 0-9 _ -)."}

def channels_and_operations(
    s: Settings, registry: Registry = OPERATIONS
) -> tuple[dict[str, Any], dict[str, Any]]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for spec in registry:
        _request_channels(s, spec, channels, operations)
        names = spec.queues(s)
        for kind, docs, queue in (("update", spec.updates, names.update), ("result", spec.results, names.result)):
            if docs and queue is not None:
                _event_channels(s, spec, kind, tuple(d.name for d in docs), queue, channels, operations)
    for spec in registry:
        if spec.rpc:
            _reply_channel(spec, channels, operations)
    _control_channels(s, channels, operations)
    return channels, operations


def _request_channels(s: Settings, spec: OperationSpec, channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """The request queue and its dead letters; receiving (and answering, for RPC) a request."""
    op, word, request = spec.name, spec.word, spec.request.name
    request_q = spec.queues(s).request
    channels[f"{op}Requests"] = {
        "address": request_q,
        "title": f"{word} requests",
        "description": (
            f"`{spec.env_prefix}_REQUEST_QUEUE`. Durable {s.rabbitmq_queue_type} queue; publish through the default "
            f"exchange with routing key `{request_q}`. Dead-letters to `{s.dead_letter_exchange}` with routing "
            f"key `{request_q}` (into `{request_q}.dlq`)." + spec.request_note
        ),
        "messages": _msgs(request),
        "bindings": _queue(request_q),
    }
    channels[f"{op}DeadLetters"] = {
        "address": f"{request_q}.dlq",
        "title": f"dead {word} requests",
        "description": (
            f"Bound to the direct exchange `{s.dead_letter_exchange}` (`DEAD_LETTER_EXCHANGE`) with routing "
            f"key `{request_q}`. Holds the requests the service rejected (invalid, or past the delivery "
            "limit) with the broker's `x-death` header. Inspect and replay with `ai-service dlq list|replay`."
        ),
        "messages": _msgs(request),
        "bindings": _queue(f"{request_q}.dlq"),
    }
    receive: dict[str, Any] = {
        "action": "receive",
        "title": f"Take a {word} request",
        "channel": _ref("channels", f"{op}Requests"),
        "messages": [_ref(f"channels/{op}Requests/messages", request)],
        "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP}},
    }
    if spec.rpc:
        receive["reply"] = {
            "address": {
                "description": "The request's AMQP reply_to property (with its correlation_id).",
                "location": "$message.header#/reply_to",
            },
            "channel": _ref("channels", f"{op}Replies"),
            "messages": [_ref(f"channels/{op}Replies/messages", doc.name) for doc in spec.results],
        }
    operations[f"receive{word.capitalize()}Request"] = receive
    operations[f"deadLetter{word.capitalize()}Request"] = {
        "action": "send",
        "title": f"Dead-letter a {word} request",
        "summary": "Rejected without requeue; the broker moves it to the .dlq.",
        "channel": _ref("channels", f"{op}DeadLetters"),
        "messages": [_ref(f"channels/{op}DeadLetters/messages", request)],
    }


def _event_channels(s: Settings, spec: OperationSpec, kind: str, names: tuple[str, ...], queue: str,
                    channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """``<op>.<kind>.<job_id>`` on the events exchange, the service's queue of them, sending one."""
    op, word, cap = spec.name, spec.word, kind.capitalize()
    channels[f"{op}{cap}s"] = {
        "address": f"{op}.{kind}.{{job_id}}",
        "title": f"{word} {kind}s of one job",
        "description": (
            f"Routing key on the topic exchange `{s.events_exchange}` (`EVENTS_EXCHANGE`). Bind a queue "
            f"of your own to `{op}.{kind}.<job_id>` to follow one job, or consume `{queue}`."
        ),
        "parameters": {"job_id": JOB_ID_PARAMETER},
        "messages": _msgs(*names),
        "bindings": _exchange(s.events_exchange, "topic"),
    }
    channels[f"{op}{cap}Queue"] = {
        "address": queue,
        "title": f"{word} {kind}s queue",
        "description": (
            f"`{spec.env_prefix}_{kind.upper()}_QUEUE`. Durable queue bound to `{s.events_exchange}` with "
            f"`{op}.{kind}.#`: every job's {kind}s, for the BE to consume."
        ),
        "messages": _msgs(*names),
        "bindings": _queue(queue),
    }
    operations[f"send{word.capitalize()}{cap}"] = _send_persistent(f"Publish a {word} {kind}", f"{op}{cap}s", names)


def _reply_channel(spec: OperationSpec, channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """The caller's ``reply_to`` queue of an RPC operation, and answering there."""
    op, word = spec.name, spec.word
    results = tuple(doc.name for doc in spec.results)
    channels[f"{op}Replies"] = {
        "address": None,
        "title": f"{word} replies (RPC)",
        "description": (
            f"The queue an {word} request names in its AMQP reply_to property (typically an exclusive, "
            "auto-delete queue of the caller). The result is published there through the default exchange "
            "with the request's correlation_id, instead of to the result queue."
        ),
        "messages": _msgs(*results),
    }
    operations[f"send{word.capitalize()}Reply"] = _send_persistent(f"Answer an {word} request (RPC)",
                                                                   f"{op}Replies", results)


def _send_persistent(title: str, channel: str, names: tuple[str, ...]) -> dict[str, Any]:
    """Publishing ``names`` on ``channel``, persistent and timestamped."""
    return {
        "action": "send",
        "title": title,
        "channel": _ref("channels", channel),
        "messages": [_ref(f"channels/{channel}/messages", name) for name in names],
        "bindings": {"amqp": {"deliveryMode": 2, "timestamp": True, "bindingVersion": AMQP}},
    }


def _control_channels(s: Settings, channels: dict[str, Any], operations: dict[str, Any]) -> None:
    """Cancels on the control exchange and the workers' heartbeats."""
    channels["control"] = {
        "address": "",
        "title": "control",
        "description": (
            f"The fanout exchange `{s.control_exchange}` (`CONTROL_EXCHANGE`); the routing key is ignored. "
            "Every worker binds an exclusive queue to it. A running job stops at its next safe point and ends "
            "with `*_cancelled`; a job cancelled before a worker took it is answered `*_cancelled` when one does."
        ),
        "messages": _msgs("cancel"),
        "bindings": _exchange(s.control_exchange, "fanout"),
    }
    operations["receiveCancel"] = {
        "action": "receive",
        "title": "Cancel a job",
        "channel": _ref("channels", "control"),
        "messages": [_ref("channels/control/messages", "cancel")],
    }
    every = s.heartbeat_seconds or Settings().heartbeat_seconds
    channels["workerHeartbeats"] = {
        "address": "worker.{state}.{name}",
        "title": "worker heartbeats",
        "description": (
            f"Routing key on the topic exchange `{s.events_exchange}` (`EVENTS_EXCHANGE`). Every worker process "
            f"publishes one every `HEARTBEAT_SECONDS` ({every:g} s), at once when its state or job changes, and a "
            "last one (`stopped`) on a warm stop. Ephemeral: non-persistent (`delivery_mode=1`), "
            "`mandatory=false`, `expiration` = 3 intervals, never spooled; no queue is bound by the service. "
            "Bind a queue of your own to `worker.#` (or `worker.*.<name>`); a worker silent for 3 of its "
            "`interval_seconds` is lost. `ai-service workers` lists them."
        ),
        "parameters": {
            "state": {"enum": ["starting", "idle", "busy", "stopping", "stopped"],
                      "description": "What the worker does: not consuming yet, no job, running a job, "
                                     "stopping warm, stopped (its last beat)."},
            "name": {"description": "`<WORKER_NAME>/<operation>` with every character other than A-Z a-z 0-9 "
                                    "_ - / replaced by `_` (at most 200 characters)."},
        },
        "messages": _msgs("workerHeartbeat"),
        "bindings": _exchange(s.events_exchange, "topic"),
    }
    operations["sendWorkerHeartbeat"] = {
        "action": "send",
        "title": "Announce a worker",
        "channel": _ref("channels", "workerHeartbeats"),
        "messages": [_ref("channels/workerHeartbeats/messages", "workerHeartbeat")],
        "bindings": {"amqp": {"deliveryMode": 1, "mandatory": False, "expiration": int(3 * every * 1000),
                              "timestamp": True, "bindingVersion": AMQP}},
    }


def document(settings: Settings | None = None, registry: Registry = OPERATIONS) -> dict[str, Any]:
    """The AsyncAPI document as a dict (default names unless ``settings`` is given)."""
    s = settings or Settings()
    channels, operations = channels_and_operations(s, registry)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "ai-service",
            "version": DOC_VERSION,
            "description": DESCRIPTION.format(events=s.events_exchange, ops=listed(registry.names())),
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": f"{s.rabbitmq_host}:{s.rabbitmq_port}",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_VHOST (default /).",
            },
            "tls": {
                "host": f"{s.rabbitmq_host}:5671",
                "protocol": "amqps",
                "protocolVersion": "0.9.1",
                "description": "With RABBITMQ_SSL=true (the broker's certificate is verified; RABBITMQ_CA_FILE).",
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas(registry), "messages": components_messages(registry)},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks; everything else as safe_dump does."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(settings: Settings | None = None, registry: Registry = OPERATIONS) -> str:
    """The document as YAML, deterministically (what docs/asyncapi.yaml holds)."""
    header = (
        "# Generated by `ai-service asyncapi` from ai_service/messages.py and the default settings.\n"
        "# Do not edit: regenerate with `ai-service asyncapi -o docs/asyncapi.yaml`.\n"
    )
    body = yaml.dump(document(settings, registry), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return header + body
