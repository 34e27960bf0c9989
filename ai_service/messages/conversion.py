"""The conversion messages (CONTRACT.md, Conversion): the request, artifacts and progress reports."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from ai_service.messages.base import (
    DatasetRef,
    ImgSize,
    JobRequest,
    ModelRef,
    StorageKey,
    _Message,
    _Request,
    _within,
    utc_now,
)


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
