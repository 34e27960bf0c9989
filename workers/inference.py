"""Inference worker: cached models, checked images, micro-batched predict on one thread.

One request (on one of ``INFER_PREFETCH`` handler threads; the runtime acks it only after
its answer is confirmed by the broker):

1. ``images`` is checked against ``MAX_IMAGES_PER_REQUEST``; the model is resolved through the
   :class:`ModelCache` (one ``stat``/listing per request; download, load and warm-up only
   for a key + version it does not hold).
2. Every image is fetched (storage key) or base64-decoded (inline) and decoded with
   Pillow under caps: bytes (``MAX_IMAGE_BYTES``, ``MAX_INLINE_IMAGE_BYTES``), pixels read
   from the header *before* decoding (``MAX_IMAGE_PIXELS``, ``MAX_REQUEST_PIXELS``), only
   raster formats Pillow decodes itself, truncated or corrupt data refused.  This happens
   before batching, so a bad request fails alone.
3. The decoded images go to the :class:`Engine`, the one thread that touches models (load,
   warm-up, predict).  It runs requests for the same model version and parameters that
   are queued together -- or arrive within ``BATCH_WINDOW_MS`` while other handlers are
   still preparing theirs -- as one predict call of up to ``MAX_BATCH`` images, and hands
   each request its own detections.  ``MAX_BATCH=1`` turns batching off.
4. ``inference_completed`` goes to the request's ``reply_to`` (with its
   ``correlation_id``) or to ``infer_result_q`` (``ctx.result`` does that).

Memory: decoded images in flight are at most ``INFER_PREFETCH x MAX_REQUEST_PIXELS x 3``
bytes; cached models at most ``MODEL_CACHE_SIZE`` models and about ``MODEL_CACHE_MAX_MB``.

Why one engine thread: Ultralytics predictors are not meant to be driven from several
threads, and on a CPU (or one GPU) concurrent predicts only fight over the same cores; one
thread also sets torch's thread count right before each predict.

Why batching is on (``MAX_BATCH=8``): measured on this 2-core machine, ``.pt`` at 128 px,
one predict of 8 images ran ~2x the images/s of 8 single calls every time (quiet: 202-321
vs 105 img/s; with other jobs on the cores: 36-77 vs 19-26), and through the service with
16 requests in flight batching on vs off gave 114-121 vs 56-57 img/s, p50 latency 118-137
vs 262-278 ms.  A lone request does not wait for the window (see :class:`Engine`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ai_service import tracing
from ai_service.config import Settings
from ai_service.errors import AIServiceError, InvalidInput, ObjectNotFound, PermanentError
from ai_service.messages import (
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
from ai_service.metrics import Metrics
from ai_service.operation import JobContext, Operation, Resources
from ai_service.provenance import Provenance
from ai_service.storage import ObjectInfo, Storage
from workers import yolo

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("workers.infer")

_T = TypeVar("_T")
Log = logging.Logger | logging.LoggerAdapter

#: How long a handler waits for the engine (queue + load + predict) before giving up.
ENGINE_TIMEOUT_S = 300.0
#: Raster formats decoded by Pillow itself (no external delegates such as Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # JPEG covers MPO (phone photos)
#: Model file suffix -> format.  Folders (a storage prefix ending in "/") are OpenVINO.
FILE_FORMATS = {".pt": "pt", ".onnx": "onnx", ".torchscript": "torchscript"}
#: What each format's local copy is called: Ultralytics picks its backend by this name.
LOCAL_NAMES = {"pt": "model.pt", "onnx": "model.onnx", "torchscript": "model.torchscript",
               "openvino": "model_openvino_model"}
#: Rough memory of a loaded model per stored byte (fp16 checkpoints become fp32, .pt keeps
#: the model and Ultralytics' fused copy, runtimes keep weights and workspaces).
MEMORY_FACTOR = {"pt": 4, "torchscript": 3, "onnx": 2, "openvino": 2}
#: Formats torch itself runs; the others bring their own runtime and threads.
TORCH_FORMATS = frozenset({"pt", "torchscript"})
SUPPORTED = ".pt, .onnx, .torchscript files and OpenVINO folders (a prefix ending in '/')"


class InferenceError(PermanentError):
    error_code = "inference_error"


class UnsupportedFormat(PermanentError):
    error_code = "unsupported_format"


class ImageNotFound(PermanentError):
    """A request naming an image key that does not exist: answered, not dead-lettered
    (the key may simply not be uploaded yet)."""

    error_code = "invalid_request"


def failure_message(job_id: str, error: AIServiceError) -> InferenceFailed:
    return InferenceFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


# --- models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model in storage at one version: what the cache is keyed by."""

    key: str
    fmt: str
    version: str  # the object's ETag / local version token, or a digest of a folder's listing
    size: int  # stored bytes
    folder: str | None = None  # the prefix, for folder formats


