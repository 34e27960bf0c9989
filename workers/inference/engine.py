"""The one thread that touches models: load, warm-up and micro-batched predict."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ai_service import tracing
from ai_service.errors import AIServiceError, PermanentError
from ai_service.errors import InferenceError as InferenceError  # defined in errors.py, importable from here as before
from ai_service.messages import Box, Detection, InferenceParams
from ai_service.metrics import Metrics
from workers import yolo
from workers.inference.cache import LoadedModel

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("workers.infer")

_T = TypeVar("_T")

#: How long a handler waits for the engine (queue + load + predict) before giving up.
ENGINE_TIMEOUT_S = 300.0
#: Formats torch itself runs; the others bring their own runtime and threads.
TORCH_FORMATS = frozenset({"pt", "torchscript"})


@dataclass(frozen=True)
class Params:
    """The predict parameters; requests batch together only when these are equal."""

    conf: float
    iou: float
    imgsz: int
    max_det: int
    classes: tuple[int, ...] | None

    @classmethod
    def of(cls, p: InferenceParams) -> Params:
        return cls(p.conf, p.iou, p.imgsz, p.max_det, tuple(p.classes) if p.classes is not None else None)

    def kwargs(self) -> dict[str, Any]:
        return {"conf": self.conf, "iou": self.iou, "imgsz": self.imgsz, "max_det": self.max_det,
                "classes": list(self.classes) if self.classes is not None else None}


@dataclass
class Outcome:
    detections: list[list[Detection]]  # per image of the request
    predict_ms: float  # wall time of the predict call(s) that ran this request's images
    batch_requests: int
    batch_images: int


@dataclass
class Job:
    """One request's decoded images waiting for the engine."""

    model: LoadedModel
    params: Params
    images: list[np.ndarray]
    future: Future[Outcome]
    #: The request's trace context (its consume span): the batch span's parent or link.
    trace: Any = None

    @property
    def key(self) -> tuple[str, str, Params]:
        return (self.model.ref.key, self.model.ref.version, self.params)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future[Any]


