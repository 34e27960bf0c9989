"""The operations, one spec each (Dramatiq's actors, arq's ``functions``).

An :class:`OperationSpec` says everything the service needs to know about one
operation: its name, the request and message models, its queues (which settings name
them), the worker module that defines ``operation(settings)``, its ``submit`` form, how
supervisord runs it and what its HTTP API is.  The topology (:mod:`ai_service.broker`),
the CLI (:mod:`ai_service.cli`), the AsyncAPI and OpenAPI documents, the worker dispatch
and the supervisord programs are all built from :data:`OPERATIONS`, so adding an
operation is adding a spec here.

Import-light on purpose (pydantic models and the standard library only): the BE-side
CLI imports it and must start without torch or Ultralytics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ai_service import forms
from ai_service import messages as m
from ai_service.config import Settings
from ai_service.errors import ErrorCode
from ai_service.errors import (
    UnknownOperation as UnknownOperation,  # defined in errors.py, importable from here as before
)


@dataclass(frozen=True)
class QueueNames:
    """The queues of one operation."""

    op: str
    request: str
    update: str | None
    result: str

    @property
    def dlq(self) -> str:
        return f"{self.request}.dlq"

    @property
    def lease(self) -> str:
        """Holding queue whose expired lease messages dead-letter into ``request``."""
        return f"{self.request}.lease"


@dataclass(frozen=True)
class MessageDoc:
    """One message of an operation as the AsyncAPI document shows it."""

    name: str  # the component name, e.g. ``trainingStarted``
    model: type[BaseModel]
    summary: str
    example: Mapping[str, Any]


@dataclass(frozen=True)
class Supervision:
    """How supervisord runs the operation's workers (:mod:`ai_service.supervisor`)."""

    metrics_port_base: int  # METRICS_PORT = base + GPU index (or CPU worker number)
    http_port_base: int  # HTTP_PORT likewise
    stop_wait_seconds: int  # how long a warm stop may take before supervisord kills
    stop_note: str


def one_at_a_time(settings: Settings) -> int:
    """The prefetch of a long job: one per worker (and GPU)."""
    return 1


@dataclass(frozen=True)
class OperationSpec:
    """Everything about one operation, in one place."""

    name: str  # ``train``: queue prefix, routing keys, ``ai-service worker <name>``
    word: str  # ``training``: for people
    worker_module: str  # defines ``operation(settings) -> Operation``; imported only by ``ai-service worker``
    #: ``settings -> (request, update or None, result)`` queue names.
    queue_settings: Callable[[Settings], tuple[str, str | None, str]]
    request: MessageDoc
    updates: tuple[MessageDoc, ...]  # sent with routing key ``<name>.update.<job_id>``
    results: tuple[MessageDoc, ...]  # the terminal messages, ``<name>.result.<job_id>``
    submit: forms.SubmitForm
    supervision: Supervision
    #: A long job with a record in storage (``ai-service status``, the HTTP job routes, leases).
    recorded: bool = False
    #: Requests may carry ``reply_to``: the result goes there (RPC; the HTTP route answers at once).
    rpc: bool = False
    #: Extra text for the request queue's description in the AsyncAPI document.
    request_note: str = field(default="")
    #: The ``error_code`` of the operation's own failure, e.g. the ``*_failed`` that stands in
    #: for an answer the broker refused as too large (:func:`ai_service.publisher.failure_replacer`).
    error_code: ErrorCode = "internal_error"
    #: What to change so that such an answer fits.
    too_big_hint: str = "raise the broker's max_message_size and MAX_MESSAGE_BYTES with it"
    #: ``settings -> deliveries a worker takes at once`` (its ``Operation.prefetch``).
    prefetch: Callable[[Settings], int] = one_at_a_time

    def queues(self, settings: Settings) -> QueueNames:
        """The operation's queues as ``settings`` name them."""
        request, update, result = self.queue_settings(settings)
        return QueueNames(self.name, request, update, result)

    @property
    def has_update_queue(self) -> bool:
        """Progress messages have a queue of their own (inference answers only)."""
        return bool(self.updates)

    @property
    def env_prefix(self) -> str:
        """The settings' environment prefix: ``TRAIN`` as in ``TRAIN_REQUEST_QUEUE``."""
        return self.name.upper()

    @property
    def messages(self) -> tuple[MessageDoc, ...]:
        """Request, updates, results: the AsyncAPI document's order."""
        return (self.request, *self.updates, *self.results)

    @property
    def request_model(self) -> type[BaseModel]:
        """What a request is validated against, over AMQP and HTTP alike."""
        return self.request.model

    @property
    def failure_model(self) -> type[BaseModel]:
        """The result whose ``status`` is ``failed``: the answer to a request it cannot take."""
        for doc in self.results:
            status = doc.model.model_fields.get("status")
            if status is not None and status.default == "failed":
                return doc.model
        raise TypeError(f"operation {self.name!r} has no result with status 'failed'")

    def terminal_types(self) -> frozenset[str]:
        """The ``type`` of every terminal message (``<name>.result.<job_id>``)."""
        return frozenset(str(doc.model.model_fields["type"].default) for doc in self.results)


