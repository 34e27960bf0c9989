"""The synthetic shapes dataset: layout, label consistency, determinism, no heavy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ai_service.shapes import CLASS_NAMES, draw_shapes_image, generate_shapes_dataset

REPO = Path(__file__).resolve().parents[1]


def _patch(pixels: np.ndarray, x: float, y: float) -> np.ndarray:
    """Mean colour of the 3x3 patch around (x, y): averages the noise away."""
    xi, yi = int(x), int(y)
    return pixels[yi - 1 : yi + 2, xi - 1 : xi + 2].reshape(-1, 3).mean(axis=0)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_has_the_ultralytics_layout_and_a_relative_data_yaml(tmp_path: Path) -> None:
    data_yaml = generate_shapes_dataset(tmp_path / "ds", n_train=5, n_val=3, size=64)

    assert data_yaml == tmp_path / "ds" / "data.yaml"
    for split, count in (("train", 5), ("val", 3)):
        images = sorted((tmp_path / "ds" / "images" / split).glob("*.png"))
        labels = sorted((tmp_path / "ds" / "labels" / split).glob("*.txt"))
        assert len(images) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
    text = data_yaml.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert "train: images/train" in lines
    assert "val: images/val" in lines
    assert not any(line.startswith("path:") for line in lines)
    assert "  0: circle" in lines
    assert "  1: square" in lines


def test_data_yaml_parses_to_relative_paths_and_both_class_names(tmp_path: Path) -> None:
    import yaml
    data = yaml.safe_load(generate_shapes_dataset(tmp_path, n_train=1, n_val=1, size=32).read_text())

    assert data["train"] == "images/train"
    assert data["val"] == "images/val"
    assert data["names"] == CLASS_NAMES == {0: "circle", 1: "square"}
    assert "path" not in data


def test_every_label_line_is_a_normalised_box_matching_the_drawn_shapes(tmp_path: Path) -> None:
    generate_shapes_dataset(tmp_path, n_train=12, n_val=4, size=96, seed=3)

    for label in sorted((tmp_path / "labels").rglob("*.txt")):
        rows = [line.split() for line in label.read_text().splitlines()]
        assert 1 <= len(rows) <= 3
        for row in rows:
            assert len(row) == 5
            cls, cx, cy, w, h = int(row[0]), *map(float, row[1:])
            assert cls in (0, 1)
            assert 0.2 - 0.02 <= w <= 0.5 + 0.02
            assert abs(w - h) < 1e-6
            assert cx - w / 2 >= 0.0
            assert cx + w / 2 <= 1.0
            assert cy - h / 2 >= 0.0
            assert cy + h / 2 <= 1.0


def test_drawn_shapes_do_not_overlap_and_stand_out_from_the_background() -> None:
    for seed in range(40):
        image, truth = draw_shapes_image(128, seed)
        assert image.size == (128, 128)
        assert image.mode == "RGB"
        assert 1 <= len(truth) <= 3
        pixels = np.asarray(image, dtype=np.float32)
        corner = _patch(pixels, 1, 1)
        for i, (cls, (x1, y1, x2, y2)) in enumerate(truth):
            assert cls in (0, 1)
            assert 0 <= x1 < x2 <= 128
            assert 0 <= y1 < y2 <= 128
            for _, (a1, b1, a2, b2) in truth[i + 1 :]:
                assert x2 <= a1 or a2 <= x1 or y2 <= b1 or b2 <= y1, f"overlap at seed {seed}"
            centre = _patch(pixels, (x1 + x2) / 2, (y1 + y2) / 2)
            inside_corner = any(a <= 3 and b <= 3 for _, (a, b, _c, _d) in truth)
            if not inside_corner:
                assert np.abs(centre - corner).sum() > 100, f"low contrast at seed {seed}"


def test_circles_leave_their_box_corners_as_background_and_squares_fill_them() -> None:
    seen = set()
    for seed in range(20):
        image, truth = draw_shapes_image(128, seed)
        pixels = np.asarray(image, dtype=np.float32)
        for cls, (x1, y1, x2, y2) in truth:
            corner = _patch(pixels, x1 + 1, y1 + 1)
            centre = _patch(pixels, (x1 + x2) / 2, (y1 + y2) / 2)
            same = np.abs(corner - centre).sum() < 60  # only noise between them
            assert same == (cls == 1), f"class {cls} at seed {seed}"
            seen.add(cls)
    assert seen == {0, 1}


def test_the_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    generate_shapes_dataset(tmp_path / "a", n_train=4, n_val=2, size=64, seed=7)
    generate_shapes_dataset(tmp_path / "b", n_train=4, n_val=2, size=64, seed=7)
    generate_shapes_dataset(tmp_path / "c", n_train=4, n_val=2, size=64, seed=8)

    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")
    image1, truth1 = draw_shapes_image(64, 11)
    image2, truth2 = draw_shapes_image(64, 11)
    assert truth1 == truth2
    assert image1.tobytes() == image2.tobytes()


def test_train_and_val_images_are_different_pictures(tmp_path: Path) -> None:
    generate_shapes_dataset(tmp_path, n_train=6, n_val=6, size=64)

    train = {p.read_bytes() for p in (tmp_path / "images" / "train").iterdir()}
    val = {p.read_bytes() for p in (tmp_path / "images" / "val").iterdir()}
    assert len(train) == 6
    assert len(val) == 6
    assert not train & val


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_train and n_val must be at least 1"):
        generate_shapes_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="size must be at least 32 pixels, not 16"):
        draw_shapes_image(16, 0)


def test_importing_shapes_does_not_import_torch_or_ultralytics() -> None:
    code = (
        "import sys, ai_service.shapes as s; "
        "assert s.generate_shapes_dataset; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ultralytics', 'cv2')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
