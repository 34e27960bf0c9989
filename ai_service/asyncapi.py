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

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ai_service import messages as m
from ai_service.config import Settings

ASYNCAPI_VERSION = "3.0.0"
#: Version of the contract this document describes; bump with CONTRACT.md.
DOC_VERSION = "1.0.0"
AMQP = "0.3.0"  # AMQP binding version
SCHEMA_REF = "#/components/schemas/{model}"
TS = "2024-01-15T10:30:45.123456+00:00"

#: component message name -> (model, is a request (BE -> AI), summary)
MESSAGES: dict[str, tuple[type[BaseModel], bool, str]] = {
    "trainingRequest": (m.TrainingRequest, True, "Start a training job."),
    "trainingStarted": (m.TrainingStarted, False, "A worker took the training job."),
    "epochUpdate": (m.EpochUpdate, False, "One training epoch finished."),
    "trainingCompleted": (m.TrainingCompleted, False, "Training ended; the best weights are in storage."),
    "trainingFailed": (m.TrainingFailed, False, "Training ended with an error."),
    "trainingCancelled": (m.TrainingCancelled, False, "Training was cancelled."),
    "conversionRequest": (m.ConversionRequest, True, "Export a model to other formats."),
    "conversionStarted": (m.ConversionStarted, False, "A worker took the conversion job."),
    "conversionUpdate": (m.ConversionUpdate, False, "One format was exported."),
    "conversionCompleted": (m.ConversionCompleted, False, "Every format was exported."),
    "conversionFailed": (m.ConversionFailed, False, "A format failed; artifacts lists those that succeeded."),
    "conversionCancelled": (m.ConversionCancelled, False, "The conversion was cancelled."),
    "inferenceRequest": (m.InferenceRequest, True, "Run detection on images."),
    "inferenceCompleted": (m.InferenceCompleted, False, "The detections of every image."),
    "inferenceFailed": (m.InferenceFailed, False, "The inference failed."),
    "cancel": (m.Cancel, True, "Cancel a training or conversion job."),
    "workerHeartbeat": (m.WorkerHeartbeat, False, "A worker process announcing itself (ephemeral)."),
}

