"""Models from storage, loaded once per key and version, bounded by count and memory."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ai_service.errors import AIServiceError, InvalidInput, ObjectNotFound, PermanentError
from ai_service.errors import (
    UnsupportedFormat as UnsupportedFormat,  # defined in errors.py, importable from here as before
)
from ai_service.metrics import Metrics
from ai_service.provenance import Provenance
from ai_service.storage import ObjectInfo, Storage
from workers import yolo

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from workers.inference.engine import Engine

log = logging.getLogger("workers.infer")

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

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
            from ultralytics.models import YOLO

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

    ``version_ttl``: how long a key's version (its ETag, one ``stat``) is trusted before it
    is checked again -- a storage round trip per request costs more than the predict of a
    small model on a GPU; a replaced model is picked up within the TTL.  0: every request.
    """

    def __init__(self, storage: Storage, root: Path, engine: Engine, *, max_models: int, max_bytes: int,
                 loader: Loader | None = None, metrics: Metrics | None = None,
                 provenance: Provenance | None = None, version_ttl: float = 0.0) -> None:
        self.storage = storage
        self.provenance = provenance
        self.metrics = metrics
        self.root = root
        self.engine = engine
        self.loader: Loader = loader or (lambda path, ref, imgsz: load_model(path, ref, engine.device, imgsz))
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes
        self.downloads = 0
        self.version_ttl = max(0.0, version_ttl)
        self.version_checks = 0  # stats/listings made to learn a key's version
        self._versions: dict[str, tuple[ModelRef, float]] = {}  # key -> (ref, checked at, monotonic)
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
        ref = self.resolve(key)
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

    def resolve(self, key: str) -> ModelRef:
        """``key``'s current version: the one checked less than ``version_ttl`` ago, else a new
        ``stat`` (failures are not remembered: a model uploaded later is found at once)."""
        now = time.monotonic()
        known = self._versions.get(key)
        if known is not None and now - known[1] < self.version_ttl:
            return known[0]
        self.version_checks += 1
        ref = resolve_model(self.storage, key)
        if self.version_ttl > 0:
            with self._lock:
                if len(self._versions) >= 4 * self.max_models + 64:  # keys asked for once must not pile up
                    self._versions = {k: v for k, v in self._versions.items() if now - v[1] < self.version_ttl}
                self._versions[key] = (ref, now)
        return ref

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