def resolve_model(storage: Storage, key: str) -> ModelRef:
    """Find the model ``key`` names and its current version (one stat, or one listing)."""
    if not key.endswith("/"):
        info = storage.stat(key)
        if info is not None:
            suffix = Path(key).suffix.lower()
            if suffix not in FILE_FORMATS:
                raise UnsupportedFormat(f"model {key!r}: this worker runs {SUPPORTED}, not {suffix or 'this file'}")
            return ModelRef(key, FILE_FORMATS[suffix], info.etag, info.size)
    folder = key if key.endswith("/") else key + "/"
    objects = storage.list(folder)
    if not objects:
        raise ObjectNotFound(f"model {key!r} not found in storage")
    return ModelRef(key, _folder_format(key, objects), _listing_version(objects),
                    sum(o.size for o in objects), folder)


def _folder_format(key: str, objects: list[ObjectInfo]) -> str:
    name = key.rstrip("/").rsplit("/", 1)[-1]
    suffixes = {Path(o.key).suffix.lower() for o in objects}
    if name.endswith("_openvino_model") or {".xml", ".bin"} <= suffixes:
        return "openvino"
    raise UnsupportedFormat(f"model folder {key!r} is not an OpenVINO export; this worker runs {SUPPORTED}")


def _listing_version(objects: list[ObjectInfo]) -> str:
    text = "\n".join(f"{o.key} {o.size} {o.etag}" for o in objects)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class LoadedModel:
    """A model in memory, warmed up, with what it cost."""

    ref: ModelRef
    yolo: Any  # ultralytics.YOLO
    local_dir: Path
    nbytes: int

    @property
    def fmt(self) -> str:
        return self.ref.fmt


def load_model(path: Path, ref: ModelRef, device: torch.device, imgsz: int) -> Any:
    """Load ``path`` safely and warm it up with one predict; runs on the engine thread.

    ``.pt`` goes through :func:`yolo.safe_load_model` (no pickle code runs); exported
    formats hold no pickles (ONNX/OpenVINO graphs, TorchScript archives) and Ultralytics
    reads their metadata with ``json``/``ast.literal_eval``/safe YAML.  A model of another
    task than detection is refused.
    """
    try:
        if ref.fmt == "pt":
            model = yolo.safe_load_model(path)
        else:
            yolo.ensure_safe_load()
            from ultralytics import YOLO

            model = YOLO(str(path), task="detect")
        task = getattr(model, "task", None)
        if task != "detect":
            raise UnsupportedFormat(f"model {ref.key!r} is a {task} model; this worker runs detection models")
        blank = np.zeros((imgsz, imgsz, 3), dtype=np.uint8)
        model.predict(blank, imgsz=imgsz, device=device, verbose=False, save=False)  # builds the backend, warms up
        backend_task = getattr(getattr(model.predictor, "model", None), "task", None)
        if backend_task not in (None, "detect"):
            raise UnsupportedFormat(f"model {ref.key!r} is a {backend_task} model; this worker runs detection models")
        return model
    except AIServiceError:
        raise
    except ImportError as exc:
        missing = exc.name or "its runtime"
        raise UnsupportedFormat(f"this worker cannot run {ref.fmt} models: {missing} is not installed") from None
    except Exception as exc:  # noqa: BLE001 - anything a corrupt model file makes a loader raise
        if yolo.is_out_of_memory(exc):
            raise PermanentError(f"out of memory loading model {ref.key!r}", error_code="out_of_memory") from None
        log.warning("[Handler] Model %s could not be loaded: %s: %s", ref.key, type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0][:300])
        raise InvalidInput(f"model {ref.key!r} could not be loaded ({ref.fmt} format, {type(exc).__name__}); "
                           "is it a complete, unmodified export?") from None


