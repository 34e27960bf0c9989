"""Every message of CONTRACT.md as a pydantic model: the only place the wire format lives.

Requests (BE -> AI) are validated strictly: unknown fields, wrong types, out-of-range
values and unsafe storage keys are refused, and the error names each bad field.
Outgoing messages (AI -> BE) serialise to exactly the contract's field names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from ai_service.errors import InvalidInput, UnsafeKey
from ai_service.keys import validate_key
from ai_service.limits import Limits, limits_of

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STRING_CHARS = 1024

#: The contract's operations. The registry (:mod:`ai_service.registry`) imports this module,
#: so it cannot be read here: tests/test_registry.py pins the two equal.
OPERATIONS = ("train", "convert", "infer")
#: An operation's name on the wire (a routing-key word). Which names exist is the
#: registry's: code that builds or reads a message naming one validates it with the
#: context ``{"operations": registry.names()}`` (see :class:`WorkerHeartbeat`).
OperationName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


def utc_now() -> str:
    """ISO 8601 UTC timestamp with offset (``2024-01-15T10:30:45.123456+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_message_id() -> str:
    return uuid.uuid4().hex


def derived_message_id(op: str, job_id: str, message_type: str, detail: str = "") -> str:
    """A message_id derived from the job (CONTRACT.md, Common rules): the same message of the
    same job has the same id whichever worker sends it, and however often."""
    return hashlib.sha256(f"{op}\0{job_id}\0{message_type}\0{detail}".encode()).hexdigest()[:32]


def _key(value: str, info: ValidationInfo) -> str:
    try:
        validate_key(value)
    except UnsafeKey as exc:
        raise ValueError(exc.message) from None
    limits = limits_of(info.context)
    if limits.reserved(value):
        raise ValueError(f"names the service's own storage area {limits.jobs_prefix!r} (JOBS_PREFIX); "
                         "use a key outside it")
    return value


def _bound(name: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise ValueError(f"{name} {value} is over the limit of {limit} ({setting})")


def _within(name: str, limit: str, setting: str) -> AfterValidator:
    """Check a number against the configured ``Limits.<limit>`` (README: ``setting``)."""

    def check(value: int | None, info: ValidationInfo) -> int | None:
        if value is not None:
            _bound(name, value, getattr(limits_of(info.context), limit), setting)
        return value

    return AfterValidator(check)


ImgSize = Annotated[int, Field(ge=32, le=8192), _within("imgsz", "max_imgsz", "MAX_IMGSZ")]


JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
StorageKey = Annotated[str, StringConstraints(max_length=MAX_STRING_CHARS), AfterValidator(_key)]
ShortStr = Annotated[str, StringConstraints(max_length=MAX_STRING_CHARS)]


class _Request(BaseModel):
    """Strict base for BE -> AI messages: unknown fields and type coercion refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class JobRequest(_Request):
    """A request that starts a job: every one has a ``job_id``."""

    job_id: JobId


class _Message(BaseModel):
    """Base for AI -> BE messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Optional fields left out of the JSON when they are None (extras the contract
    #: allows but does not require). Other None fields are sent as ``null``.
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A serializer (not a step in to_json_dict) so that nested messages -- an
        # Artifact inside conversion_completed -- drop their unset extras too.
        data: dict[str, Any] = handler(self)
        for name in self.omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode()


# --- training -------------------------------------------------------------------------


class DatasetRef(_Request):
    s3_prefix: StorageKey
    name: ShortStr


class TrainingOutput(_Request):
    prefix: StorageKey
    model_name: StorageKey

    @property
    def model_key(self) -> str:
        return f"{self.prefix.rstrip('/')}/{self.model_name}"

    @model_validator(mode="after")
    def _outside_reserved(self, info: ValidationInfo) -> "TrainingOutput":
        limits = limits_of(info.context)
        if limits.reserved(self.model_key):
            raise ValueError(f"prefix + model_name names the service's own storage area {limits.jobs_prefix!r} "
                             "(JOBS_PREFIX)")
        return self


Optimizer = Literal["SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp", "auto"]


class Hyperparams(_Request):
    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    epochs: Annotated[int, Field(ge=1, le=1_000_000), _within("epochs", "max_epochs", "MAX_EPOCHS")]
    batch: int
    imgsz: ImgSize
    patience: int | None = Field(default=None, ge=0, le=10000)
    lr0: float | None = Field(default=None, gt=0, le=10)
    lrf: float | None = Field(default=None, gt=0, le=10)
    optimizer: Optimizer | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    workers: Annotated[int | None, Field(ge=0, le=64),
                       _within("workers", "max_dataloader_workers", "MAX_DATALOADER_WORKERS")] = None
    cos_lr: bool | None = None
    close_mosaic: int | None = Field(default=None, ge=0, le=10000)
    fraction: float | None = Field(default=None, gt=0, le=1)
    cache: bool | Literal["ram", "disk"] | None = None
    pretrained: StorageKey | None = None

    @field_validator("batch")
    @classmethod
    def _batch_range(cls, value: int, info: ValidationInfo) -> int:
        limit = limits_of(info.context).max_train_batch
        if value != -1 and not 1 <= value <= limit:
            raise ValueError(f"batch must be -1 (auto) or between 1 and {limit} (MAX_TRAIN_BATCH)")
        return value

    @field_validator("cache")
    @classmethod
    def _cache_allowed(cls, value: bool | str | None, info: ValidationInfo) -> bool | str | None:
        if value in (True, "ram") and not limits_of(info.context).allow_ram_cache:
            raise ValueError("caching the decoded dataset in RAM is off on this service (ALLOW_RAM_CACHE); "
                             "use 'disk' or leave it unset")
        return value

    def ultralytics_overrides(self) -> dict[str, Any]:
        """The optional hyperparameters the BE set, as Ultralytics train() arguments."""
        skip = {"model", "epochs", "batch", "imgsz", "pretrained"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class TrainingRequest(JobRequest):
    dataset: DatasetRef
    output: TrainingOutput
    hyperparams: Hyperparams


class TrainingStarted(_Message):
    type: Literal["training_started"] = "training_started"
    job_id: str
    status: Literal["running"] = "running"
    total_epochs: int
    resumed_from_epoch: int = 0
    worker: str
    timestamp: str = Field(default_factory=utc_now)


class EpochUpdate(_Message):
    omit_if_none = frozenset({"eta_seconds"})
    type: Literal["epoch_update"] = "epoch_update"
    job_id: str
    status: Literal["running"] = "running"
    current_epoch: int
    total_epochs: int
    progress: float
    metrics: dict[str, float]
    eta_seconds: float | None = None
    timestamp: str = Field(default_factory=utc_now)


class TrainingCompleted(_Message):
    type: Literal["training_completed"] = "training_completed"
    job_id: str
    status: Literal["completed"] = "completed"
    progress: float = 100.0
    model_path: str
    final_metrics: dict[str, float | int]
    training_time: float
    timestamp: str = Field(default_factory=utc_now)


class TrainingFailed(_Message):
    type: Literal["training_failed"] = "training_failed"
    job_id: str
    status: Literal["failed"] = "failed"
    current_epoch: int = 0
    error_code: str
    error_message: str
    partial_metrics: dict[str, float] = Field(default_factory=dict)
    timestamp: str = Field(default_factory=utc_now)


class TrainingCancelled(_Message):
    type: Literal["training_cancelled"] = "training_cancelled"
    job_id: str
    status: Literal["cancelled"] = "cancelled"
    current_epoch: int = 0
    checkpoint_path: str | None = None
    timestamp: str = Field(default_factory=utc_now)


# --- conversion -----------------------------------------------------------------------


class ModelRef(_Request):
    path: StorageKey


class ConversionOptions(_Request):
    imgsz: ImgSize = 640
    half: bool = False
    int8: bool = False
    dynamic: bool = False
    simplify: bool = True
    opset: int | None = Field(default=None, ge=7, le=30)
    batch: Annotated[int, Field(ge=1, le=1024), _within("batch", "max_export_batch", "MAX_EXPORT_BATCH")] = 1




class ConversionOutput(_Request):
    prefix: StorageKey


FormatName = Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")]


class ConversionRequest(JobRequest):
    model: ModelRef
    formats: list[FormatName] = Field(min_length=1, max_length=16)
    options: ConversionOptions = Field(default_factory=ConversionOptions)
    output: ConversionOutput
    dataset: DatasetRef | None = None

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("formats must not repeat a format")
        return value


class Artifact(_Message):
    format: str
    path: str
    size_bytes: int
    sha256: str
    verified: bool
    verification: str | None = None
    omit_if_none = frozenset({"verification"})


class ConversionStarted(_Message):
    type: Literal["conversion_started"] = "conversion_started"
    job_id: str
    status: Literal["running"] = "running"
    formats: list[str]
    worker: str
    timestamp: str = Field(default_factory=utc_now)


class ConversionUpdate(_Message):
    omit_if_none = frozenset({"artifact"})
    type: Literal["conversion_update"] = "conversion_update"
    job_id: str
    status: Literal["running"] = "running"
    current_format: str
    progress: float
    artifact: Artifact | None = None
    timestamp: str = Field(default_factory=utc_now)


class ConversionCompleted(_Message):
    type: Literal["conversion_completed"] = "conversion_completed"
    job_id: str
    status: Literal["completed"] = "completed"
    progress: float = 100.0
    artifacts: list[Artifact]
    conversion_time: float
    timestamp: str = Field(default_factory=utc_now)


class ConversionFailed(_Message):
    type: Literal["conversion_failed"] = "conversion_failed"
    job_id: str
    status: Literal["failed"] = "failed"
    error_code: str
    error_message: str
    failed_format: str | None = None
    artifacts: list[Artifact] = Field(default_factory=list)
    timestamp: str = Field(default_factory=utc_now)


class ConversionCancelled(_Message):
    type: Literal["conversion_cancelled"] = "conversion_cancelled"
    job_id: str
    status: Literal["cancelled"] = "cancelled"
    artifacts: list[Artifact] = Field(default_factory=list)
    timestamp: str = Field(default_factory=utc_now)


# --- inference ------------------------------------------------------------------------


class ImagePath(_Request):
    path: StorageKey


class ImageData(_Request):
    data: str

    @field_validator("data")
    @classmethod
    def _base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("data must be base64 (standard alphabet)") from None
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.data, validate=True)


class InferenceParams(_Request):
    conf: float = Field(default=0.25, ge=0, le=1)
    iou: float = Field(default=0.7, ge=0, le=1)
    imgsz: ImgSize = 640
    max_det: Annotated[int, Field(ge=1, le=10000), _within("max_det", "max_det", "MAX_DET")] = 300
    classes: list[Annotated[int, Field(ge=0, le=100000)]] | None = Field(default=None, max_length=1000)




class InferenceRequest(JobRequest):
    model: ModelRef
    images: list[ImagePath | ImageData] = Field(min_length=1)
    params: InferenceParams = Field(default_factory=InferenceParams)

    @field_validator("images", mode="before")
    @classmethod
    def _images_bound(cls, value: Any, info: ValidationInfo) -> Any:
        """Counted before any item is validated: 5,000 base64 images cost one len()."""
        limit = limits_of(info.context).max_images_per_request
        if isinstance(value, list) and len(value) > limit:
            raise ValueError(f"{len(value)} images, at most {limit} per request (MAX_IMAGES_PER_REQUEST)")
        return value


class Box(_Message):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(_Message):
    class_id: int
    class_name: str
    confidence: float
    box: Box


class ImageResult(_Message):
    image: str
    width: int
    height: int
    detections: list[Detection]


class InferenceCompleted(_Message):
    type: Literal["inference_completed"] = "inference_completed"
    job_id: str
    status: Literal["completed"] = "completed"
    model_path: str
    results: list[ImageResult]
    inference_time_ms: float
    timestamp: str = Field(default_factory=utc_now)


class InferenceFailed(_Message):
    type: Literal["inference_failed"] = "inference_failed"
    job_id: str
    status: Literal["failed"] = "failed"
    error_code: str
    error_message: str
    timestamp: str = Field(default_factory=utc_now)


# --- control --------------------------------------------------------------------------


class Cancel(_Request):
    type: Literal["cancel"]
    job_id: JobId


# --- parsing --------------------------------------------------------------------------

TERMINAL_TYPES = frozenset(
    {
        "training_completed",
        "training_failed",
        "training_cancelled",
        "conversion_completed",
        "conversion_failed",
        "conversion_cancelled",
        "inference_completed",
        "inference_failed",
    }
)


def is_terminal(message: _Message) -> bool:
    return getattr(message, "type", "") in TERMINAL_TYPES


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field, without echoing the (possibly huge) input."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "message"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    text = "; ".join(parts)
    return text if len(text) <= 2000 else text[:1997] + "..."


def readable_job_id(payload: Any) -> str | None:
    """The request's job_id when it is present and valid, for answering a bad request."""
    if isinstance(payload, dict):
        job_id = payload.get("job_id")
        if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id):
            return job_id
    return None


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def parse_request(
    model: type[_ModelT], body: bytes, max_bytes: int, limits: Limits | None = None
) -> tuple[_ModelT, Any]:
    """Decode and validate a request body against ``limits`` (the defaults when None).

    Returns ``(request, payload)``. Raises :class:`InvalidRequest`, which carries the
    job_id when one could be read so the caller can answer the BE.
    """
    if len(body) > max_bytes:
        raise InvalidRequest(f"message body is {len(body)} bytes, over the {max_bytes}-byte limit", None)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's limit on
        # integer digits; RecursionError a too deeply nested document.
        raise InvalidRequest(f"message body is not valid JSON ({exc.__class__.__name__})", None) from None
    if not isinstance(payload, dict):
        raise InvalidRequest("message body must be a JSON object", None)
    job_id = readable_job_id(payload)
    try:
        request = model.model_validate(payload, context=(limits or Limits()).context())
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc), job_id) from None
    return request, payload


