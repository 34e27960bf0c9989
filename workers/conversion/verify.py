"""Running the source model and an export on the same sample images, and comparing them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from ai_service.shapes import draw_shapes_image
from workers.conversion.compare import Comparison, Detections, Tolerance, compare_detections, compare_raw

#: Confidence threshold of the verification predictions (Ultralytics' default).
VERIFY_CONF = 0.25
#: NMS IoU of the verification predictions (Ultralytics' default).
VERIFY_NMS_IOU = 0.7
#: Sample images per verification.
SAMPLE_IMAGES = 3


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
        from ultralytics.models import YOLO

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