class Engine:
    """The one thread that runs models: loads, warm-ups and (micro-batched) predicts.

    ``max_batch`` images at most per predict call (1: no batching).  ``window_s``: how
    long a batch may wait for requests that handlers are still preparing; it never waits
    when no handler is (a lone request goes at once).
    """

    def __init__(self, device: torch.device, *, max_batch: int, window_s: float, cpu_threads: int,
                 metrics: Metrics | None = None) -> None:
        self.device = device
        self.metrics = metrics
        self.max_batch = max(1, max_batch)
        self.window_s = max(0.0, window_s)
        self.cpu_threads = max(1, cpu_threads)
        self._cond = threading.Condition()
        self._tasks: deque[Job | _Call] = deque()
        self._arriving = 0
        self._thread = threading.Thread(target=self._run, name="infer-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- handler side ------------------------------------------------------------------

    def call(self, fn: Callable[[], _T], timeout: float = ENGINE_TIMEOUT_S) -> _T:
        """Run ``fn`` on the engine thread and return its result (or raise its error)."""
        future: Future[_T] = Future()
        with self._cond:
            self._tasks.append(_Call(fn, future))
            self._cond.notify_all()
        return result_within(future, timeout)

    def enter(self) -> None:
        """A handler started preparing a request (the batcher may wait for it)."""
        with self._cond:
            self._arriving += 1

    def leave(self) -> None:
        """A handler gave up before submitting (its request failed)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def submit(self, job: Job) -> Future[Outcome]:
        """Queue a prepared request; also ends its ``enter``."""
        with self._cond:
            self._arriving -= 1
            self._tasks.append(job)
            self._cond.notify_all()
        return job.future

    # --- engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks:
                    self._cond.wait()
                task = self._tasks.popleft()
            try:
                if isinstance(task, _Call):
                    _settle(task.future, task.fn)
                else:
                    self._run_batch(self._gather(task))
            except BaseException as exc:  # the engine thread must never die
                log.exception("[Handler] Engine error")
                if not task.future.done():
                    task.future.set_exception(_classify(exc))

    def _gather(self, first: Job) -> list[Job]:
        """``first`` plus the queued (or soon arriving) jobs it can run with."""
        batch, count = [first], len(first.images)
        if self.max_batch <= 1:
            return batch
        deadline = time.monotonic() + self.window_s
        with self._cond:
            while True:
                rest: deque[Job | _Call] = deque()
                for task in self._tasks:
                    if (isinstance(task, Job) and task.key == first.key
                            and count + len(task.images) <= self.max_batch):
                        batch.append(task)
                        count += len(task.images)
                    else:
                        rest.append(task)
                self._tasks = rest
                left = deadline - time.monotonic()
                if count >= self.max_batch or self._arriving <= 0 or left <= 0:
                    return batch
                self._cond.wait(left)

    def _run_batch(self, batch: list[Job]) -> None:
        images = [image for job in batch for image in job.images]
        # A child of the first request's span, linked to every request it answers.
        span = tracing.start("predict batch", parent=batch[0].trace, links=[job.trace for job in batch], attributes={
            "ai.model": batch[0].model.ref.key, "ai.model.format": batch[0].model.fmt,
            "ai.batch.requests": len(batch), "ai.batch.images": len(images)})
        try:
            detections, calls = self._predict(batch[0].model, batch[0].params, images)
            span.end()
        except BaseException as exc:  # noqa: BLE001 - reported to the request(s)
            span.end(exc)
            if len(batch) > 1:  # find the request that fails; the others still get answers
                for job in batch:
                    self._run_batch([job])
                return
            batch[0].future.set_exception(_classify(exc))
            return
        start = 0
        for job in batch:
            indices = range(start, start + len(job.images))
            used = {calls[i] for i in indices}
            job.future.set_result(Outcome(
                detections=[detections[i] for i in indices],
                predict_ms=sum(ms for _, ms in used),
                batch_requests=len(batch),
                batch_images=len(images),
            ))
            start += len(job.images)
        if len(batch) > 1:
            log.debug("[Handler] Batch of %d requests / %d images", len(batch), len(images))

    def _predict(self, model: LoadedModel, params: Params,
                 images: list[np.ndarray]) -> tuple[list[list[Detection]], list[tuple[int, float]]]:
        """Detections per image, and per image the (call id, call ms) of its predict call.

        Images are grouped by shape so each one is letterboxed as it would be alone
        (answers do not depend on what else was in the batch), then run in chunks of at
        most ``max_batch``.
        """
        self._set_threads(model.fmt)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        detections: list[list[Detection]] = [[] for _ in images]
        calls: list[tuple[int, float]] = [(0, 0.0)] * len(images)
        call_id = 0
        kwargs = {**params.kwargs(), "device": self.device, "verbose": False, "save": False}
        for indices in by_shape.values():
            for at in range(0, len(indices), self.max_batch):
                chunk = indices[at:at + self.max_batch]
                started = time.perf_counter()
                results = model.yolo.predict([images[i] for i in chunk], batch=len(chunk), **kwargs)
                ms = (time.perf_counter() - started) * 1000.0
                call_id += 1
                if self.metrics is not None:
                    self.metrics.batch_size.observe(len(chunk))
                for i, result in zip(chunk, results, strict=True):
                    detections[i] = _detections(result)
                    calls[i] = (call_id, ms)
        return detections, calls

    def _set_threads(self, fmt: str) -> None:
        """torch threads for this predict: every core for torch formats, 1 for ONNX/OpenVINO.

        Ultralytics resets torch to ``cpu_count - 1`` threads whenever it sets up a
        predictor (once per model), and torch's count belongs to the calling thread, so
        the engine thread sets it before every predict (cheap when unchanged).  ONNX
        Runtime and OpenVINO run their own thread pools: torch only does the letterbox
        and NMS there, and a second busy pool slows them down (FIELD-NOTES).
        """
        if self.device.type != "cpu":
            return  # on a GPU, torch's CPU threads only letterbox and copy
        import torch

        want = self.cpu_threads if fmt in TORCH_FORMATS else 1
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


def _detections(result: Any) -> list[Detection]:
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    names = result.names
    out = []
    for (x1, y1, x2, y2), conf, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(),
                                           strict=True):
        class_id = int(cls)
        out.append(Detection(
            class_id=class_id,
            class_name=str(names.get(class_id, class_id)),
            confidence=round(float(conf), 5),
            box=Box(x1=round(x1, 2), y1=round(y1, 2), x2=round(x2, 2), y2=round(y2, 2)),
        ))
    return out


def _classify(exc: BaseException) -> AIServiceError:
    if isinstance(exc, AIServiceError):
        return exc
    if yolo.is_out_of_memory(exc):
        return PermanentError("out of memory during inference: send fewer or smaller images, or a lower "
                              "params.imgsz", error_code="out_of_memory")
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    log.warning("[Handler] Predict failed: %s: %s", type(exc).__name__, detail)
    return InferenceError(f"inference failed: {type(exc).__name__}")


def _settle(future: Future[Any], fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler
        future.set_exception(exc)


def result_within(future: Future[_T], timeout: float) -> _T:
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise PermanentError(f"inference did not finish within {timeout:.0f} s", error_code="timeout") from None