class InvalidRequest(InvalidInput):
    """A request that failed parsing or validation; ``job_id`` set when readable."""

    def __init__(self, message: str, job_id: str | None) -> None:
        super().__init__(f"invalid request: {message}")
        self.job_id = job_id


# --- worker heartbeats (ai_service/heartbeat.py) --------------------------------------

WorkerState = Literal["starting", "idle", "busy", "stopping", "stopped"]


class WorkerHeartbeat(_Message):
    """A worker process announcing itself: ``worker.<state>.<name>`` on EVENTS_EXCHANGE.

    Ephemeral (non-persistent, unspooled, expiring after about three intervals): a BE
    or ``ai-service workers`` binds a queue of its own to ``worker.#`` to see them.
    ``job_id`` / ``progress`` are null while no job runs (``progress`` also until the
    job first reports one); ``gpu`` is null on CPU workers.
    """

    type: Literal["worker_heartbeat"] = "worker_heartbeat"
    worker: str  # WORKER_NAME as configured
    name: str  # the routing key's <name>: "<WORKER_NAME>/<operation>", made routing-key safe
    operation: OperationName  # one of the registry's (validation context ``operations``)
    state: WorkerState
    device: str  # cpu or cuda:0 (the first visible GPU)
    gpu: str | None = None
    job_id: str | None = None
    progress: float | None = None
    jobs_running: int = 0
    versions: dict[str, str | None]
    pid: int
    host: str
    started_at: str
    interval_seconds: float
    timestamp: str = Field(default_factory=utc_now)

    @field_validator("operation")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """A name the registry has, when the caller passes its names as ``operations``."""
        known = (info.context or {}).get("operations")
        if known is not None and value not in known:
            raise ValueError(f"{value!r} is not a registered operation ({', '.join(known)})")
        return value
