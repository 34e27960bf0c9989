"""A tiny synthetic detection dataset: circles and squares on a noisy background.

Used by the ``demo`` CLI command and by tests, so it depends on numpy and Pillow only
(no torch, no ultralytics) and is fast: 32 images of 128 px take well under a second.
Everything is deterministic for a given seed, so tests can compare files byte for byte
and compare detections with the shapes that were drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES: dict[int, str] = {0: "circle", 1: "square"}
CIRCLE = 0
SQUARE = 1

#: One ground-truth object: (class id, (x1, y1, x2, y2)) in pixels, x2/y2 exclusive.
Box = tuple[int, tuple[float, float, float, float]]

_MIN_FRACTION = 0.2  # shape side as a fraction of the image side
_MAX_FRACTION = 0.5
_MARGIN = 2  # pixels kept free between shapes so boxes never touch
_NOISE_STD = 8.0
_MIN_CONTRAST = 180  # L1 distance (0..765) between fill and background colours


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1])


def _fill_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the background that the shape is clearly visible."""
    for _ in range(64):
        colour = rng.integers(0, 256, size=3)
        if int(np.abs(colour - background).sum()) >= _MIN_CONTRAST:
            return int(colour[0]), int(colour[1]), int(colour[2])
    inverted = 255 - background  # always far from a mid-range background
    return int(inverted[0]), int(inverted[1]), int(inverted[2])


def draw_shapes_image(size: int, seed: int) -> tuple[Image.Image, list[Box]]:
    """Draw one RGB image of ``size`` x ``size`` with 1-3 non-overlapping shapes.

    Returns the image and its ground truth, ``[(class_id, (x1, y1, x2, y2)), ...]`` in
    pixels (class 0 = circle, 1 = square), so inference tests can match detections
    against what was drawn.  The same ``(size, seed)`` always gives the same pixels.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, not {size}")
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 216, size=3)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)

    lo = max(4, round(_MIN_FRACTION * size))
    hi = max(lo, round(_MAX_FRACTION * size))
    wanted = int(rng.integers(1, 4))
    placed: list[tuple[int, int, int, int]] = []
    truth: list[Box] = []
    for _ in range(wanted):
        for _attempt in range(100):
            side = int(rng.integers(lo, hi + 1))
            x1 = int(rng.integers(0, size - side + 1))
            y1 = int(rng.integers(0, size - side + 1))
            box = (x1, y1, x1 + side, y1 + side)
            if not any(_overlaps(box, other) for other in placed):
                break
        else:
            break  # no room left for another shape; fewer shapes is fine
        cls = int(rng.integers(0, 2))
        colour = _fill_colour(rng, background)
        corners = [box[0], box[1], box[2] - 1, box[3] - 1]  # PIL bounds are inclusive
        if cls == CIRCLE:
            draw.ellipse(corners, fill=colour)
        else:
            draw.rectangle(corners, fill=colour)
        placed.append(box)
        truth.append((cls, (float(box[0]), float(box[1]), float(box[2]), float(box[3]))))

    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0.0, _NOISE_STD, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, truth


def yolo_label_lines(truth: list[Box], size: int) -> list[str]:
    """Ground truth as YOLO label lines: ``class cx cy w h``, normalised to 0..1."""
    lines = []
    for cls, (x1, y1, x2, y2) in truth:
        cx, cy = (x1 + x2) / 2 / size, (y1 + y2) / 2 / size
        w, h = (x2 - x1) / size, (y2 - y1) / size
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def _image_seed(seed: int, split: int, index: int) -> int:
    """An independent, reproducible seed per image (no overlap between splits)."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])


def _data_yaml() -> str:
    names = "".join(f"  {k}: {v}\n" for k, v in CLASS_NAMES.items())
    return (
        "# Synthetic circles-and-squares detection dataset (ai_service.shapes).\n"
        "# Paths are relative to this file; the worker adds an absolute `path:`.\n"
        "train: images/train\n"
        "val: images/val\n"
        f"nc: {len(CLASS_NAMES)}\n"
        f"names:\n{names}"
    )


def generate_shapes_dataset(dest: Path, *, n_train: int = 24, n_val: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write an Ultralytics detection dataset under ``dest`` and return its ``data.yaml``.

    Layout: ``images/{train,val}/NNNNNN.png``, ``labels/{train,val}/NNNNNN.txt`` and a
    ``data.yaml`` with relative ``train``/``val`` paths, no ``path:`` key, and
    ``names: {0: circle, 1: square}`` -- the shape the contract asks a BE to upload.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError("n_train and n_val must be at least 1")
    dest = Path(dest)
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        image_dir = dest / "images" / split
        label_dir = dest / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, truth = draw_shapes_image(size, _image_seed(seed, split_index, i))
            stem = f"{i:06d}"
            image.save(image_dir / f"{stem}.png", format="PNG")
            (label_dir / f"{stem}.txt").write_text("".join(f"{line}\n" for line in yolo_label_lines(truth, size)))
    data_yaml = dest / "data.yaml"
    data_yaml.write_text(_data_yaml())
    return data_yaml
