"""Conversion worker: a trained ``.pt`` from storage -> Ultralytics export per format ->
verified artifacts in storage.

One request names a model, a list of formats and the export options.  The handler
publishes ``conversion_started``, one ``conversion_update`` per format that succeeded
(``current_format``, ``progress``, and the ``artifact``), then ``conversion_completed``
with every artifact, or ``conversion_failed`` naming the first ``failed_format`` and
keeping the artifacts that did succeed (a format this machine cannot produce does not
stop the others).  A cancel between formats ends with ``conversion_cancelled`` and the
artifacts done so far.  The job record, lease and exactly-one-terminal protocol are
:class:`ai_service.jobs.LongJob`'s, as for training.

What is checked where:

* before the job is taken (``invalid_request``, dead-lettered): unknown format names
  (the allowed ones come from the installed Ultralytics' export table), ``half`` or
  ``int8`` with a format that cannot take it, both at once, ``int8`` without a dataset
  to calibrate on;
* per format (``unsupported_format``, the other formats go on): a missing exporter
  package, found with ``importlib.util.find_spec`` *before* the exporter runs (so
  Ultralytics never gets to ``check_requirements`` and pip), a missing tool on PATH,
  or a GPU-only format (``engine``, FP16 ``torchscript``) on a CPU worker;
* per format (``export_error`` / ``out_of_memory``): the exporter itself failing.

Artifacts are uploaded under ``output.prefix`` and named after the source key's stem
(``models/m/shapes.pt`` -> ``<prefix>/shapes.onnx``, ``<prefix>/shapes_openvino_model/``).
A folder artifact's ``path`` ends in ``/``; its ``size_bytes`` is the sum of its files'
sizes and its ``sha256`` is the SHA-256 of the text made of one line
``<sha256 of the file>  <relative path>\\n`` per file, sorted by relative path -- what
``find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum`` prints
when run inside the folder.

Verification: each artifact is loaded back with ``YOLO(path)`` and run on sample images
(the request's dataset's val images, else generated shapes), letterboxed to a square of
``imgsz`` so the source and a static-shape export see exactly the same pixels.  Its
detections are matched with the source model's (same class, IoU and confidence within
the format's :class:`Tolerance`); a detection within the confidence tolerance of the
threshold may be on one side only.  When the source detects nothing at all, the raw
head outputs of the two are compared instead (boxes and class scores of the source's
top anchors).  ``verified`` says whether they agreed; when not, ``verification`` says why.

Each job exports in its own folder under ``WORK_DIR/runs`` (one sub-folder per format),
removed at the end.  On the CPU, torch gets every core while exporting (Ultralytics
leaves one idle); ONNX Runtime and OpenVINO pick their own threads when verifying.  A
warm shutdown lets the running conversion finish.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ai_service import tracing
from ai_service.config import Settings
from ai_service.errors import (
    AIServiceError,
    InvalidInput,
    ObjectNotFound,
    PermanentError,
    StorageError,
)
from ai_service.jobs import JobRecord, LeaseLost, LongJob, record_cancel
from ai_service.jobs import ledger as jobs_ledger
from ai_service.messages import (
    Artifact,
    ConversionCancelled,
    ConversionCompleted,
    ConversionFailed,
    ConversionRequest,
    ConversionStarted,
    ConversionUpdate,
)
from ai_service.operation import JobContext, Operation, Resources
from ai_service.provenance import Provenance, describe_local, file_sha256, folder_digest
from ai_service.shapes import draw_shapes_image
from workers import yolo
from workers.datasets import limits_from, prepare_dataset

#: Called after each format is uploaded and announced (tests slow a job down through it).
FormatHook = Callable[[str, JobContext], None]

#: Names BEs may use for a format, mapped to Ultralytics' own (``tflite`` is Ultralytics'
#: deprecated name of its LiteRT export; the others are its documented aliases).
ALIASES = {"tensorrt": "engine", "trt": "engine", "tflite": "litert", "mlpackage": "coreml"}

#: Formats whose exporter forces INT8 and so needs calibration images (from the exporter source).
CALIBRATED_FORMATS = frozenset({"deepx", "axelera", "imx", "edgetpu", "qnn", "hailo", "xilinx"})

#: Python modules (import name, pip name) each exporter imports or ``check_requirement``s,
#: read from ``ultralytics/engine/exporter.py`` and ``ultralytics/utils/export/*.py``
#: (8.4.x).  ``onnx``-based formats also need what ``onnx`` needs.
REQUIRED_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchscript": (),
    "onnx": (("onnx", "onnx"),),
    "openvino": (("openvino", "openvino"),),
    "engine": (("onnx", "onnx"), ("tensorrt", "tensorrt")),
    "coreml": (("coremltools", "coremltools"),),
    "coreai": (("coreai_torch", "coreai-torch"), ("coreai", "coreai-torch")),
    "saved_model": (
        ("onnx", "onnx"), ("tensorflow", "tensorflow"), ("onnx2tf", "onnx2tf"), ("tf_keras", "tf_keras"),
        ("sng4onnx", "sng4onnx"), ("onnx_graphsurgeon", "onnx_graphsurgeon"), ("ai_edge_litert", "ai-edge-litert"),
    ),
    "litert": (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert")),
    "paddle": (("paddle", "paddlepaddle"), ("x2paddle", "x2paddle")),
    "mnn": (("onnx", "onnx"), ("MNN", "MNN")),
    "ncnn": (("ncnn", "ncnn"), ("pnnx", "pnnx")),
    "imx": (("model_compression_toolkit", "model-compression-toolkit"), ("edgemdt_tpc", "edge-mdt-tpc"),
            ("edgemdt_cl", "edge-mdt-cl")),
    "rknn": (("onnx", "onnx"), ("rknn", "rknn-toolkit2")),
    "executorch": (("executorch", "executorch"),),
    "axelera": (("onnx", "onnx"), ("axelera", "axelera-devkit")),
    "deepx": (("onnx", "onnx"), ("dx_com", "dx_com")),
    "qnn": (("onnx", "onnx"), ("onnxruntime_qnn", "onnxruntime-qnn")),
    "hailo": (("onnx", "onnx"), ("hailo_sdk_client", "the Hailo Dataflow Compiler (hailo_sdk_client)")),
    "ascend": (("onnx", "onnx"),),
    "xilinx": (("onnx", "onnx"), ("quark", "amd-quark")),
}
REQUIRED_MODULES["pb"] = REQUIRED_MODULES["saved_model"]
REQUIRED_MODULES["edgetpu"] = REQUIRED_MODULES["saved_model"]

#: Command-line tools some exporters run.
REQUIRED_TOOLS = {"ascend": "atc", "edgetpu": "edgetpu_compiler"}

#: Formats that can only be built on a CUDA GPU.
GPU_FORMATS = frozenset({"engine"})

#: Confidence threshold of the verification predictions (Ultralytics' default).
VERIFY_CONF = 0.25
#: NMS IoU of the verification predictions (Ultralytics' default).
VERIFY_NMS_IOU = 0.7
#: Sample images per verification.
SAMPLE_IMAGES = 3
#: Anchors compared when raw outputs are compared.
RAW_TOP_ANCHORS = 10


# --- formats -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatSpec:
    """One Ultralytics export format as the installed exporter describes it."""

    name: str
    suffix: str
    arguments: frozenset[str]
    fp16: bool
    int8: bool


def export_table() -> dict[str, FormatSpec]:
    """Every export format of the installed Ultralytics (``.pt`` itself excluded)."""
    from ultralytics.engine import exporter

    table = exporter.export_formats()
    specs: dict[str, FormatSpec] = {}
    for name, suffix, arguments in zip(table["Argument"], table["Suffix"], table["Arguments"], strict=True):
        if name == "-":
            continue
        specs[name] = FormatSpec(
            name=name,
            suffix=suffix,
            arguments=frozenset(arguments),
            fp16=name in exporter.FP16_FORMATS,
            int8=name in exporter.INT8_FORMATS,
        )
    return specs


@dataclass(frozen=True)
class Plan:
    """One requested format: the name the BE used and the Ultralytics format it means."""

    requested: str
    spec: FormatSpec

    @property
    def name(self) -> str:
        return self.spec.name


def plan_formats(request: ConversionRequest, table: dict[str, FormatSpec]) -> list[Plan]:
    """Validate the formats and options against each other; raise InvalidInput naming each problem."""
    opts = request.options
    problems: list[str] = []
    unknown = [f for f in request.formats if ALIASES.get(f, f) not in table]
    if unknown:
        problems.append(
            f"formats: unknown format(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(table))}"
            f" (aliases: {', '.join(sorted(ALIASES))})"
        )
    plans = [Plan(f, table[ALIASES.get(f, f)]) for f in request.formats if f not in unknown]
    canonical = [p.name for p in plans]
    repeated = sorted({n for n in canonical if canonical.count(n) > 1})
    if repeated:
        problems.append(f"formats: {', '.join(repeated)} requested twice (under an alias)")
    if opts.half and opts.int8:
        problems.append("options: half and int8 exclude each other; ask for one precision")
    if opts.int8:
        no_int8 = [p.requested for p in plans if not p.spec.int8]
        if no_int8:
            allowed = ", ".join(sorted(n for n, s in table.items() if s.int8))
            problems.append(f"options.int8: not available for {', '.join(no_int8)} (INT8 formats: {allowed})")
    if opts.half:
        no_half = [p.requested for p in plans if not p.spec.fp16]
        if no_half:
            allowed = ", ".join(sorted(n for n, s in table.items() if s.fp16))
            problems.append(f"options.half: not available for {', '.join(no_half)} (FP16 formats: {allowed})")
    needs_data = opts.int8 or any(p.name in CALIBRATED_FORMATS for p in plans)
    if needs_data and request.dataset is None:
        problems.append("dataset: INT8 export needs dataset.s3_prefix, whose val images calibrate it")
    if problems:
        raise InvalidInput("invalid request: " + "; ".join(problems))
    return plans


def precision(options: Any) -> str:
    return "int8" if options.int8 else "fp16" if options.half else "fp32"


def unsupported_reason(plan: Plan, options: Any, device: Any) -> str | None:
    """Why this worker cannot build ``plan`` (a missing package, tool or GPU), or None."""
    name = plan.name
    on_gpu = getattr(device, "type", "cpu") == "cuda"
    if name in GPU_FORMATS and not on_gpu:
        return f"{plan.requested} (TensorRT) needs a CUDA GPU; this worker runs on the CPU"
    if name == "torchscript" and options.half and not on_gpu:
        return "FP16 torchscript needs a CUDA GPU; this worker runs on the CPU (ask for fp32)"
    modules = list(REQUIRED_MODULES.get(name, ()))
    if name == "onnx" and (options.simplify or options.int8):
        modules.append(("onnxruntime", "onnxruntime"))
    if name == "onnx" and options.simplify:
        modules.append(("onnxslim", "onnxslim"))
    if name == "openvino" and options.int8:
        modules.append(("nncf", "nncf"))
    missing = sorted({pip for module, pip in modules if not _module_available(module)})
    if missing:
        return f"{plan.requested} export needs the Python package(s) {', '.join(missing)}, not installed on this worker"
    tool = REQUIRED_TOOLS.get(name)
    if tool is not None and shutil.which(tool) is None:
        return f"{plan.requested} export needs the {tool!r} tool, not found on this worker's PATH"
    return None


def _module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is broken or half installed
        return False


def export_arguments(plan: Plan, request: ConversionRequest, device: Any, data_yaml: Path | None) -> dict[str, Any]:
    """The ``model.export()`` arguments for one format: only the options it takes.

    ``dynamic``/``simplify``/``opset``/``batch`` apply where the format takes them and
    are left out elsewhere (Ultralytics refuses non-default arguments a format does not
    list); precision was validated already.
    """
    opts = request.options
    args: dict[str, Any] = {"format": plan.name, "imgsz": opts.imgsz, "device": device, "verbose": False}
    takes = plan.spec.arguments
    if "batch" in takes:
        args["batch"] = opts.batch
    if "dynamic" in takes:
        args["dynamic"] = opts.dynamic
    if "simplify" in takes:
        args["simplify"] = opts.simplify
    if "opset" in takes and opts.opset is not None:
        args["opset"] = opts.opset
    if opts.int8:
        args["quantize"] = 8
    elif opts.half:
        args["quantize"] = 16
    if data_yaml is not None and "data" in takes and (opts.int8 or plan.name in CALIBRATED_FORMATS):
        args["data"] = str(data_yaml)
    return args


# --- digests -----------------------------------------------------------------------------


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far an export may drift from the source and still count as the same model.

    ``iou``: least IoU of a matched box pair; ``conf``: largest confidence difference
    (also the band around the threshold where a detection may be on one side only).
    """

    iou: float
    conf: float


