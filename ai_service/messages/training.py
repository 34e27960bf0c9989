"""The training messages (CONTRACT.md, Training): the request and what a training job reports."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator

from ai_service.limits import limits_of
from ai_service.messages.base import (
    DatasetRef,
    ImgSize,
    JobRequest,
    StorageKey,
    _Message,
    _Request,
    _within,
    utc_now,
)


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
