"""The containment of a dataset: the only code that turns a storage prefix into what Ultralytics reads.

A dataset is written by someone we do not trust, and Ultralytics trusts what it reads:
it uses list-file lines as they are (absolute paths included), finds labels by string
replacement, unpickles ``<labels folder>.cache`` files, and ``exec``s a ``download:``
script when ``val`` is missing.  So Ultralytics never reads the dataset itself.  The
worker mirrors the prefix into its cache (:func:`ai_service.storage.sync_prefix_report`),
checks it, and *materialises* a view of its own in the job's run folder:

* ``images/<split>/<n>_<name>`` -- a hard link (or copy) of each image ``train``/``val``
  names, after resolving folders and list-file lines inside the dataset: an absolute
  path, a ``..`` escape or a missing file is ``dataset_invalid`` naming the first one;
  only regular files with an image suffix, whose header Pillow identifies and whose
  pixel count is within ``MAX_DATASET_IMAGE_PIXELS`` (bombs are refused before decoding);
* ``labels/<split>/<n>_<name>.txt`` -- the label Ultralytics would have paired with it;
* ``data.yaml`` -- ``path``, ``train``, ``val``, ``names``, ``nc`` and nothing else.

Nothing from storage with a ``.cache`` suffix is ever placed in the view, and the label
caches Ultralytics writes land in the view, which is deleted with the run folder: no job
reads another job's cache.  A rejected dataset's mirror is removed, so nothing of it is
left for a later job.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError

from ai_service import tracing
from ai_service.errors import DatasetError as DatasetError  # defined in errors.py, importable from here as before
from ai_service.storage import Storage, forget_prefix, sync_prefix_report

log = logging.getLogger("workers.datasets")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO")
#: A list file longer than this is not a list of images.
MAX_LIST_FILE_BYTES = 64 * 1024 * 1024
MAX_LABEL_BYTES = 1024 * 1024
MAX_CLASSES = 10000
SPLITS = ("train", "val")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class DatasetLimits:
    max_image_pixels: int = 40_000_000
    max_files: int = 1_000_000


@dataclass(frozen=True)
class Materialised:
    data_yaml: Path
    images: dict[str, int]  # split -> images in the view


def materialise(
    storage: Storage, prefix: str, work_dir: Path, run_dir: Path, limits: DatasetLimits | None = None
) -> Materialised:
    """Mirror ``prefix``, check it, and build the view Ultralytics trains on; see the module doc."""
    limits = limits or DatasetLimits()
    cache_root = work_dir / "datasets"
    view = run_dir / "dataset"
    with tracing.span("dataset materialise", attributes={"ai.dataset.prefix": prefix}) as span:
        with tracing.span("dataset sync") as sync:
            report = sync_prefix_report(storage, prefix, cache_root)
            sync.set_attributes({"ai.dataset.objects": report.objects, "ai.dataset.downloaded": report.downloaded,
                                 "ai.dataset.removed": report.removed,
                                 "ai.dataset.bytes_downloaded": report.bytes_downloaded})
        try:
            built = _build(report.path.resolve(), prefix, view, limits)
        except DatasetError:
            shutil.rmtree(view, ignore_errors=True)
            forget_prefix(storage, prefix, cache_root)
            raise
        span.set_attributes({f"ai.dataset.images.{split}": n for split, n in built.images.items()})
        return built


def _build(root: Path, prefix: str, view: Path, limits: DatasetLimits) -> Materialised:
    data = _read_yaml(root, prefix)
    names = _names(data)
    shutil.rmtree(view, ignore_errors=True)
    counts: dict[str, int] = {}
    total = 0
    for split in SPLITS:
        images = list(_split_images(root, data.get(split), split))
        total += len(images)
        if total > limits.max_files:
            raise DatasetError(f"the dataset names more than {limits.max_files} images (MAX_DATASET_FILES)")
        if not images:
            raise DatasetError(f"data.yaml '{split}' names no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        counts[split] = _place(root, images, view, split, limits)
        if counts[split] == 0:
            raise DatasetError(f"data.yaml '{split}': none of its images could be read")
    own = {
        "path": str(view.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": names,
        "nc": len(names),
    }
    data_yaml = view / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(own, sort_keys=False))
    log.info("[Handler] Dataset %s checked: %d train / %d val images, %d classes", prefix, counts["train"],
             counts["val"], len(names))
    return Materialised(data_yaml, counts)


def _read_yaml(root: Path, prefix: str) -> dict[str, Any]:
    for name in ("data.yaml", "data.yml"):
        candidate = root / name
        if candidate.is_file() and not candidate.is_symlink():
            break
    else:
        raise DatasetError(f"dataset {prefix!r} has no data.yaml at its top level")
    if candidate.stat().st_size > MAX_LIST_FILE_BYTES:
        raise DatasetError("data.yaml is too large")
    try:
        data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"data.yaml of {prefix!r} is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DatasetError("data.yaml must be a mapping with train, val and names")
    if "download" in data:
        log.info("[Handler] Ignoring the 'download' key of %s's data.yaml (never run or fetched)", prefix)
    return data


def _names(data: dict[str, Any]) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        try:
            keyed = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError("data.yaml 'names' keys must be class indices 0, 1, ...") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError("data.yaml 'names' keys must be the class indices 0 .. nc-1")
        names = [keyed[i] for i in range(len(keyed))]
    if not names or not isinstance(names, list):
        raise DatasetError("data.yaml must list the class names under 'names'")
    if len(names) > MAX_CLASSES:
        raise DatasetError(f"data.yaml names {len(names)} classes, at most {MAX_CLASSES}")
    if not all(isinstance(n, (str, int)) and len(str(n)) <= 256 for n in names):
        raise DatasetError("data.yaml 'names' must be short strings")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"data.yaml says nc: {nc!r} but names {len(names)} classes")
    return [str(n) for n in names]


def _inside(root: Path, raw: str, what: str, *, base: Path | None = None) -> Path:
    """``raw`` resolved inside ``root`` (relative to ``base`` or the root), or DatasetError."""
    if raw.startswith("/") or "\\" in raw or re.match(r"^[A-Za-z]:", raw) or "\0" in raw:
        raise DatasetError(f"{what} {raw[:200]!r} must be a path relative to the dataset")
    target = ((base or root) / raw).resolve()
    if target != root and not target.is_relative_to(root):
        raise DatasetError(f"{what} {raw[:200]!r} points outside the dataset")
    return target


def _split_images(root: Path, value: Any, split: str) -> Iterator[Path]:
    """Every image ``train``/``val`` names (folders recursively, list files line by line)."""
    entries: list[Any] = value if isinstance(value, list) else [value]
    if not value or not all(isinstance(e, str) and e for e in entries):
        raise DatasetError(f"data.yaml must give a relative '{split}' path (a folder or a list file)")
    for entry in entries:
        target = _inside(root, entry, f"data.yaml '{split}' path")
        if target.is_dir():
            for dirpath, dirnames, filenames in os.walk(target):
                dirnames.sort()
                for name in sorted(filenames):
                    path = Path(dirpath, name)
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        yield path
        elif target.is_file():
            yield from _list_file(root, target, split)
        else:
            raise DatasetError(f"data.yaml '{split}' path {entry!r} does not exist in the dataset")


def _list_file(root: Path, listing: Path, split: str) -> Iterator[Path]:
    if listing.stat().st_size > MAX_LIST_FILE_BYTES:
        raise DatasetError(f"list file {listing.relative_to(root)} is over {MAX_LIST_FILE_BYTES} bytes")
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"list file {listing.relative_to(root)} is not UTF-8 text") from None
    rel_list = listing.relative_to(root).as_posix()
    for number, line in enumerate(lines, 1):
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        # Ultralytics resolves './x' against the list's folder; other relative lines are
        # taken relative to the dataset (Ultralytics would use its working directory).
        base = listing.parent if item.startswith("./") else root
        path = _inside(root, item, f"{rel_list} line {number}:", base=base)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue  # Ultralytics skips these too
        if not path.is_file():
            raise DatasetError(f"{rel_list} line {number}: {item[:200]!r} does not exist in the dataset")
        yield path


def _label_of(root: Path, image: Path) -> Path | None:
    """The label Ultralytics pairs with ``image`` (last ``/images/`` -> ``/labels/``, ``.txt``)."""
    text = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa not in text:
        return None
    label = Path(sb.join(text.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt").resolve()
    if not label.is_relative_to(root) or not label.is_file():
        return None
    return label


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the header alone (Pillow's own opener), None if not an image."""
    patches = sys.modules.get("ultralytics.utils.patches")
    opener = getattr(patches, "_image_open", Image.open) if patches is not None else Image.open
    try:
        with opener(path, formats=PIL_FORMATS) as probe:
            size: tuple[int, int] = probe.size
            return size
    except Image.DecompressionBombError:
        return (sys.maxsize, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _place(root: Path, images: list[Path], view: Path, split: str, limits: DatasetLimits) -> int:
    image_dir = view / "images" / split
    label_dir = view / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.init()
    placed = 0
    for index, image in enumerate(images):
        rel = image.relative_to(root).as_posix()
        if image.is_symlink() or not image.is_file():
            raise DatasetError(f"{rel} is not a regular file")
        size = _image_size(image)
        if size is None:
            log.warning("[Handler] Skipping %s: not an image Pillow can identify", rel)
            continue
        width, height = size
        if width * height > limits.max_image_pixels:
            raise DatasetError(f"{rel} is {width}x{height} pixels, over the limit of {limits.max_image_pixels} "
                               "per dataset image (MAX_DATASET_IMAGE_PIXELS)")
        stem = _SAFE_NAME.sub("_", image.stem)[:80] or "image"
        name = f"{index:07d}_{stem}"
        _link(image, image_dir / f"{name}{image.suffix.lower()}")
        label = _label_of(root, image)
        if label is not None:
            if label.stat().st_size > MAX_LABEL_BYTES:
                raise DatasetError(f"{label.relative_to(root)} is over {MAX_LABEL_BYTES} bytes")
            shutil.copyfile(label, label_dir / f"{name}.txt")
        placed += 1
    return placed


def _link(src: Path, dest: Path) -> None:
    """A hard link when the cache and the run share a filesystem (free), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def limits_from(settings: Any) -> DatasetLimits:
    return DatasetLimits(max_image_pixels=settings.max_dataset_image_pixels, max_files=settings.max_dataset_files)


def prepare_dataset(
    storage: Storage, prefix: str, work_dir: Path, run_dir: Path, limits: DatasetLimits | None = None
) -> Path:
    """:func:`materialise`, returning only the view's ``data.yaml`` (what Ultralytics is given)."""
    return materialise(storage, prefix, work_dir, run_dir, limits).data_yaml
