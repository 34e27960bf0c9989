"""What the handler threads share: the engine and the model cache; one request's handling."""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ai_service import tracing
from ai_service.config import Settings
from ai_service.errors import ImageNotFound as ImageNotFound  # defined in errors.py, importable from here as before
from ai_service.errors import InvalidInput, ObjectNotFound
from ai_service.messages import ImageData, ImagePath, ImageResult, InferenceCompleted, InferenceRequest
from ai_service.metrics import Metrics
from ai_service.operation import JobContext
from ai_service.provenance import Provenance
from ai_service.storage import Storage
from workers.inference.cache import ModelCache
from workers.inference.engine import ENGINE_TIMEOUT_S, Engine, Job, Params, result_within
from workers.inference.images import DecodedImage, decode_image, inline_size

if TYPE_CHECKING:  # pragma: no cover
    import torch


class InferenceService:
    """What the handler threads share: the engine and the model cache."""

    def __init__(self, settings: Settings, storage: Storage, device: torch.device,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        cores = len(os.sched_getaffinity(0))
        threads = settings.infer_threads or cores
        #: Requests decoding at once: a bounded pool of the handler threads, so that a burst of
        #: deliveries does not have 16 threads fighting the predict thread for the GIL and cores.
        self.decode_threads = settings.infer_decode_threads or min(8, max(2, cores))
        self._decode_slots = threading.BoundedSemaphore(self.decode_threads)
        self.engine = Engine(device, max_batch=settings.max_batch, window_s=settings.batch_window_ms / 1000.0,
                             cpu_threads=threads, metrics=metrics)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.worker_name).strip("_") or "worker"
        self.cache = ModelCache(storage, settings.work_dir / "models" / safe, self.engine,
                                max_models=settings.model_cache_size,
                                max_bytes=settings.model_cache_max_mb * 2**20, metrics=metrics,
                                provenance=Provenance(storage, prefix=settings.jobs_prefix,
                                                      trust_external=settings.trust_external_models),
                                version_ttl=settings.model_version_ttl)

    def start(self) -> None:
        self.engine.start()

    def handle(self, request: InferenceRequest, ctx: JobContext) -> None:
        limit = self.settings.max_images_per_request
        if len(request.images) > limit:
            raise InvalidInput(f"images: {len(request.images)} images, at most {limit} per request "
                               "(MAX_IMAGES_PER_REQUEST)")
        params = Params.of(request.params)
        started = time.monotonic()
        self.engine.enter()
        submitted = False
        try:
            model = self.cache.get(request.model.path, params.imgsz, ctx.log)
            with self._decode_slots:
                images = self._decode_all(request)
            future = self.engine.submit(Job(model, params, [image.array for image in images], Future(),
                                            tracing.current()))
            submitted = True
        finally:
            if not submitted:
                self.engine.leave()
        outcome = result_within(future, ENGINE_TIMEOUT_S)
        results = [
            ImageResult(image=image.name, width=image.width, height=image.height, detections=found)
            for image, found in zip(images, outcome.detections, strict=True)
        ]
        del images
        ctx.result(InferenceCompleted(job_id=request.job_id, model_path=request.model.path, results=results,
                                      inference_time_ms=round(outcome.predict_ms, 3)))
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(time.monotonic() - started)
        ctx.log.debug("%d image(s), %d detection(s), predict %.1f ms (batch: %d request(s), %d image(s))",
                      len(results), sum(len(r.detections) for r in results), outcome.predict_ms,
                      outcome.batch_requests, outcome.batch_images)

    def _decode_all(self, request: InferenceRequest) -> list[DecodedImage]:
        s = self.settings
        pixels_left = s.max_request_pixels
        out = []
        for i, item in enumerate(request.images):
            if isinstance(item, ImagePath):
                label, name = f"images[{i}] ({item.path!r})", item.path
                raw = self._fetch(item, label)
            else:
                label, name = f"images[{i}] (inline)", str(i)
                raw = self._inline(item, label)
            array, width, height = decode_image(raw, label, max_pixels=s.max_image_pixels, pixels_left=pixels_left)
            del raw
            pixels_left -= width * height
            out.append(DecodedImage(name, width, height, array))
        return out

    def _fetch(self, item: ImagePath, label: str) -> bytes:
        cap = self.settings.max_image_bytes
        info = self.storage.stat(item.path)
        if info is None:
            raise ImageNotFound(f"{label}: no such image in storage")
        if info.size > cap:
            raise InvalidInput(f"{label}: {info.size} bytes, over the limit of {cap} per image (MAX_IMAGE_BYTES)")
        try:
            raw: bytes = self.storage.read_bytes(item.path)
        except ObjectNotFound:
            raise ImageNotFound(f"{label}: no such image in storage") from None
        if len(raw) > cap:  # replaced since the stat
            raise InvalidInput(f"{label}: {len(raw)} bytes, over the limit of {cap} per image (MAX_IMAGE_BYTES)")
        return raw

    def _inline(self, item: ImageData, label: str) -> bytes:
        cap = self.settings.max_inline_image_bytes
        size = inline_size(item.data)
        if size > cap:
            raise InvalidInput(f"{label}: {size} bytes, over the limit of {cap} for inline images "
                               "(MAX_INLINE_IMAGE_BYTES); upload it to storage and send its path")
        return item.decoded()


@dataclass(frozen=True)
class InferenceState:
    """What the inference worker's setup built once: the service its handler threads and the
    HTTP route share (an :class:`ai_service.operation.Answerer`)."""

    service: InferenceService

    def handle(self, request: InferenceRequest, ctx: JobContext) -> None:
        self.service.handle(request, ctx)

