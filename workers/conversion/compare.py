"""How an export's detections (or raw head outputs) are matched with the source model's.

The :class:`Tolerance` per precision says how far an export may drift and still count as
the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Anchors compared when raw outputs are compared.
RAW_TOP_ANCHORS = 10


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
