"""Every message of CONTRACT.md as a pydantic model: the only place the wire format lives.

Requests (BE -> AI) are validated strictly: unknown fields, wrong types, out-of-range
values and unsafe storage keys are refused, and the error names each bad field.
Outgoing messages (AI -> BE) serialise to exactly the contract's field names.

One module per operation (:mod:`.training`, :mod:`.conversion`, :mod:`.inference`),
the shared field types and bases in :mod:`.base`, cancel and heartbeats in
:mod:`.control`, request parsing in :mod:`.parsing`; every name is importable from
here, as it was when this was one module.
"""

from __future__ import annotations

from ai_service.messages.base import (
    JOB_ID_RE,
    MAX_STRING_CHARS,
    OPERATIONS,
    DatasetRef,
    ImgSize,
    JobId,
    JobRequest,
    ModelRef,
    OperationName,
    ShortStr,
    StorageKey,
    _Message,
    _Request,
    _within,
    derived_message_id,
    json_bytes,
    new_message_id,
    utc_now,
)
from ai_service.messages.control import (
    Cancel,
    WorkerHeartbeat,
    WorkerState,
)
from ai_service.messages.conversion import (
    Artifact,
    ConversionCancelled,
    ConversionCompleted,
    ConversionFailed,
    ConversionOptions,
    ConversionOutput,
    ConversionRequest,
    ConversionStarted,
    ConversionUpdate,
    FormatName,
)
from ai_service.messages.inference import (
    Box,
    Detection,
    ImageData,
    ImagePath,
    ImageResult,
    InferenceCompleted,
    InferenceFailed,
    InferenceParams,
    InferenceRequest,
)
from ai_service.messages.parsing import (
    TERMINAL_TYPES,
    InvalidRequest,
    describe_validation_error,
    is_terminal,
    parse_request,
    readable_job_id,
)
from ai_service.messages.training import (
    EpochUpdate,
    Hyperparams,
    Optimizer,
    TrainingCancelled,
    TrainingCompleted,
    TrainingFailed,
    TrainingOutput,
    TrainingRequest,
    TrainingStarted,
)

__all__ = [
    "JOB_ID_RE",
    "MAX_STRING_CHARS",
    "OPERATIONS",
    "TERMINAL_TYPES",
    "Artifact",
    "Box",
    "Cancel",
    "ConversionCancelled",
    "ConversionCompleted",
    "ConversionFailed",
    "ConversionOptions",
    "ConversionOutput",
    "ConversionRequest",
    "ConversionStarted",
    "ConversionUpdate",
    "DatasetRef",
    "Detection",
    "EpochUpdate",
    "FormatName",
    "Hyperparams",
    "ImageData",
    "ImagePath",
    "ImageResult",
    "ImgSize",
    "InferenceCompleted",
    "InferenceFailed",
    "InferenceParams",
    "InferenceRequest",
    "InvalidRequest",
    "JobId",
    "JobRequest",
    "ModelRef",
    "OperationName",
    "Optimizer",
    "ShortStr",
    "StorageKey",
    "TrainingCancelled",
    "TrainingCompleted",
    "TrainingFailed",
    "TrainingOutput",
    "TrainingRequest",
    "TrainingStarted",
    "WorkerHeartbeat",
    "WorkerState",
    "_Message",
    "_Request",
    "_within",
    "derived_message_id",
    "describe_validation_error",
    "is_terminal",
    "json_bytes",
    "new_message_id",
    "parse_request",
    "readable_job_id",
    "utc_now",
]