#: Loads a downloaded model (path, what it is, warm-up size) on the engine thread.
Loader = Callable[[Path, ModelRef, int], Any]


class ModelCache:
    """Loaded models, least recently used first out, bounded by count and by memory.

    Keyed by storage key *and* version, so a replaced object is loaded afresh while an
    unchanged one is never downloaded again.  Only one handler loads a given key at a
    time; the others wait for it and then find it cached.
    """

    def __init__(self, storage: Storage, root: Path, engine: Engine, *, max_models: int, max_bytes: int,
                 loader: Loader | None = None, metrics: Metrics | None = None,
                 provenance: Provenance | None = None) -> None:
        self.storage = storage
        self.provenance = provenance
        self.metrics = metrics
        self.root = root
        self.engine = engine
        self.loader: Loader = loader or (lambda path, ref, imgsz: load_model(path, ref, engine.device, imgsz))
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes
        self.downloads = 0
        self._entries: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, tuple[threading.Lock, int]] = {}
        shutil.rmtree(root, ignore_errors=True)  # what a previous process of this worker left
        root.mkdir(parents=True, exist_ok=True)

    @property
    def nbytes(self) -> int:
        """Estimated memory of the cached models."""
        with self._lock:
            return self._total()

    def _total(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, key: str, imgsz: int, job_log: Log) -> LoadedModel:
        ref = resolve_model(self.storage, key)
        hit = self._lookup(ref)
        if hit is None:
            with self._loading(key):
                hit = self._lookup(ref)  # loaded by another handler meanwhile?
                if hit is None:
                    self._count("miss")
                    return self._load(ref, imgsz, job_log)
        self._count("hit")
        job_log.debug("Model %s (version %s) from the cache", key, ref.version[:12])
        return hit

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.model_cache.labels(result).inc()

    def _lookup(self, ref: ModelRef) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get((ref.key, ref.version))
            if entry is not None:
                self._entries.move_to_end((ref.key, ref.version))
            return entry

    @contextlib.contextmanager
    def _loading(self, key: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._key_locks.get(key, (threading.Lock(), 0))
            self._key_locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._key_locks[key]
                if users <= 1:
                    del self._key_locks[key]
                else:
                    self._key_locks[key] = (lock, users - 1)

    def _load(self, ref: ModelRef, imgsz: int, job_log: Log) -> LoadedModel:
        estimate = ref.size * MEMORY_FACTOR[ref.fmt]
        if estimate > self.max_bytes:
            raise PermanentError(
                f"model {ref.key!r} ({ref.size / 1e6:.0f} MB stored) needs more memory than the model cache "
                f"allows (MODEL_CACHE_MAX_MB={self.max_bytes // 2**20})", error_code="out_of_memory")
        local_dir = self.root / uuid.uuid4().hex[:16]
        target = local_dir / LOCAL_NAMES[ref.fmt]
        started = time.monotonic()
        job_log.info("Downloading model %s (%s, version %s, %.1f MB)", ref.key, ref.fmt, ref.version[:12],
                     ref.size / 1e6)
        try:
            if ref.folder is not None:
                self.storage.download_prefix(ref.folder, target)
            else:
                self.storage.download_file(ref.key, target)
            self.downloads += 1
            if ref.fmt != "pt" and self.provenance is not None:
                self.provenance.check(target, ref.key, ref.fmt)  # TorchScript is code: only our own exports
            model = self.engine.call(lambda: self.loader(target, ref, imgsz))
        except BaseException:
            shutil.rmtree(local_dir, ignore_errors=True)
            raise
        entry = LoadedModel(ref, model, local_dir, estimate)
        evicted, count, total = self._insert(entry)
        job_log.info("Model %s loaded and warmed up in %.2f s (cache: %d model(s), ~%.0f MB)", ref.key,
                     time.monotonic() - started, count, total / 1e6)
        for old in evicted:
            job_log.info("Evicted model %s (version %s) from the cache", old.ref.key, old.ref.version[:12])
        if evicted:
            gc.collect()  # Ultralytics objects hold reference cycles
        return entry

    def _insert(self, entry: LoadedModel) -> tuple[list[LoadedModel], int, int]:
        """Add ``entry``, evict what no longer fits; returns (evicted, models, bytes)."""
        evicted: list[LoadedModel] = []
        with self._lock:
            for cached_key in [k for k in self._entries if k[0] == entry.ref.key]:
                evicted.append(self._entries.pop(cached_key))  # an older version: never used again
            self._entries[(entry.ref.key, entry.ref.version)] = entry
            while len(self._entries) > 1 and (len(self._entries) > self.max_models or self._total() > self.max_bytes):
                evicted.append(self._entries.popitem(last=False)[1])
            count, total = len(self._entries), self._total()
        for old in evicted:
            shutil.rmtree(old.local_dir, ignore_errors=True)
        return evicted, count, total


# --- images ----------------------------------------------------------------------------


@dataclass
class DecodedImage:
    name: str  # the contract's "image": the storage key, or the index of an inline image
    width: int
    height: int
    array: np.ndarray  # H x W x 3, BGR uint8 (what Ultralytics expects from numpy)


def inline_size(data: str) -> int:
    """Decoded length of base64 ``data``, computed without decoding it."""
    return len(data) // 4 * 3 - len(data[-2:]) + len(data[-2:].rstrip("="))


def _open_image(raw: bytes) -> Image.Image:
    """Pillow's own ``Image.open``, restricted to IMAGE_FORMATS.

    Ultralytics replaces ``PIL.Image.open`` with a wrapper that, on an unidentified
    file, imports (and would pip-install) ``pi_heif``: garbage must stay "not an image".
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open) if patches is not None else Image.open
    return opener(io.BytesIO(raw), formats=IMAGE_FORMATS)


def decode_image(raw: bytes, label: str, *, max_pixels: int, pixels_left: int) -> tuple[np.ndarray, int, int]:
    """Decode one image to BGR, refusing bombs by their header and truncated data.

    Returns ``(array, width, height)`` after applying the EXIF orientation (so the boxes
    are in the coordinates an image viewer shows).
    """
    Image.init()  # registers every plugin, so ``formats`` can name them (cheap after the first call)
    try:
        with _open_image(raw) as probe:
            width, height = probe.size
            pixels = width * height
            if pixels > max_pixels:
                raise InvalidInput(f"{label}: {width}x{height} is {pixels} pixels, over the limit of {max_pixels} "
                                   "per image (MAX_IMAGE_PIXELS)")
            if pixels > pixels_left:
                raise InvalidInput(f"{label}: the request's images exceed the limit on pixels per request "
                                   "(MAX_REQUEST_PIXELS); split it")
            probe.verify()  # chunk structure and checksums, without decoding
        with _open_image(raw) as image:
            image.load()  # a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
            oriented = ImageOps.exif_transpose(image)
            if oriented.mode.startswith("I;16"):
                oriented = Image.fromarray((np.asarray(oriented) >> 8).astype(np.uint8))
            rgb = oriented if oriented.mode == "RGB" else oriented.convert("RGB")
            array = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
            return array, rgb.width, rgb.height
    except AIServiceError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice our limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "the image"
        raise InvalidInput(f"{label}: {size} is over the limit of {max_pixels} pixels per image "
                           "(MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"{label}: not an image in a supported format "
                           f"({', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt data
        if yolo.is_out_of_memory(exc):
            raise PermanentError(f"{label}: out of memory decoding the image", error_code="out_of_memory") from None
        raise InvalidInput(f"{label}: the image data is truncated or corrupt ({type(exc).__name__})") from None


# --- the engine (batcher) ---------------------------------------------------------------


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
        return _result(future, timeout)

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
            except BaseException as exc:  # noqa: BLE001 - the engine thread must never die
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


def _result(future: Future[_T], timeout: float) -> _T:
    try:
        return future.result(timeout)
    except FutureTimeout:
        raise PermanentError(f"inference did not finish within {timeout:.0f} s", error_code="timeout") from None


# --- the service -----------------------------------------------------------------------


class InferenceService:
    """What the handler threads share: the engine and the model cache."""

    def __init__(self, settings: Settings, storage: Storage, device: torch.device,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        threads = settings.infer_threads or len(os.sched_getaffinity(0))
        self.engine = Engine(device, max_batch=settings.max_batch, window_s=settings.batch_window_ms / 1000.0,
                             cpu_threads=threads, metrics=metrics)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.worker_name).strip("_") or "worker"
        self.cache = ModelCache(storage, settings.work_dir / "models" / safe, self.engine,
                                max_models=settings.model_cache_size,
                                max_bytes=settings.model_cache_max_mb * 2**20, metrics=metrics,
                                provenance=Provenance(storage, prefix=settings.jobs_prefix,
                                                      trust_external=settings.trust_external_models))

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
            images = self._decode_all(request)
            future = self.engine.submit(Job(model, params, [image.array for image in images], Future(),
                                            tracing.current()))
            submitted = True
        finally:
            if not submitted:
                self.engine.leave()
        outcome = _result(future, ENGINE_TIMEOUT_S)
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


# --- the operation ----------------------------------------------------------------------


def operation(settings: Settings) -> Operation:
    """The inference operation: ``INFER_PREFETCH`` requests in flight, one engine thread."""

    def handler(request: InferenceRequest, ctx: JobContext) -> None:
        service: InferenceService = ctx.resources.extras["inference"]
        service.handle(request, ctx)

    return Operation(
        name="infer",
        request_model=InferenceRequest,
        handler=handler,
        failure=failure_message,
        prefetch=max(1, settings.infer_prefetch),
        setup=setup,
    )


def setup(resources: Resources) -> None:
    """Make Ultralytics offline and safe, guard Pillow, start the engine thread."""
    settings = resources.settings
    # prepare_ultralytics makes idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) before
    # torch loads.  Measured (.pt, 128 px, lists of 8, 2 cores): spinning (OpenMP's default)
    # with 2 torch threads gave 321 img/s on a quiet machine but 3-71 img/s as soon as other
    # processes wanted the cores; sleeping, 2 threads gave 130-200 quiet and 77 busy; 1
    # thread 200 quiet and 36-40 busy.  So: every core, sleeping.
    yolo.prepare_ultralytics(settings.work_dir)
    import ultralytics  # noqa: F401 - pay the import once, before the first request

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # Pillow's own bomb guard agrees with ours
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused by our own check instead
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")  # how TorchScript loads
    device = yolo.select_device(settings.device)
    service = InferenceService(settings, resources.storage, device, resources.metrics)
    service.start()
    resources.extras["inference"] = service
    batching = (f"up to {service.engine.max_batch} images, waiting up to {settings.batch_window_ms} ms"
                if service.engine.max_batch > 1 else "off")
    log.info("[Handler] Inference on %s: %d requests in flight, batching %s, torch threads %d for .pt/.torchscript, "
             "model cache %d models / %d MB", device, max(1, settings.infer_prefetch), batching,
             service.engine.cpu_threads, settings.model_cache_size, settings.model_cache_max_mb)
