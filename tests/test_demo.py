"""``ai-service demo`` end to end (``--quick``): real train, convert and infer workers, the
dashboard open in headless Chromium while it runs, and the detections picture checked
against the shapes that were drawn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image

from ai_service.cli.demo import BOX_COLOURS, INFER_SEEDS, INFER_SIZE, SCALE, tile_origin
from ai_service.shapes import draw_shapes_image
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.dashboard import ARTIFACTS, Dashboard, chromium, no_torch_cli, points_seen, watch_points
from tests.support.procs import REPO

PRETRAINED = "models/pretrained/shapes.pt"


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def edge_colour_share(picture: Image.Image, tile: int, box: dict[str, float], colour: tuple[int, int, int]) -> float:
    """How much of the box's left and bottom edges, where the picture draws them, has ``colour``
    (each sample looks one or two pixels either side of the edge: the line is 2 px wide)."""
    x0, y0 = tile_origin(tile)
    x1, y1, x2, y2 = (x0 + box["x1"] * SCALE, y0 + box["y1"] * SCALE, x0 + box["x2"] * SCALE, y0 + box["y2"] * SCALE)
    rgb = picture.convert("RGB")
    left = [any(rgb.getpixel((int(x1) + dx, y)) == colour for dx in (-1, 0, 1, 2))
            for y in range(int(y1) + 4, int(y2) - 3, 2)]
    bottom = [any(rgb.getpixel((x, int(y2) + dy)) == colour for dy in (-2, -1, 0, 1))
              for x in range(int(x1) + 4, int(x2) - 3, 2)]
    samples = left + bottom
    return sum(samples) / max(1, len(samples))


def test_demo_quick_trains_converts_detects_and_draws_boxes_where_the_shapes_are_while_the_dashboard_follows(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any],
    tmp_path: Path,
) -> None:
    storage = Path(worker_env["STORAGE_DIR"])
    (storage / PRETRAINED).parent.mkdir(parents=True)
    shutil.copy(trained_model["model"], storage / PRETRAINED)
    workers = [start_worker(op, wait_started=False) for op in ("train", "convert", "infer")]
    dashboard = Dashboard(worker_env, tmp_path / "dashboard.log")
    try:
        for worker in workers:
            worker.wait_log("✅ RabbitMQ consumer started", timeout=120)
        output = tmp_path / "detections.png"
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1050})
            page.goto(dashboard.url + "/")
            page.wait_for_selector("#broker.on", timeout=30_000)
            watch_points(page)
            demo = subprocess.run(
                [*no_torch_cli("demo"), "--quick", "--pretrained", PRETRAINED, "--job-id", "demo1", "--timeout", "500",
                 "--output", str(output), "--dashboard-url", dashboard.url + "/"],
                cwd=REPO, env={**os.environ, **worker_env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                timeout=600,
            )
            assert demo.returncode == 0, demo.stderr[-4000:]
            page.wait_for_selector('tr[data-job="infer/demo1-detect"][data-state="completed"]', timeout=30_000)
            assert page.get_attribute('tr[data-job="train/demo1"]', "data-state") == "completed"
            assert page.get_attribute('tr[data-job="convert/demo1-onnx"]', "data-state") == "completed"
            assert points_seen(page) == [1, 2]  # the training curves grew one point per epoch, live
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-demo.png"), full_page=True)
    finally:
        dashboard.stop()

    assert "no worker is consuming" not in demo.stderr
    assert "uploaded the shapes dataset" in demo.stderr
    assert "datasets/shapes-demo/" in demo.stderr
    assert "epoch 2/2" in demo.stderr
    assert "training completed" in demo.stderr
    assert f"dashboard: {dashboard.url}/" in demo.stderr
    assert f"detections drawn: {output}" in demo.stderr
    summary = json.loads(demo.stdout)
    assert (storage / "datasets/shapes-demo/data.yaml").is_file()
    assert (storage / summary["training"]["model_path"]).is_file()
    (onnx,) = summary["conversion"]["artifacts"]
    assert onnx["format"] == "onnx"
    assert summary["inference"]["model_path"] == onnx["path"]
    assert summary["detections_png"] == str(output)
    assert summary["dashboard"] == dashboard.url + "/"

    picture = Image.open(output)
    assert picture.size == (tile_origin(len(INFER_SEEDS))[0], INFER_SIZE * SCALE + 2 * tile_origin(0)[1])
    shapes = found = 0
    for tile, (seed, image) in enumerate(zip(INFER_SEEDS, summary["images"], strict=True)):
        assert image["seed"] == seed
        for _, truth in draw_shapes_image(INFER_SIZE, seed)[1]:
            shapes += 1  # where a shape is, a box is (the class may be wrong after two epochs)
            hits = [d for d in image["detections"] if iou(truth, tuple(d["box"][k] for k in ("x1", "y1", "x2", "y2")))
                    >= 0.5]
            if hits:
                found += 1
                best = max(hits, key=lambda d: d["confidence"])
                assert edge_colour_share(picture, tile, best["box"], BOX_COLOURS[best["class_id"]]) >= 0.8, best
    assert shapes >= len(INFER_SEEDS), (found, shapes, summary["images"])
    assert found >= shapes / 2, (found, shapes, summary["images"])
