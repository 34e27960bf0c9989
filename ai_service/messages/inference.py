"""The inference messages (CONTRACT.md, Inference): the request with its images and the detections."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from ai_service.limits import limits_of
from ai_service.messages.base import (
    ImgSize,
    JobRequest,
    ModelRef,
    StorageKey,
    _Message,
    _Part,
    _Request,
    _within,
    utc_now,
)


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


class Box(_Part):
    x1: float
    y1: float
    x2: float
    y2: float


class Detection(_Part):
    class_id: int
    class_name: str
    confidence: float
    box: Box


class ImageResult(_Part):
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