_ARTIFACT = {"format": "onnx", "path": "models/yolov8n/exports/my-dataset.onnx", "size_bytes": 12345678,
             "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "verified": True}

#: One example per message, in the contract's own words (validated by the models).
EXAMPLES: dict[str, dict[str, Any]] = {
    "trainingRequest": {
        "job_id": "abc12345",
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": 100, "batch": 16, "imgsz": 640},
    },
    "trainingStarted": {"job_id": "abc12345", "total_epochs": 100, "resumed_from_epoch": 0,
                        "worker": "host-a/train-gpu0", "timestamp": TS},
    "epochUpdate": {"job_id": "abc12345", "current_epoch": 15, "total_epochs": 100, "progress": 15.0,
                    "metrics": {"train_loss": 0.0234, "mAP50": 0.789, "box_loss": 0.0123, "cls_loss": 0.0089,
                                "dfl_loss": 0.0022},
                    "eta_seconds": 3120.5, "timestamp": TS},
    "trainingCompleted": {"job_id": "abc12345", "model_path": "models/yolov8n/my-dataset.pt",
                          "final_metrics": {"final_mAP50": 0.892, "final_loss": 0.0156, "training_epochs": 100},
                          "training_time": 3600.5, "timestamp": TS},
    "trainingFailed": {"job_id": "abc12345", "current_epoch": 23, "error_code": "out_of_memory",
                       "error_message": "CUDA out of memory", "partial_metrics": {"last_loss": 0.0234,
                                                                                 "last_mAP50": 0.567},
                       "timestamp": TS},
    "trainingCancelled": {"job_id": "abc12345", "current_epoch": 7,
                          "checkpoint_path": "jobs/abc12345/last.pt", "timestamp": TS},
    "conversionRequest": {
        "job_id": "conv0001",
        "model": {"path": "models/yolov8n/my-dataset.pt"},
        "formats": ["onnx", "torchscript"],
        "options": {"imgsz": 640, "half": False, "int8": False, "dynamic": False, "simplify": True, "opset": None,
                    "batch": 1},
        "output": {"prefix": "models/yolov8n/exports"},
    },
    "conversionStarted": {"job_id": "conv0001", "formats": ["onnx", "torchscript"], "worker": "host-a/convert-gpu0",
                          "timestamp": TS},
    "conversionUpdate": {"job_id": "conv0001", "current_format": "onnx", "progress": 50.0, "artifact": _ARTIFACT,
                         "timestamp": TS},
    "conversionCompleted": {"job_id": "conv0001", "artifacts": [_ARTIFACT], "conversion_time": 12.3,
                            "timestamp": TS},
    "conversionFailed": {"job_id": "conv0001", "error_code": "unsupported_format",
                         "error_message": "engine export needs a CUDA GPU; none is visible",
                         "failed_format": "engine", "artifacts": [_ARTIFACT], "timestamp": TS},
    "conversionCancelled": {"job_id": "conv0001", "artifacts": [], "timestamp": TS},
    "inferenceRequest": {
        "job_id": "inf0001",
        "model": {"path": "models/yolov8n/my-dataset.pt"},
        "images": [{"path": "images/street.jpg"}, {"data": "iVBORw0KGgo="}],
        "params": {"conf": 0.25, "iou": 0.7, "imgsz": 640, "max_det": 300, "classes": None},
    },
    "inferenceCompleted": {
        "job_id": "inf0001", "model_path": "models/yolov8n/my-dataset.pt",
        "results": [{"image": "images/street.jpg", "width": 1280, "height": 720,
                     "detections": [{"class_id": 0, "class_name": "car", "confidence": 0.91,
                                     "box": {"x1": 10.5, "y1": 20.0, "x2": 110.0, "y2": 90.25}}]}],
        "inference_time_ms": 14.2, "timestamp": TS,
    },
    "inferenceFailed": {"job_id": "inf0001", "error_code": "model_not_found",
                        "error_message": "model 'models/yolov8n/missing.pt' does not exist in storage",
                        "timestamp": TS},
    "cancel": {"type": "cancel", "job_id": "abc12345"},
    "workerHeartbeat": {
        "worker": "gpu-01/train-gpu0", "name": "gpu-01/train-gpu0/train", "operation": "train", "state": "busy",
        "device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "job_id": "abc12345", "progress": 15.0,
        "jobs_running": 1, "versions": {"ai-service": "0.1.0", "ultralytics": "8.3.0", "torch": "2.5.1"},
        "pid": 4242, "host": "gpu-01", "started_at": "2024-01-15T09:00:00.000000+00:00",
        "interval_seconds": 5.0, "timestamp": TS,
    },
}

DESCRIPTION = """\
The message contract between a backend (BE) and the ai-service workers (CONTRACT.md):
RabbitMQ only, JSON bodies (UTF-8).

Every AI -> BE message is published to the topic exchange `{events}` with routing key
`<op>.<update|result>.<job_id>` (`op` = train, convert or infer) and these AMQP properties:
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


def schemas() -> dict[str, Any]:
    """components/schemas: every model's JSON schema, nested models shared.

    Validation-mode schemas; for AI -> BE models every field the service always sends
    is marked required (all but the optional extras it leaves out when unset), and
    ``additionalProperties`` is left open (messages may gain optional fields).
    """
    models = [(model, "validation") for model, _, _ in MESSAGES.values()]
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


def _example(name: str) -> dict[str, Any]:
    model, request, _ = MESSAGES[name]
    raw = EXAMPLES[name]
    if request:
        model.model_validate(raw)  # the example is a valid request
        return raw
    message = model.model_validate(raw)
    assert isinstance(message, m._Message)
    return message.to_json_dict()


def _message_type(name: str) -> str:
    model, request, _ = MESSAGES[name]
    type_field = model.model_fields.get("type")
    if type_field is not None and isinstance(type_field.default, str):
        return type_field.default
    if name == "cancel":
        return "cancel"
    return {"trainingRequest": "train_request", "conversionRequest": "convert_request",
            "inferenceRequest": "infer_request"}[name]


def components_messages() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (model, request, summary) in MESSAGES.items():
        kind = _message_type(name)
        direction = "BE -> AI" if request else "AI -> BE"
        out[name] = {
            "name": kind,
            "title": model.__name__,
            "summary": f"{summary} ({direction})",
            "contentType": "application/json",
            "correlationId": {
                "description": "AMQP correlation_id property: the job_id (or the request's own correlation_id)",
                "location": "$message.header#/correlation_id",
            },
            "payload": {"$ref": SCHEMA_REF.format(model=model.__name__)},
            "bindings": {"amqp": {"messageType": kind, "bindingVersion": AMQP}},
            "examples": [{"name": kind, "payload": _example(name)}],
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

#: op -> (word, request message, update messages, result messages)
OPS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "train": ("training", "trainingRequest", ("trainingStarted", "epochUpdate"),
              ("trainingCompleted", "trainingFailed", "trainingCancelled")),
    "convert": ("conversion", "conversionRequest", ("conversionStarted", "conversionUpdate"),
                ("conversionCompleted", "conversionFailed", "conversionCancelled")),
    "infer": ("inference", "inferenceRequest", (), ("inferenceCompleted", "inferenceFailed")),
}


def channels_and_operations(s: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    queues = {
        "train": (s.train_request_queue, s.train_update_queue, s.train_result_queue),
        "convert": (s.convert_request_queue, s.convert_update_queue, s.convert_result_queue),
        "infer": (s.infer_request_queue, None, s.infer_result_queue),
    }
    for op, (word, request, updates, results) in OPS.items():
        request_q, update_q, result_q = queues[op]
        env = op.upper()
        channels[f"{op}Requests"] = {
            "address": request_q,
            "title": f"{word} requests",
            "description": (
                f"`{env}_REQUEST_QUEUE`. Durable {s.rabbitmq_queue_type} queue; publish through the default "
                f"exchange with routing key `{request_q}`. Dead-letters to `{s.dead_letter_exchange}` with routing "
                f"key `{request_q}` (into `{request_q}.dlq`)."
                + (" A request may carry the AMQP `reply_to` and `correlation_id` properties: the result then "
                   "goes to that queue instead of the result queue (RPC)." if op == "infer" else "")
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
        operations[f"receive{word.capitalize()}Request"] = {
            "action": "receive",
            "title": f"Take a {word} request",
            "channel": _ref("channels", f"{op}Requests"),
            "messages": [_ref(f"channels/{op}Requests/messages", request)],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP}},
        }
        if op == "infer":
            operations["receiveInferenceRequest"]["reply"] = {
                "address": {
                    "description": "The request's AMQP reply_to property (with its correlation_id).",
                    "location": "$message.header#/reply_to",
                },
                "channel": _ref("channels", "inferReplies"),
                "messages": [_ref("channels/inferReplies/messages", name) for name in results],
            }
        operations[f"deadLetter{word.capitalize()}Request"] = {
            "action": "send",
            "title": f"Dead-letter a {word} request",
            "summary": "Rejected without requeue; the broker moves it to the .dlq.",
            "channel": _ref("channels", f"{op}DeadLetters"),
            "messages": [_ref(f"channels/{op}DeadLetters/messages", request)],
        }
        for kind, names, queue in (("update", updates, update_q), ("result", results, result_q)):
            if not names or queue is None:
                continue
            cap = kind.capitalize()
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
                    f"`{env}_{kind.upper()}_QUEUE`. Durable queue bound to `{s.events_exchange}` with "
                    f"`{op}.{kind}.#`: every job's {kind}s, for the BE to consume."
                ),
                "messages": _msgs(*names),
                "bindings": _queue(queue),
            }
            operations[f"send{word.capitalize()}{cap}"] = {
                "action": "send",
                "title": f"Publish a {word} {kind}",
                "channel": _ref("channels", f"{op}{cap}s"),
                "messages": [_ref(f"channels/{op}{cap}s/messages", name) for name in names],
                "bindings": {"amqp": {"deliveryMode": 2, "timestamp": True, "bindingVersion": AMQP}},
            }
    channels["inferReplies"] = {
        "address": None,
        "title": "inference replies (RPC)",
        "description": (
            "The queue an inference request names in its AMQP reply_to property (typically an exclusive, "
            "auto-delete queue of the caller). The result is published there through the default exchange "
            "with the request's correlation_id, instead of to the result queue."
        ),
        "messages": _msgs(*OPS["infer"][3]),
    }
    operations["sendInferenceReply"] = {
        "action": "send",
        "title": "Answer an inference request (RPC)",
        "channel": _ref("channels", "inferReplies"),
        "messages": [_ref("channels/inferReplies/messages", name) for name in OPS["infer"][3]],
        "bindings": {"amqp": {"deliveryMode": 2, "timestamp": True, "bindingVersion": AMQP}},
    }
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
    return channels, operations


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI document as a dict (default names unless ``settings`` is given)."""
    s = settings or Settings()
    channels, operations = channels_and_operations(s)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "ai-service",
            "version": DOC_VERSION,
            "description": DESCRIPTION.format(events=s.events_exchange),
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
        "components": {"schemas": schemas(), "messages": components_messages()},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks; everything else as safe_dump does."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(settings: Settings | None = None) -> str:
    """The document as YAML, deterministically (what docs/asyncapi.yaml holds)."""
    header = (
        "# Generated by `ai-service asyncapi` from ai_service/messages.py and the default settings.\n"
        "# Do not edit: regenerate with `ai-service asyncapi -o docs/asyncapi.yaml`.\n"
    )
    body = yaml.dump(document(settings), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return header + body