class Registry:
    """The specs in a fixed order (the order of documents, programs and help)."""

    def __init__(self, specs: Iterable[OperationSpec]) -> None:
        self._specs = {spec.name: spec for spec in specs}

    def __iter__(self) -> Iterator[OperationSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __getitem__(self, name: str) -> OperationSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownOperation(f"unknown operation {name!r}") from None

    def get(self, name: str) -> OperationSpec | None:
        """The spec of ``name``, or None for a name no spec has."""
        return self._specs.get(name)

    def names(self) -> tuple[str, ...]:
        """The operation names, in order."""
        return tuple(self._specs)

    def recorded(self) -> tuple[str, ...]:
        """The operations that keep a job record."""
        return tuple(spec.name for spec in self if spec.recorded)

    def terminal_types(self) -> frozenset[str]:
        """Every operation's terminal message types."""
        return frozenset().union(*(spec.terminal_types() for spec in self))

    def plus(self, *specs: OperationSpec) -> Registry:
        """This registry and ``specs`` (a test's fake operation)."""
        return Registry((*self, *specs))


def listed(words: Iterable[str], conjunction: str = "or") -> str:
    """``a, b or c``, for help and documents."""
    *head, last = words
    return f"{', '.join(head)} {conjunction} {last}" if head else last


_TS = "2024-01-15T10:30:45.123456+00:00"
_ARTIFACT = {"format": "onnx", "path": "models/yolov8n/exports/my-dataset.onnx", "size_bytes": 12345678,
             "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "verified": True}

TRAIN = OperationSpec(
    name="train",
    word="training",
    worker_module="workers.training",
    queue_settings=lambda s: (s.train_request_queue, s.train_update_queue, s.train_result_queue),
    request=MessageDoc("trainingRequest", m.TrainingRequest, "Start a training job.", {
        "job_id": "abc12345",
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": 100, "batch": 16, "imgsz": 640},
    }),
    updates=(
        MessageDoc("trainingStarted", m.TrainingStarted, "A worker took the training job.", {
            "job_id": "abc12345", "total_epochs": 100, "resumed_from_epoch": 0, "worker": "host-a/train-gpu0",
            "timestamp": _TS}),
        MessageDoc("epochUpdate", m.EpochUpdate, "One training epoch finished.", {
            "job_id": "abc12345", "current_epoch": 15, "total_epochs": 100, "progress": 15.0,
            "metrics": {"train_loss": 0.0234, "mAP50": 0.789, "box_loss": 0.0123, "cls_loss": 0.0089,
                        "dfl_loss": 0.0022},
            "eta_seconds": 3120.5, "timestamp": _TS}),
    ),
    results=(
        MessageDoc("trainingCompleted", m.TrainingCompleted, "Training ended; the best weights are in storage.", {
            "job_id": "abc12345", "model_path": "models/yolov8n/my-dataset.pt",
            "final_metrics": {"final_mAP50": 0.892, "final_loss": 0.0156, "training_epochs": 100},
            "training_time": 3600.5, "timestamp": _TS}),
        MessageDoc("trainingFailed", m.TrainingFailed, "Training ended with an error.", {
            "job_id": "abc12345", "current_epoch": 23, "error_code": "out_of_memory",
            "error_message": "CUDA out of memory", "partial_metrics": {"last_loss": 0.0234, "last_mAP50": 0.567},
            "timestamp": _TS}),
        MessageDoc("trainingCancelled", m.TrainingCancelled, "Training was cancelled.", {
            "job_id": "abc12345", "current_epoch": 7, "checkpoint_path": "jobs/abc12345/last.pt", "timestamp": _TS}),
    ),
    submit=forms.TRAINING,
    supervision=Supervision(9100, 8100, 60,
                            "warm stop: abort within one batch, hand the job back, flush the publisher (<= 15 s)"),
    recorded=True,
    error_code="training_error",
)

CONVERT = OperationSpec(
    name="convert",
    word="conversion",
    worker_module="workers.conversion",
    queue_settings=lambda s: (s.convert_request_queue, s.convert_update_queue, s.convert_result_queue),
    request=MessageDoc("conversionRequest", m.ConversionRequest, "Export a model to other formats.", {
        "job_id": "conv0001",
        "model": {"path": "models/yolov8n/my-dataset.pt"},
        "formats": ["onnx", "torchscript"],
        "options": {"imgsz": 640, "half": False, "int8": False, "dynamic": False, "simplify": True, "opset": None,
                    "batch": 1},
        "output": {"prefix": "models/yolov8n/exports"},
    }),
    updates=(
        MessageDoc("conversionStarted", m.ConversionStarted, "A worker took the conversion job.", {
            "job_id": "conv0001", "formats": ["onnx", "torchscript"], "worker": "host-a/convert-gpu0",
            "timestamp": _TS}),
        MessageDoc("conversionUpdate", m.ConversionUpdate, "One format was exported.", {
            "job_id": "conv0001", "current_format": "onnx", "progress": 50.0, "artifact": _ARTIFACT,
            "timestamp": _TS}),
    ),
    results=(
        MessageDoc("conversionCompleted", m.ConversionCompleted, "Every format was exported.", {
            "job_id": "conv0001", "artifacts": [_ARTIFACT], "conversion_time": 12.3, "timestamp": _TS}),
        MessageDoc("conversionFailed", m.ConversionFailed, "A format failed; artifacts lists those that succeeded.", {
            "job_id": "conv0001", "error_code": "unsupported_format",
            "error_message": "engine export needs a CUDA GPU; none is visible", "failed_format": "engine",
            "artifacts": [_ARTIFACT], "timestamp": _TS}),
        MessageDoc("conversionCancelled", m.ConversionCancelled, "The conversion was cancelled.", {
            "job_id": "conv0001", "artifacts": [], "timestamp": _TS}),
    ),
    submit=forms.CONVERSION,
    supervision=Supervision(9200, 8200, 600, "an export in progress is finished (TensorRT builds can take minutes)"),
    recorded=True,
    error_code="export_error",
)

INFER = OperationSpec(
    name="infer",
    word="inference",
    worker_module="workers.inference",
    queue_settings=lambda s: (s.infer_request_queue, None, s.infer_result_queue),
    request=MessageDoc("inferenceRequest", m.InferenceRequest, "Run detection on images.", {
        "job_id": "inf0001",
        "model": {"path": "models/yolov8n/my-dataset.pt"},
        "images": [{"path": "images/street.jpg"}, {"data": "iVBORw0KGgo="}],
        "params": {"conf": 0.25, "iou": 0.7, "imgsz": 640, "max_det": 300, "classes": None},
    }),
    updates=(),
    results=(
        MessageDoc("inferenceCompleted", m.InferenceCompleted, "The detections of every image.", {
            "job_id": "inf0001", "model_path": "models/yolov8n/my-dataset.pt",
            "results": [{"image": "images/street.jpg", "width": 1280, "height": 720,
                         "detections": [{"class_id": 0, "class_name": "car", "confidence": 0.91,
                                         "box": {"x1": 10.5, "y1": 20.0, "x2": 110.0, "y2": 90.25}}]}],
            "inference_time_ms": 14.2, "timestamp": _TS}),
        MessageDoc("inferenceFailed", m.InferenceFailed, "The inference failed.", {
            "job_id": "inf0001", "error_code": "model_not_found",
            "error_message": "model 'models/yolov8n/missing.pt' does not exist in storage", "timestamp": _TS}),
    ),
    submit=forms.INFERENCE,
    supervision=Supervision(9300, 8300, 30, "in-flight requests are answered first"),
    rpc=True,
    request_note=" A request may carry the AMQP `reply_to` and `correlation_id` properties: the result then "
    "goes to that queue instead of the result queue (RPC).",
    error_code="inference_error",
    prefetch=lambda s: max(1, s.infer_prefetch),  # INFER_PREFETCH requests in flight, one engine thread
    too_big_hint="lower max_det, raise conf or send fewer images per request",
)

#: Every operation the service runs, in the order documents, programs and help list them.
OPERATIONS = Registry((TRAIN, CONVERT, INFER))
