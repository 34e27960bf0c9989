"""The document's channels and operations: each operation's request, dead-letter, update,
result (and RPC reply) channels, the control exchange and the workers' heartbeats."""

from __future__ import annotations

from typing import Any

from ai_service.asyncapi.components import AMQP, _ref
from ai_service.config import Settings
from ai_service.registry import OPERATIONS, OperationSpec, Registry


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