#: Per precision, why:
#: * fp32 -- the same network in the same precision; runtimes differ in op fusion and
#:   summation order (~1e-5 relative), a few run reduced precision internally on some
#:   hardware (TF32 in TensorRT, bf16 kernels on CPUs with AVX512-BF16/AMX): ~1e-3..1e-2.
#:   IoU 0.95 is a sub-pixel edge shift on a 20 px box; 0.05 is far above what those
#:   rounding errors do to a sigmoid score, and far below a real defect (wrong
#:   preprocessing, class order, a broken layer moves scores by tenths and boxes by pixels).
#: * fp16 -- 10-bit mantissa: coordinates at 640 px round to ~0.5 px, scores to ~1e-3,
#:   and errors accumulate through ~200 layers: IoU 0.90, 0.10.
#: * int8 -- quantisation noise (calibrated per tensor) shifts box edges by a few pixels
#:   and scores by up to ~0.2 while mAP drops only a point or two: IoU 0.75, 0.25.
TOLERANCES = {
    "fp32": Tolerance(iou=0.95, conf=0.05),
    "fp16": Tolerance(iou=0.90, conf=0.10),
    "int8": Tolerance(iou=0.75, conf=0.25),
}


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes`` (N, 4) xyxy pixels, ``conf`` (N,), ``cls`` (N,)."""

    boxes: np.ndarray
    conf: np.ndarray
    cls: np.ndarray

    def __len__(self) -> int:
        return int(self.conf.shape[0])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4) -> (N, M)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    a = a.astype(np.float64)[:, None, :]
    b = b.astype(np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class Comparison:
    """The outcome of comparing an export with the source: problems found, and how close."""

    problems: list[str] = field(default_factory=list)
    pairs: int = 0
    worst_iou: float = 1.0
    worst_conf: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.pairs} matched, worst IoU {self.worst_iou:.3f}, "
                f"worst confidence difference {self.worst_conf:.3f}")


def compare_detections(
    reference: Sequence[Detections], exported: Sequence[Detections], tol: Tolerance, threshold: float,
    names: dict[int, str] | None = None,
) -> Comparison:
    """Match each image's exported detections with the source's.

    Pairs are same-class boxes with IoU >= ``tol.iou``, matched greedily from the highest
    IoU.  A matched pair must agree in confidence within ``tol.conf``.  An unmatched
    detection is a problem when it is confidently above the threshold (``threshold +
    tol.conf``) -- within that band, one side may drop it by rounding alone.
    """
    names = names or {}
    result = Comparison()
    if len(reference) != len(exported):
        result.problems.append(f"{len(exported)} results for {len(reference)} images")
        return result
    band = threshold + tol.conf
    for index, (ref, got) in enumerate(zip(reference, exported, strict=True)):
        iou = box_iou(ref.boxes, got.boxes)
        same = ref.cls[:, None] == got.cls[None, :] if len(ref) and len(got) else np.zeros_like(iou, dtype=bool)
        candidates = np.where(same, iou, -1.0)
        matched_ref: set[int] = set()
        matched_got: set[int] = set()
        for flat in np.argsort(-candidates, axis=None):
            a, b = np.unravel_index(int(flat), candidates.shape)
            i, j = int(a), int(b)
            if candidates[i, j] < tol.iou:
                break
            if i in matched_ref or j in matched_got:
                continue
            matched_ref.add(i)
            matched_got.add(j)
            result.pairs += 1
            delta = abs(float(ref.conf[i]) - float(got.conf[j]))
            result.worst_iou = min(result.worst_iou, float(iou[i, j]))
            result.worst_conf = max(result.worst_conf, delta)
            if delta > tol.conf:
                result.problems.append(
                    f"image {index + 1}: {_label(ref.cls[i], names)} confidence {float(ref.conf[i]):.3f} "
                    f"became {float(got.conf[j]):.3f} (more than {tol.conf} apart)"
                )
        for r in range(len(ref)):
            if r not in matched_ref and ref.conf[r] >= band:
                best = float(iou[r].max()) if iou.shape[1] else 0.0
                result.worst_iou = min(result.worst_iou, best)
                result.problems.append(
                    f"image {index + 1}: {_label(ref.cls[r], names)} (confidence {float(ref.conf[r]):.3f}) has no "
                    f"match in the export (best IoU {best:.3f}, needed {tol.iou})"
                )
        for g in range(len(got)):
            if g not in matched_got and got.conf[g] >= band:
                result.problems.append(
                    f"image {index + 1}: the export finds a {_label(got.cls[g], names)} (confidence "
                    f"{float(got.conf[g]):.3f}) the source model does not"
                )
    return result


def compare_raw(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], tol: Tolerance,
                top: int = RAW_TOP_ANCHORS) -> Comparison:
    """Compare raw detection-head outputs ``(4 + classes, anchors)`` (xywh, then class scores).

    For the source's ``top`` anchors (by best class score) the export's box at the same
    anchor must overlap with IoU >= ``tol.iou`` and every class score agree within
    ``tol.conf``.  Used when the source finds nothing to match detections against.
    """
    result = Comparison()
    for index, (ref, got) in enumerate(zip(reference, exported, strict=True)):
        if ref.shape != got.shape:
            result.problems.append(f"image {index + 1}: output shape {got.shape} differs from the source's {ref.shape}")
            continue
        if ref.ndim != 2 or ref.shape[0] < 5:
            result.problems.append(f"image {index + 1}: cannot compare raw outputs of shape {ref.shape}")
            continue
        anchors = np.argsort(-ref[4:].max(axis=0))[:top]
        ref_boxes, got_boxes = _xywh_to_xyxy(ref[:4, anchors].T), _xywh_to_xyxy(got[:4, anchors].T)
        ious = np.diag(box_iou(ref_boxes, got_boxes))
        deltas = np.abs(ref[4:, anchors] - got[4:, anchors]).max(axis=0)
        result.pairs += len(anchors)
        result.worst_iou = min(result.worst_iou, float(ious.min(initial=1.0)))
        result.worst_conf = max(result.worst_conf, float(deltas.max(initial=0.0)))
        if (ious < tol.iou).any():
            result.problems.append(
                f"image {index + 1}: raw boxes of the top anchors differ (IoU down to {float(ious.min()):.3f}, "
                f"needed {tol.iou})"
            )
        if (deltas > tol.conf).any():
            result.problems.append(
                f"image {index + 1}: raw class scores of the top anchors differ by up to {float(deltas.max()):.3f} "
                f"(allowed {tol.conf})"
            )
    return result


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, :2] - half, boxes[:, :2] + half], axis=1)


def _label(cls: Any, names: dict[int, str]) -> str:
    return names.get(int(cls), f"class {int(cls)}")


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled into a ``size`` square, padded with Ultralytics' grey (114)."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(image.resize((w, h), Image.Resampling.BILINEAR), ((size - w) // 2, (size - h) // 2))
    return canvas


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def dataset_images(data_yaml: Path, limit: int) -> list[Path]:
    """The first ``limit`` val images of a (prepared, absolute-path) dataset yaml."""
    data = yaml.safe_load(data_yaml.read_text())
    root = Path(str(data.get("path", data_yaml.parent)))
    val = data.get("val")
    entries = val if isinstance(val, list) else [val]
    found: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        target = (root / entry).resolve()
        if not target.is_relative_to(root.resolve()):
            continue
        if target.is_dir():
            found.extend(sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif target.is_file() and target.suffix == ".txt":
            for line in target.read_text().splitlines():
                path = (target.parent / line.strip()).resolve()
                if line.strip() and path.is_relative_to(root.resolve()) and path.is_file():
                    found.append(path)
        if len(found) >= limit:
            break
    return found[:limit]


def sample_images(data_yaml: Path | None, size: int, limit: int = SAMPLE_IMAGES) -> tuple[list[Image.Image], str]:
    """Square sample images for verification, and where they came from."""
    if data_yaml is not None:
        images: list[Image.Image] = []
        for path in dataset_images(data_yaml, limit):
            try:
                with Image.open(path) as im:
                    images.append(letterbox(im, size))
            except OSError:
                continue
        if images:
            return images, f"{len(images)} val image(s) of the dataset"
    return [letterbox(draw_shapes_image(size, seed)[0], size) for seed in range(limit)], f"{limit} generated images"


def _detections(results: Sequence[Any]) -> list[Detections]:
    out = []
    for r in results:
        boxes = r.boxes
        out.append(Detections(
            boxes=boxes.xyxy.cpu().numpy().astype(np.float64),
            conf=boxes.conf.cpu().numpy().astype(np.float64),
            cls=boxes.cls.cpu().numpy().astype(np.int64),
        ))
    return out


class Verifier:
    """Runs the source model once on the samples, then compares each export with it."""

    def __init__(self, source: Any, images: list[Image.Image], imgsz: int, device: Any) -> None:
        self.source = source
        self.images = images
        self.imgsz = imgsz
        self.device = device
        self.task = str(getattr(source, "task", "detect"))
        self.names = {int(k): str(v) for k, v in dict(getattr(source, "names", {}) or {}).items()}
        self._reference: list[Detections] | None = None
        self._raw: list[np.ndarray] | None = None

    def _predict(self, model: Any) -> list[Detections]:
        return _detections(model.predict(self.images, imgsz=self.imgsz, conf=VERIFY_CONF, iou=VERIFY_NMS_IOU,
                                         device=self.device, verbose=False))

    def _raw_outputs(self, model: Any) -> list[np.ndarray]:
        """The detection head's raw output per image, through the model's own predictor."""
        if model.predictor is None:
            self._predict(model)
        predictor = model.predictor
        out = []
        for image in self.images:
            bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
            y = predictor.model(predictor.preprocess([bgr]))
            while isinstance(y, (list, tuple)):
                y = y[0]
            out.append(y[0].detach().float().cpu().numpy())
        return out

    @property
    def reference(self) -> list[Detections]:
        if self._reference is None:
            self._reference = self._predict(self.source)
        return self._reference

    def verify(self, path: Path, tol: Tolerance) -> tuple[bool, str, Comparison | None]:
        """``(verified, note, comparison)``; the note says what was compared or what differed."""
        if self.task != "detect":
            return False, f"not verified: verification compares detections, and this is a {self.task} model", None
        from ultralytics import YOLO

        exported = YOLO(str(path), task=self.task)
        if any(len(d) for d in self.reference):
            comparison = compare_detections(self.reference, self._predict(exported), tol, VERIFY_CONF, self.names)
            what = "detections"
        else:
            if self._raw is None:
                self._raw = self._raw_outputs(self.source)
            comparison = compare_raw(self._raw, self._raw_outputs(exported), tol)
            what = f"raw outputs (the source model detects nothing at conf {VERIFY_CONF})"
        if comparison.ok:
            return True, f"{what} match: {comparison.summary()}", comparison
        shown = "; ".join(comparison.problems[:3])
        more = f" (+{len(comparison.problems) - 3} more)" if len(comparison.problems) > 3 else ""
        return False, f"{what} differ from the source model beyond IoU {tol.iou} / confidence {tol.conf}: " \
                      f"{shown}{more}", comparison


# --- the operation -----------------------------------------------------------------------


def failure_message(job_id: str, error: AIServiceError) -> ConversionFailed:
    """The ``conversion_failed`` a BE gets when a request fails before the job started."""
    return ConversionFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def operation(settings: Settings, *, on_format_done: FormatHook | None = None) -> Operation:
    """The conversion operation: prefetch 1, one job at a time per worker (and GPU)."""

    def handler(request: ConversionRequest, ctx: JobContext) -> None:
        ConversionJob(request, ctx, on_format_done).run()

    return Operation(
        name="convert",
        request_model=ConversionRequest,
        handler=handler,
        failure=failure_message,
        prefetch=1,
        setup=setup,
        on_cancel=record_cancel,
    )


def setup(resources: Resources) -> None:
    """Make Ultralytics offline, pip-free and safe, import the exporter once, pick the device."""
    settings = resources.settings
    yolo.prepare_ultralytics(settings.work_dir)
    block_openvino_telemetry()
    # torch.jit.trace/load are deprecated in favour of torch.export, but Ultralytics' torchscript
    # export and loader still use them; one FutureWarning per format is only noise in the log.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    from ultralytics.engine import exporter  # noqa: F401 - pay the import once, before the first job
    from ultralytics.utils import checks

    if checks.AUTOINSTALL:  # belt and braces: prepare_ultralytics set YOLO_AUTOINSTALL=0 before the import
        checks.AUTOINSTALL = False
    resources.extras["device"] = yolo.select_device(settings.device)
    resources.extras["formats"] = export_table()


def block_openvino_telemetry() -> None:
    """Make ``import openvino_telemetry`` fail in this process, whatever is installed.

    OpenVINO's converter sends usage analytics through that package during every export,
    whatever ``YOLO_OFFLINE`` says (FIELD-NOTES); ``make install`` uninstalls it, and this
    covers a worker installed another way: every OpenVINO import of it is guarded by
    ``except ImportError`` and falls back to a no-op stub.
    """
    if "openvino_telemetry" not in sys.modules or sys.modules["openvino_telemetry"] is None:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]


@dataclass
class FormatFailure:
    format: str
    error: AIServiceError


@dataclass(frozen=True)
class Exported:
    """A format exported and checked locally, not yet uploaded."""

    path: Path
    verified: bool
    note: str


class ConversionJob:
    """One conversion request, from taking it to its terminal message."""

    def __init__(self, request: ConversionRequest, ctx: JobContext, on_format_done: FormatHook | None) -> None:
        self.request = request
        self.ctx = ctx
        self.on_format_done = on_format_done
        self.run_dir = ctx.settings.work_dir / "runs" / f"{request.job_id}-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()
        self.device = ctx.resources.extras.get("device")
        ledger = jobs_ledger(ctx.storage, ctx.settings, op=ctx.op)
        self.job = LongJob(ctx, ledger, cancelled_message=self._cancelled, failed_message=self._failed)
        self.artifacts: list[Artifact] = []
        self.failures: list[FormatFailure] = []
        self.current: str | None = None
        self.source_sha256 = ""

    # --- the job -----------------------------------------------------------------------

    def run(self) -> None:
        req, ctx = self.request, self.ctx
        table = ctx.resources.extras.get("formats") or export_table()
        plans = plan_formats(req, table)  # a bad request -> invalid_request, before the job is taken
        begin = self.job.begin()
        if begin.record is None:
            ctx.log.info("Nothing to run (%s)", begin.reason)
            return
        record = begin.record
        self.artifacts = self._load_done(record)
        ctx.update(ConversionStarted(job_id=req.job_id, formats=list(req.formats), worker=ctx.worker))
        try:
            self._convert_all(plans, record)
            if self.failures:
                first = self.failures[0]
                ctx.log.warning("Conversion ended with %d failed format(s): %s", len(self.failures),
                                self._failure_text())
                self.job.finish(record, "failed", self._failed(record, first.error))
            else:
                self.job.finish(record, "completed", ConversionCompleted(
                    job_id=req.job_id, artifacts=self.artifacts,
                    conversion_time=round(time.monotonic() - self.started, 3),
                ))
                ctx.log.info("Conversion completed: %s", ", ".join(a.format for a in self.artifacts))
        except LeaseLost:
            ctx.log.warning("Stopped: another worker owns the job now")
        except BaseException as exc:  # noqa: BLE001 - every failure ends in one terminal message
            error = self._classify(exc)
            if error.error_code == "cancelled":
                ctx.log.info("Cancelled after %d artifact(s)", len(self.artifacts))
                self.job.finish(record, "cancelled", self._cancelled(record))
                return
            ctx.log.warning("Conversion failed: %s: %s", error.error_code, error.message,
                            exc_info=not isinstance(exc, AIServiceError))
            self.job.finish(record, "failed", self._failed(record, error))
            if isinstance(error, InvalidInput):
                ctx.outbox.dead_letter().wait(30)
        finally:
            self.job.stop_renewing()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _convert_all(self, plans: list[Plan], record: JobRecord) -> None:
        req, ctx = self.request, self.ctx
        self._checkpoint()
        source = self._fetch_model()
        data_yaml = None
        if req.dataset is not None:
            data_yaml = prepare_dataset(ctx.storage, req.dataset.s3_prefix, ctx.settings.work_dir, self.run_dir,
                                        limits_from(ctx.settings))
        images, origin = sample_images(data_yaml, req.options.imgsz)
        verifier = Verifier(source, images, req.options.imgsz, self.device)
        ctx.log.info("Exporting %s at %d px (%s) on %s; verifying on %s", ", ".join(req.formats),
                     req.options.imgsz, precision(req.options), self.device, origin)
        done = {a.format for a in self.artifacts}
        for index, plan in enumerate(plans):
            if plan.requested in done:
                ctx.log.info("%s was done before the job was resumed", plan.requested)
                continue
            self.current = plan.requested
            self._checkpoint()
            attributes = {"ai.job_id": req.job_id, "ai.format": plan.requested, "ai.precision": precision(req.options)}
            with tracing.span(f"export {plan.requested}", attributes=attributes) as span:
                artifact = self._convert_one(plan, source, verifier, data_yaml)
                if artifact is None:
                    span.fail(f"{plan.requested}: {self.failures[-1].error.error_code}" if self.failures else "failed")
                    continue
                span.set("ai.verified", artifact.verified)
                self._checkpoint()  # a cancel that came during the export: nothing uploaded for this format
                self._upload(plan, artifact)
                progress = round(100.0 * (index + 1) / len(plans), 2)
                ctx.update(ConversionUpdate(job_id=req.job_id, current_format=plan.requested, progress=progress,
                                            artifact=self.artifacts[-1]))
            if self.on_format_done is not None:
                self.on_format_done(plan.requested, ctx)
        self.current = None

    def _checkpoint(self) -> None:
        """A safe point: stop here when cancelled or no longer ours.

        A warm shutdown does not stop a conversion: it is short next to training, so the
        job is finished first (README, Operations) rather than handed back and redone.
        """
        if self.ctx.cancelled.is_set():
            raise PermanentError("conversion was cancelled", error_code="cancelled")
        if self.job.lost.is_set():
            raise LeaseLost("the job was taken over by another worker")

    def _provenance(self) -> Provenance:
        s = self.ctx.settings
        return Provenance(self.ctx.storage, prefix=s.jobs_prefix, trust_external=s.trust_external_models)

    def _fetch_model(self) -> Any:
        """Download the model under a neutral local name and load it without running its pickle."""
        local = self.run_dir / "source" / "model.pt"
        self.ctx.log.info("Fetching %s", self.request.model.path)
        key = self.request.model.path
        try:
            self.ctx.storage.download_file(key, local)
        except ObjectNotFound as exc:
            raise ObjectNotFound(f"model.path {key!r} does not exist: {exc.message}") from None
        self.source_sha256 = file_sha256(local)
        try:
            model = yolo.safe_load_model(local)
        except InvalidInput:  # its message names the neutral local file; the BE knows the key
            raise InvalidInput(
                f"model.path {key!r} is not a valid Ultralytics .pt checkpoint (not a model, corrupt, or a "
                "pickle that would run code on load)"
            ) from None
        if getattr(self.device, "type", "cpu") == "cpu":
            # The exporter's select_device() just set torch to cpu_count - 1 threads (1 of 2 cores
            # here); tracing, the dry run and the ONNX/OpenVINO conversion then use every core.
            model.add_callback("on_export_start", lambda exporter: yolo.set_cpu_threads())
        return model

    # --- one format --------------------------------------------------------------------

    def _convert_one(self, plan: Plan, source: Any, verifier: Verifier, data_yaml: Path | None) -> Exported | None:
        """Export and verify one format; a format-level failure is recorded and None returned."""
        ctx, opts = self.ctx, self.request.options
        reason = unsupported_reason(plan, opts, self.device)
        if reason is not None:
            ctx.log.warning("%s: unsupported here: %s", plan.requested, reason)
            self.failures.append(FormatFailure(plan.requested, PermanentError(reason, error_code="unsupported_format")))
            return None
        out_dir = self.run_dir / plan.name
        out_dir.mkdir(parents=True, exist_ok=True)
        source.model.pt_path = str(out_dir / "model.pt")  # where the exporter writes: one folder per format
        args = export_arguments(plan, self.request, self.device, data_yaml)
        started = time.monotonic()
        try:
            exported = Path(source.export(**args))
        except BaseException as exc:  # noqa: BLE001 - one format's failure must not end the others
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            error = self._export_error(plan, exc)
            ctx.log.warning("%s: export failed: %s: %s", plan.requested, error.error_code, error.message,
                            exc_info=error.error_code == "export_error")
            self.failures.append(FormatFailure(plan.requested, error))
            return None
        seconds = time.monotonic() - started
        if not exported.exists() or not exported.resolve().is_relative_to(self.run_dir.resolve()):
            self.failures.append(FormatFailure(plan.requested, PermanentError(
                f"{plan.requested} export produced no artifact", error_code="export_error")))
            return None
        tol = TOLERANCES[precision(opts)]
        try:
            verified, note, _ = verifier.verify(exported, tol)
        except Exception as exc:  # noqa: BLE001 - an artifact that cannot be run is reported, not hidden
            if yolo.is_out_of_memory(exc):
                raise
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            verified, note = False, f"could not load and run the exported model: {type(exc).__name__}: {detail}"
        log = ctx.log.info if verified else ctx.log.warning
        log("%s: exported in %.1f s; verification %s: %s", plan.requested, seconds,
            "passed" if verified else "FAILED", note)
        return Exported(exported, verified, note)

    def _upload(self, plan: Plan, exported: Exported) -> None:
        """Upload one artifact, record it durably, then announce it."""
        ctx = self.ctx
        path = exported.path
        name = _artifact_name(self.request.model.path, path.name)
        prefix = self.request.output.prefix.rstrip("/")
        size, sha = describe_local(path)
        if path.is_dir():
            key = f"{prefix}/{name}/"
            ctx.storage.delete_prefix(key)  # a re-export must not leave stale files in the folder
            ctx.storage.upload_dir(path, key)
        else:
            key = f"{prefix}/{name}"
            ctx.storage.upload_file(path, key)
        self._provenance().record(
            sha256=sha, fmt=plan.requested, key=key, size_bytes=size, source_key=self.request.model.path,
            source_sha256=self.source_sha256, options=self.request.options.model_dump(), job_id=self.request.job_id)
        artifact = Artifact(format=plan.requested, path=key, size_bytes=size, sha256=sha, verified=exported.verified,
                            verification=None if exported.verified else exported.note)
        self.artifacts.append(artifact)
        self._save_done()
        ctx.log.info("%s: uploaded %s (%d bytes)", plan.requested, key, size)

    # --- durable progress --------------------------------------------------------------

    def _done_key(self) -> str:
        return self.job.ledger.checkpoint_key(self.request.job_id, "artifacts.json")

    def _save_done(self) -> None:
        """The artifacts so far go to storage with the lease, before the BE hears of them:
        a job resumed elsewhere skips them (and ``progress`` never goes back)."""
        payload = json.dumps([a.to_json_dict() for a in self.artifacts]).encode()
        self.ctx.storage.write_bytes(self._done_key(), payload)
        record = self.job.record
        checkpoints = dict(record.checkpoints) if record is not None else {}
        checkpoints["artifacts"] = self._done_key()
        self.job.renew(checkpoints=checkpoints)

    def _load_done(self, record: JobRecord) -> list[Artifact]:
        key = record.checkpoints.get("artifacts")
        if not key:
            return []
        try:
            items = json.loads(self.ctx.storage.read_bytes(key))
            artifacts = [Artifact(**item) for item in items]
        except (AIServiceError, ValueError, TypeError) as exc:
            self.ctx.log.warning("Ignoring the artifacts of the earlier attempt (%s)", exc)
            return []
        requested = set(self.request.formats)
        return [a for a in artifacts if a.format in requested]

    # --- messages ----------------------------------------------------------------------

    def _cancelled(self, record: JobRecord) -> ConversionCancelled:
        return ConversionCancelled(job_id=self.request.job_id, artifacts=list(self.artifacts))

    def _failed(self, record: JobRecord, error: AIServiceError) -> ConversionFailed:
        failed_format = self.current
        message = error.message
        if self.failures:
            failed_format = self.failures[0].format
            message = self._failure_text()
            if error is not self.failures[0].error:  # a job-level failure after some formats failed
                failed_format = self.current or failed_format
                message = f"{error.message}; earlier: {message}"
        return ConversionFailed(
            job_id=self.request.job_id,
            error_code=error.error_code,
            error_message=message,
            failed_format=failed_format,
            artifacts=list(self.artifacts),
        )

    def _failure_text(self) -> str:
        parts = [f"{f.format}: {f.error.message}" for f in self.failures]
        total = len(self.request.formats)
        return f"{len(self.failures)} of {total} format(s) failed: " + "; ".join(parts)

    def _export_error(self, plan: Plan, exc: BaseException) -> AIServiceError:
        if yolo.is_out_of_memory(exc):
            return PermanentError(f"{plan.requested}: out of memory during export: lower options.imgsz or "
                                  "options.batch", error_code="out_of_memory")
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return PermanentError(f"{plan.requested} export needs the Python package {exc.name.split('.')[0]}, "
                                  "not installed on this worker", error_code="unsupported_format")
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        detail = detail.replace("ERROR ❌️", "").strip()[:300]
        return PermanentError(f"{plan.requested} export failed: {type(exc).__name__}: {detail}",
                              error_code="export_error")

    def _classify(self, exc: BaseException) -> AIServiceError:
        """Map a job-level failure to the contract's error codes, with a message fit for a BE."""
        if isinstance(exc, AIServiceError):
            return exc
        if yolo.is_out_of_memory(exc):
            return PermanentError("out of memory: lower options.imgsz or options.batch", error_code="out_of_memory")
        if type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
            return StorageError(f"storage failed during conversion: {type(exc).__name__}")
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return PermanentError(f"conversion failed: {type(exc).__name__}: {detail}", error_code="export_error")


def _artifact_name(model_key: str, exported_name: str) -> str:
    """``model.onnx`` / ``model_openvino_model`` named after the source key's stem instead."""
    stem = PurePosixPath(model_key).stem or "model"
    local = "model"
    return stem + exported_name[len(local):] if exported_name.startswith(local) else exported_name


__all__ = [
    "ALIASES",
    "Artifact",
    "ConversionJob",
    "Detections",
    "FormatSpec",
    "Plan",
    "TOLERANCES",
    "Tolerance",
    "compare_detections",
    "compare_raw",
    "describe_local",
    "export_table",
    "folder_digest",
    "operation",
    "plan_formats",
    "unsupported_reason",
]
