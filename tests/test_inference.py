"""Inference end to end: real broker, real SeaweedFS S3 (and local storage), the real
``ai-service worker infer`` process, a model trained on the generated shapes, on the CPU."""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest
from PIL import Image

from ai_service.config import Settings
from ai_service.shapes import Box, draw_shapes_image
from ai_service.storage import LocalStorage, S3Storage, Storage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.support.pngs import png_bomb, png_claiming
from tests.support.s3 import S3Server
from tests.support.shared import build_once

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 128
#: Every worker here logs at DEBUG (cache hits, batches).
BASE_ENV = {"LOG_LEVEL": "DEBUG"}


# --- images and requests -----------------------------------------------------------------


def shapes(seed: int) -> tuple[bytes, list[Box]]:
    """A new image of the training distribution (seeds far from the dataset's), as PNG."""
    image, truth = draw_shapes_image(IMGSZ, 900_000 + seed)
    return encode(image), truth


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def sample_images() -> list[tuple[str | None, bytes, list[Box]]]:
    """Eight new images: (storage key or None for inline, the bytes sent, the drawn shapes).

    Four are stored PNGs, three inline PNGs, one an inline JPEG.
    """
    out: list[tuple[str | None, bytes, list[Box]]] = []
    for i in range(8):
        raw, truth = shapes(i)
        if i == 7:
            raw = encode(Image.open(io.BytesIO(raw)), "JPEG")
        out.append((f"images/{i}.png" if i < 4 else None, raw, truth))
    return out


PARAMS = {"conf": 0.1, "iou": 0.7, "imgsz": IMGSZ, "max_det": 300, "classes": None}


def request(job_id: str, model: str, images: list[dict[str, str]], **params: Any) -> dict[str, Any]:
    return {"job_id": job_id, "model": {"path": model}, "images": images, "params": {**PARAMS, **params}}


# --- checking answers --------------------------------------------------------------------


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _xyxy(det: dict[str, Any]) -> tuple[float, float, float, float]:
    b = det["box"]
    return (b["x1"], b["y1"], b["x2"], b["y2"])


def assert_finds_shapes(done: dict[str, Any], truths: list[list[Box]], names: dict[int, str]) -> None:
    """Detections are well-formed, carry the model's class names and box the drawn shapes.

    The bar fits the session's briefly trained model: it boxes most shapes (62-76% at
    IoU >= 0.5 and conf >= 0.1 on 123 new shapes, 60 and 80 epochs) but tells circles from
    squares on new images little better than chance (50-58%), so class names are checked
    against the model's own answers instead: the service must return exactly what a
    direct predict call returns (``reference``), names included.
    """
    assert done["type"] == "inference_completed", done
    assert done["status"] == "completed", done
    assert len(done["results"]) == len(truths)
    boxed = total = 0
    for result, truth in zip(done["results"], truths, strict=True):
        assert (result["width"], result["height"]) == (IMGSZ, IMGSZ)
        dets = result["detections"]
        for det in dets:
            assert set(det) == {"class_id", "class_name", "confidence", "box"}
            assert names[det["class_id"]] == det["class_name"]
            assert 0 < det["confidence"] <= 1
            x1, y1, x2, y2 = _xyxy(det)
            assert 0 <= x1 < x2 <= IMGSZ
            assert 0 <= y1 < y2 <= IMGSZ
            if det["confidence"] >= 0.5:
                assert any(iou(box, (x1, y1, x2, y2)) >= 0.5 for _, box in truth), ("nothing there", det, truth)
        for _, box in truth:
            total += 1
            boxed += any(iou(box, _xyxy(d)) >= 0.5 for d in dets)
    assert boxed >= 0.5 * total, (boxed, total, done["results"])


def same_detections(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two answers for the same images agree within float tolerance."""
    assert len(a["results"]) == len(b["results"])
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert (ra["image"], ra["width"], ra["height"]) == (rb["image"], rb["width"], rb["height"])
        da = sorted(ra["detections"], key=lambda d: -d["confidence"])
        db = sorted(rb["detections"], key=lambda d: -d["confidence"])
        # detections right at the confidence threshold may flip; compare the confident ones
        da, db = ([d for d in ds if d["confidence"] >= 0.15] for ds in (da, db))
        assert len(da) == len(db), (ra, rb)
        for x, y in zip(da, db, strict=True):
            assert x["class_id"] == y["class_id"]
            assert x["confidence"] == pytest.approx(y["confidence"], abs=2e-3)
            for k in ("x1", "y1", "x2", "y2"):
                assert x["box"][k] == pytest.approx(y["box"][k], abs=0.5)


def answers(be: BE, job_ids: list[str], timeout: float = 120) -> dict[str, Received]:
    """The one answer of each job on infer_result_q (more than one fails the test)."""
    out: dict[str, Received] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(job_ids) and time.monotonic() < deadline:
        msg = be.get(be.settings.infer_result_queue)
        if msg is None:
            be.connection.sleep(0.05)
            continue
        job_id = msg.body["job_id"]
        assert job_id not in out, f"second answer for {job_id}"
        out[job_id] = msg
    assert set(out) == set(job_ids), f"missing answers: {set(job_ids) - set(out)}"
    return out


def worker_pid_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# --- models ------------------------------------------------------------------------------

_EXPORT = r"""
import importlib.util, io, json, shutil, sys
from pathlib import Path
from workers import yolo

src, out = Path(sys.argv[1]), Path(sys.argv[2])
yolo.prepare_ultralytics(out / "work")
import numpy as np
from PIL import Image
from tests.test_inference import IMGSZ, PARAMS, sample_images

shutil.copy(src, out / "shapes.pt")
files = {"pt": out / "shapes.pt"}
for fmt in ["onnx", "torchscript"] + (["openvino"] if importlib.util.find_spec("openvino") else []):
    files[fmt] = Path(yolo.safe_load_model(out / "shapes.pt").export(format=fmt, imgsz=IMGSZ))
import torch
ckpt = torch.load(out / "shapes.pt", map_location="cpu", weights_only=False)  # our own file
ckpt["model"].names = {0: "ring", 1: "box"}
torch.save(ckpt, out / "renamed.pt")

# What each format says when Ultralytics is called directly, image by image.
from ultralytics import YOLO
arrays = [np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))[:, :, ::-1])
          for _, raw, _ in sample_images()]
reference = {}
for fmt, path in files.items():
    model = yolo.safe_load_model(path) if fmt == "pt" else YOLO(str(path), task="detect")
    reference[fmt] = []
    for array in arrays:
        r = model.predict(array, verbose=False, device="cpu", **PARAMS)[0]
        reference[fmt].append([
            {"class_id": int(c), "class_name": r.names[int(c)], "confidence": float(p),
             "box": dict(zip(("x1", "y1", "x2", "y2"), b))}
            for b, p, c in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist())])
json.dump({"files": {k: str(v) for k, v in files.items()}, "reference": reference},
          open(out / "models.json", "w"))
"""


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, trained_model: dict[str, Any]) -> dict[str, Any]:
    """The trained model as .pt, .onnx, .torchscript (and OpenVINO when installed), a copy
    whose classes are named differently, and each format's direct-predict detections of
    :func:`sample_images`; built once per session, in a subprocess."""

    def build(target: Path) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-c", _EXPORT, trained_model["model"], str(target)], cwd=REPO,
                              timeout=600, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        data: dict[str, Any] = json.loads((target / "models.json").read_text())
        data["files"]["renamed"] = str(target / "renamed.pt")
        return data

    return build_once(tmp_path_factory, "inference-models", build)


def put_model(storage: Storage, models: dict[str, Any], name: str, key: str, *, recorded: bool = True) -> None:
    """Store an exported model; ``recorded``: with the provenance record a conversion job writes."""
    from ai_service.provenance import Provenance, describe_local

    path = Path(models["files"][name])
    if path.is_dir():
        storage.upload_dir(path, key)
    else:
        storage.upload_file(path, key)
    if recorded and name != "pt":
        size, sha = describe_local(path)
        Provenance(storage, prefix="jobs/").record(sha256=sha, fmt=name, key=key, size_bytes=size,
                                                   source_key="models/shapes.pt", source_sha256="",
                                                   options={}, job_id="test-export")


# --- units: images, the batcher and the cache, without a model -------------------------


def decode(raw: bytes, **limits: int) -> tuple[Any, int, int]:
    from workers.inference.images import decode_image

    return decode_image(raw, "images[0]", max_pixels=limits.get("max_pixels", 10**8),
                        pixels_left=limits.get("pixels_left", 10**8))


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("TIFF", "RGB"),
                                      ("BMP", "RGB"), ("GIF", "P"), ("PNG", "L"), ("PNG", "RGBA"),
                                      ("PNG", "I;16")])
def test_images_of_every_supported_format_and_mode_decode_to_bgr(fmt: str, mode: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    image = image.convert(mode) if mode != "I;16" else Image.new("I;16", (40, 30), 40000)
    array, width, height = decode(encode(image, fmt))
    assert (width, height) == (40, 30)
    assert array.shape == (30, 40, 3)
    assert str(array.dtype) == "uint8"
    if mode == "RGB" and fmt in ("PNG", "TIFF", "BMP"):
        assert tuple(array[0, 0]) == (50, 100, 200)  # BGR, as Ultralytics expects from numpy


def test_the_exif_orientation_is_applied_and_reported() -> None:
    image = Image.new("RGB", (40, 30), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    array, width, height = decode(buffer.getvalue())
    assert (width, height) == (30, 40)
    assert array.shape == (40, 30, 3)


@pytest.mark.parametrize(("raw", "limits", "words"), [
    (b"not an image" * 20, {}, "not an image in a supported format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", {}, "not an image in a supported format"),  # Ghostscript never runs
    (png_claiming(30000, 30000), {}, "900000000 pixels"),
    (png_claiming(5000, 5000), {"max_pixels": 10**7}, "5000x5000 is 25000000 pixels"),
    (png_claiming(100, 100), {"pixels_left": 9999}, "MAX_REQUEST_PIXELS"),
], ids=["garbage", "eps", "bomb", "over-max-pixels", "over-request-pixels"])
def test_images_are_refused_before_decoding(raw: bytes, limits: dict[str, int], words: str) -> None:
    from ai_service.errors import InvalidInput

    with pytest.raises(InvalidInput, match=words):
        decode(raw, **limits)


def test_truncated_and_corrupted_images_are_refused() -> None:
    from ai_service.errors import InvalidInput

    good = shapes(0)[0]
    for raw in (good[: len(good) // 2], good[:-20], good[:60] + b"\0" * 40 + good[100:]):
        with pytest.raises(InvalidInput, match="truncated or corrupt"):
            decode(raw)
    jpeg = encode(Image.open(io.BytesIO(good)), "JPEG")
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        decode(jpeg[: len(jpeg) // 2])


def test_inline_size_is_the_decoded_length() -> None:
    from workers.inference.images import inline_size

    for n in range(0, 40):
        assert inline_size(b64(b"x" * n)) == n


class FakeBoxes:
    def __init__(self, rows: list[tuple[float, float, float, float, float, float]]) -> None:
        import numpy as np

        data = np.array(rows, dtype=float).reshape(-1, 6)
        self.xyxy, self.conf, self.cls = data[:, :4], data[:, 4], data[:, 5]

    def __len__(self) -> int:
        return len(self.xyxy)


class FakeYolo:
    """Answers one detection per image whose x1 is the image's first pixel value;
    fails on an image whose first pixel is 255."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []

    def predict(self, images: list[Any], **kwargs: Any) -> list[Any]:
        from types import SimpleNamespace

        self.calls.append([image.shape for image in images])
        if any(int(image[0, 0, 0]) == 255 for image in images):
            raise RuntimeError("poisoned")
        return [SimpleNamespace(names={0: "thing"}, boxes=FakeBoxes([(float(image[0, 0, 0]), 0, 5, 5, 0.9, 0)]))
                for image in images]


def fake_engine(**kwargs: Any) -> Any:
    from types import SimpleNamespace

    from workers.inference.engine import Engine

    defaults = {"max_batch": 8, "window_s": 0.0, "cpu_threads": 1}
    return Engine(SimpleNamespace(type="test"), **{**defaults, **kwargs})  # type: ignore[arg-type]


def fake_job(model: Any, values: list[int], shape: tuple[int, int] = (8, 8), conf: float = 0.25) -> Any:
    from concurrent.futures import Future

    import numpy as np

    from workers.inference.engine import Job, Params

    images = [np.full((*shape, 3), v, dtype=np.uint8) for v in values]
    return Job(model, Params(conf, 0.7, 640, 300, None), images, Future())


def fake_model(key: str = "m.pt") -> Any:
    from workers.inference.cache import LoadedModel, ModelRef

    return LoadedModel(ModelRef(key, "pt", "v1", 1), FakeYolo(), Path("/nonexistent"), 1)


def test_queued_requests_for_the_same_model_and_params_run_as_one_batch_each_with_its_answer() -> None:
    engine = fake_engine(max_batch=8)
    model, other = fake_model(), fake_model("other.pt")
    jobs = [fake_job(model, [1]), fake_job(model, [2, 3]), fake_job(other, [4]), fake_job(model, [5], conf=0.5),
            fake_job(model, [6])]
    for job in jobs:
        engine.enter()
        engine.submit(job)
    engine.start()
    outcomes = [job.future.result(5) for job in jobs]
    assert [[d.box.x1 for d in per_image] for o in outcomes for per_image in o.detections] == \
        [[1], [2], [3], [4], [5], [6]]
    assert model.yolo.calls == [[(8, 8, 3)] * 4, [(8, 8, 3)]]  # 1, 2, 3, 6 together; conf 0.5 alone
    assert other.yolo.calls == [[(8, 8, 3)]]
    assert (outcomes[0].batch_requests, outcomes[0].batch_images) == (3, 4)


def test_images_are_grouped_by_shape_and_chunked_to_max_batch_and_batching_can_be_off() -> None:
    engine = fake_engine(max_batch=4)
    engine.start()
    model = fake_model()
    job = fake_job(model, [1] * 6)
    job.images += fake_job(model, [2] * 4, shape=(8, 6)).images
    engine.enter()
    outcome = engine.submit(job).result(5)
    assert [len(c) for c in model.yolo.calls] == [4, 2, 4]
    assert [d[0].box.x1 for d in outcome.detections] == [1] * 6 + [2] * 4
    off = fake_engine(max_batch=1)
    jobs = [fake_job(model, [7]), fake_job(model, [8])]
    for j in jobs:
        off.enter()
        off.submit(j)
    off.start()
    assert [j.future.result(5).batch_requests for j in jobs] == [1, 1]


def test_the_batcher_waits_only_for_requests_being_prepared() -> None:
    engine = fake_engine(max_batch=8, window_s=2.0)
    engine.start()
    model = fake_model()
    started = time.monotonic()
    engine.enter()
    assert engine.submit(fake_job(model, [1])).result(5).batch_requests == 1
    assert time.monotonic() - started < 1.0, "a lone request does not wait for the window"
    engine.enter()
    engine.enter()
    first = engine.submit(fake_job(model, [2]))
    time.sleep(0.2)  # the second handler is still decoding
    second = engine.submit(fake_job(model, [3]))
    assert first.result(5).batch_requests == 2
    assert second.result(5).batch_requests == 2
    engine.enter()
    engine.enter()
    lone = engine.submit(fake_job(model, [4]))
    time.sleep(0.2)
    engine.leave()  # the other request failed while decoding: no need to wait longer
    assert lone.result(1.5).batch_requests == 1


def test_a_failing_request_in_a_batch_fails_alone() -> None:
    from workers.inference.engine import InferenceError

    engine = fake_engine(max_batch=8)
    model = fake_model()
    jobs = [fake_job(model, [1]), fake_job(model, [255]), fake_job(model, [3])]
    for job in jobs:
        engine.enter()
        engine.submit(job)
    engine.start()
    assert jobs[0].future.result(5).detections[0][0].box.x1 == 1
    assert jobs[2].future.result(5).detections[0][0].box.x1 == 3
    with pytest.raises(InferenceError, match="RuntimeError"):
        jobs[1].future.result(5)


def test_the_model_cache_is_lru_by_count_and_memory_and_reloads_changed_objects(tmp_path: Path) -> None:
    from ai_service.errors import ObjectNotFound
    from ai_service.metrics import Metrics
    from workers.inference.cache import ModelCache

    storage = LocalStorage(tmp_path / "storage")
    for name in ("a", "b", "c"):
        storage.write_bytes(f"models/{name}.pt", b"x" * 100)
    storage.write_bytes("models/ov_openvino_model/model.xml", b"<xml/>")
    storage.write_bytes("models/ov_openvino_model/model.bin", b"\0" * 10)
    loads: list[tuple[str, str]] = []
    gate = threading.Event()

    def loader(path: Path, ref: Any, imgsz: int) -> Any:
        gate.wait(5)
        loads.append((ref.key, path.name))
        if ref.key == "models/c.pt" and path.read_bytes() == b"bad":
            raise RuntimeError("cannot load")
        return object()

    engine = fake_engine()
    engine.start()
    log = logging.getLogger("test")
    metrics = Metrics()
    cache = ModelCache(storage, tmp_path / "models", engine, max_models=2, max_bytes=10_000, loader=loader,
                       metrics=metrics)
    # concurrent first requests for one model: one download, one load
    threads = [threading.Thread(target=cache.get, args=("models/a.pt", 640, log)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert loads == [("models/a.pt", "model.pt")]
    assert cache.downloads == 1
    first = cache.get("models/a.pt", 640, log)
    cache.get("models/b.pt", 640, log)
    assert cache.get("models/a.pt", 640, log) is first  # a is now the most recently used
    cache.get("models/ov_openvino_model/", 640, log)  # evicts b (count bound)
    assert ("models/ov_openvino_model/", "model_openvino_model") in loads
    assert cache.downloads == 3
    cache.get("models/b.pt", 640, log)
    assert cache.downloads == 4
    time.sleep(0.01)
    storage.write_bytes("models/a.pt", b"y" * 100)  # a new version
    assert cache.get("models/a.pt", 640, log) is not first
    assert cache.downloads == 5
    counted = {r: metrics.registry.get_sample_value("ai_model_cache_total", {"result": r}) for r in ("hit", "miss")}
    assert counted == {"hit": 5.0, "miss": 5.0}  # 3 waiting handlers and 2 gets found it cached
    assert len(list((tmp_path / "models").iterdir())) == 2, "evicted models leave no files"
    # memory bound: 3 x 400 estimated bytes > 1000 keeps fewer models
    small = ModelCache(storage, tmp_path / "small", engine, max_models=8, max_bytes=1000, loader=loader)
    for name in ("a", "b"):
        small.get(f"models/{name}.pt", 640, log)
    assert len(small._entries) == 2
    small.get("models/c.pt", 640, log)
    assert len(small._entries) == 2
    assert small.nbytes <= 1000
    # failures are not cached and leave no files
    storage.write_bytes("models/c.pt", b"bad")
    with pytest.raises(RuntimeError):
        cache.get("models/c.pt", 640, log)
    with pytest.raises(RuntimeError):
        cache.get("models/c.pt", 640, log)
    with pytest.raises(ObjectNotFound):
        cache.get("models/nope.pt", 640, log)
    assert len(list((tmp_path / "models").iterdir())) == 2


def test_the_model_cache_trusts_a_version_for_its_ttl_then_checks_storage_again(tmp_path: Path) -> None:
    from ai_service.errors import ObjectNotFound
    from workers.inference.cache import ModelCache

    storage = LocalStorage(tmp_path / "storage")
    storage.write_bytes("models/a.pt", b"x" * 100)
    loaded: list[bytes] = []

    def loader(path: Path, ref: Any, imgsz: int) -> Any:
        loaded.append(path.read_bytes())
        return object()

    engine = fake_engine()
    engine.start()
    log = logging.getLogger("test")
    cache = ModelCache(storage, tmp_path / "models", engine, max_models=2, max_bytes=10_000, loader=loader,
                       version_ttl=3.0)  # long enough for 22 gets on a loaded machine
    first = cache.get("models/a.pt", 640, log)
    for _ in range(20):
        assert cache.get("models/a.pt", 640, log) is first
    assert cache.version_checks == 1, "one stat for 21 requests within the TTL"
    storage.write_bytes("models/a.pt", b"y" * 100)  # replaced: still the old version until the TTL ends
    assert cache.get("models/a.pt", 640, log) is first
    time.sleep(3.1)
    second = cache.get("models/a.pt", 640, log)
    assert second is not first
    assert loaded == [b"x" * 100, b"y" * 100]
    assert cache.version_checks == 2
    # a missing model is not remembered: once uploaded, the next request finds it
    with pytest.raises(ObjectNotFound):
        cache.get("models/late.pt", 640, log)
    storage.write_bytes("models/late.pt", b"z" * 100)
    assert cache.get("models/late.pt", 640, log).ref.key == "models/late.pt"
    # TTL 0: every request checks storage, as before the TTL existed
    every = ModelCache(storage, tmp_path / "every", engine, max_models=2, max_bytes=10_000, loader=loader)
    for _ in range(3):
        every.get("models/a.pt", 640, log)
    assert every.version_checks == 3


# --- end to end: the worker process ------------------------------------------------------

NAMES = {0: "circle", 1: "square"}


def test_from_s3_every_format_finds_the_shapes_and_models_are_cached(
    be: BE, start_worker: WorkerFactory, s3_server: S3Server, s3_bucket: str, models: dict[str, Any],
) -> None:
    storage = S3Storage(s3_bucket, client=s3_server.client())
    keys = {"pt": "models/shapes.pt", "onnx": "models/exports/shapes.onnx",
            "torchscript": "models/exports/shapes.torchscript", "openvino": "models/exports/shapes_openvino_model/"}
    formats = {fmt: key for fmt, key in keys.items() if fmt in models["files"]}
    for fmt, key in formats.items():
        put_model(storage, models, fmt, key)
    samples = sample_images()
    images: list[dict[str, str]] = []
    for key, raw, _ in samples:
        if key is not None:
            storage.write_bytes(key, raw)
        images.append({"path": key} if key is not None else {"data": b64(raw)})
    truths = [truth for _, _, truth in samples]
    worker = start_worker("infer", env={**BASE_ENV, **s3_server.env(), "STORAGE_BACKEND": "s3",
                                        "S3_BUCKET": s3_bucket, "MODEL_CACHE_SIZE": "8", "MODEL_VERSION_TTL": "1"})
    for fmt, key in formats.items():
        be.send(be.settings.infer_request_queue, request(f"shapes-{fmt}", key, images))
    got = answers(be, [f"shapes-{fmt}" for fmt in formats])
    for fmt, key in formats.items():
        msg = got[f"shapes-{fmt}"]
        done = msg.body
        assert_finds_shapes(done, truths, NAMES)
        expected = {"type": "inference_completed", "status": "completed", "results": done["results"],
                    "inference_time_ms": done["inference_time_ms"], "job_id": f"shapes-{fmt}", "model_path": key,
                    "timestamp": done["timestamp"]}
        assert done == expected
        assert done["inference_time_ms"] > 0
        assert [r["image"] for r in done["results"]] == [key or str(i) for i, (key, _, _) in enumerate(samples)]
        # exactly what the model says when called directly
        same_detections(done, {"results": [{**r, "detections": ref} for r, ref
                                           in zip(done["results"], models["reference"][fmt], strict=True)]})
        assert msg.routing_key == f"infer.result.shapes-{fmt}"
        props = msg.properties
        assert (props.correlation_id, props.type) == (f"shapes-{fmt}", "inference_completed")
        assert props.app_id == "ai-service"
        assert props.delivery_mode == 2
        assert props.message_id
        assert props.content_type == "application/json"
    downloads = worker.log().count("Downloading model")
    assert downloads == len(formats)

    # Cache: the same model again is not downloaded again.
    be.send(be.settings.infer_request_queue, request("again", formats["pt"], images[:1]))
    again = answers(be, ["again"])["again"].body
    # (alone, not in a predict of 8: the same detections up to float rounding in the 5th decimal)
    same_detections(again, {"results": got["shapes-pt"].body["results"][:1]})
    assert worker.log().count("Downloading model") == downloads
    assert "[again] Model models/shapes.pt (version" in worker.log()

    # Replacing the object in storage: once the version's TTL (MODEL_VERSION_TTL=1) is over,
    # the next request uses the new model, loaded once.
    put_model(storage, models, "renamed", formats["pt"])
    time.sleep(1.2)
    for job_id in ("renamed1", "renamed2"):
        be.send(be.settings.infer_request_queue, request(job_id, formats["pt"], images))
        done = answers(be, [job_id])[job_id].body
        assert_finds_shapes(done, truths, {0: "ring", 1: "box"})
    assert worker.log().count("Downloading model") == downloads + 1
    assert "Evicted model models/shapes.pt" in worker.log()


def test_an_answer_over_max_message_bytes_becomes_a_small_failed_and_the_next_answers_go_on(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    put_model(storage, models, "pt", "models/shapes.pt")
    good, _ = shapes(0)
    storage.write_bytes("images/one.png", good)
    worker = start_worker("infer", env={**BASE_ENV, "MAX_MESSAGE_BYTES": "20000"})
    many = [{"path": "images/one.png"}] * 48
    be.send(be.settings.infer_request_queue, request("huge", "models/shapes.pt", many, conf=0.001, max_det=1000))
    for i in range(3):
        be.send(be.settings.infer_request_queue, request(f"after{i}", "models/shapes.pt", many[:1]))
    got = answers(be, ["huge", "after0", "after1", "after2"])
    huge = got["huge"].body
    assert huge["type"] == "inference_failed", huge
    assert huge["error_code"] == "inference_error", huge
    assert "20,000-byte limit" in huge["error_message"]
    assert "max_det" in huge["error_message"]
    assert len(json.dumps(huge)) < 2000
    assert [got[f"after{i}"].body["type"] for i in range(3)] == ["inference_completed"] * 3
    assert worker.alive
    assert "refused" in worker.log().lower()


def test_exported_models_load_only_with_the_services_own_provenance_record(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    # (records are by sha256: the same bytes stored elsewhere are the same artifact, so the
    # foreign file is one format this test never records)
    put_model(storage, models, "torchscript", "models/foreign.torchscript", recorded=False)
    put_model(storage, models, "onnx", "models/ours.onnx")
    tampered = bytearray(Path(models["files"]["onnx"]).read_bytes())
    tampered[-1] ^= 1  # one flipped byte: not the file the service exported
    storage.write_bytes("models/tampered.onnx", bytes(tampered))
    good, _ = shapes(0)
    image = [{"data": b64(good)}]
    worker = start_worker("infer", env=BASE_ENV)
    for job_id, key in (("foreign", "models/foreign.torchscript"), ("oursonnx", "models/ours.onnx"),
                        ("tampered", "models/tampered.onnx")):
        be.send(be.settings.infer_request_queue, request(job_id, key, image))
    got = answers(be, ["foreign", "oursonnx", "tampered"])
    for refused in ("foreign", "tampered"):
        body = got[refused].body
        assert body["type"] == "inference_failed", body
        assert body["error_code"] == "invalid_request", body
        assert "TRUST_EXTERNAL_MODELS" in body["error_message"]
        assert "provenance" in body["error_message"]
    assert got["oursonnx"].body["type"] == "inference_completed", got["oursonnx"].body
    log = worker.log()
    assert "Model models/ours.onnx loaded" in log
    assert "Model models/foreign.torchscript loaded" not in log
    worker.stop()

    trusting = start_worker("infer", env={**BASE_ENV, "TRUST_EXTERNAL_MODELS": "true"})
    be.send(be.settings.infer_request_queue, request("trusted", "models/foreign.torchscript", image))
    assert answers(be, ["trusted"])["trusted"].body["type"] == "inference_completed"
    assert trusting.alive


class RpcClient:
    """A caller with its own connection and exclusive reply queue (what an RPC BE does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(host=settings.rabbitmq_host, port=settings.rabbitmq_port, heartbeat=0))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_to = str(self.channel.queue_declare("", exclusive=True).method.queue)
        self.sent: dict[str, str] = {}  # correlation_id -> job_id
        self.got: list[tuple[str | None, dict[str, Any]]] = []

    def call(self, body: dict[str, Any]) -> None:
        correlation_id = uuid.uuid4().hex
        self.sent[correlation_id] = body["job_id"]
        self.channel.basic_publish("", self.settings.infer_request_queue, json.dumps(body).encode(),
                                   pika.BasicProperties(reply_to=self.reply_to, correlation_id=correlation_id,
                                                        content_type="application/json"))

    def collect(self, timeout: float, linger: float) -> None:
        """Read replies until all came (or ``timeout``), then ``linger`` more for duplicates."""
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < (quiet_until or deadline):
            method, props, body = self.channel.basic_get(self.reply_to, auto_ack=True)
            if method is None:
                self.connection.sleep(0.02)
            else:
                self.got.append((props.correlation_id, json.loads(body)))
            if quiet_until is None and len(self.got) >= len(self.sent):
                quiet_until = time.monotonic() + linger

    def close(self) -> None:
        self.connection.close()


def test_rpc_50_concurrent_requests_are_each_answered_once_to_their_caller(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],
) -> None:
    put_model(LocalStorage(Path(worker_env["STORAGE_DIR"])), models, "pt", "models/shapes.pt")
    worker = start_worker("infer", env={**BASE_ENV, "INFER_PREFETCH": "16"})
    clients = [RpcClient(be.settings) for _ in range(5)]
    images = [b64(shapes(i)[0]) for i in range(10)]
    barrier = threading.Barrier(len(clients))
    errors: list[BaseException] = []

    def run(n: int, client: RpcClient) -> None:
        try:
            barrier.wait()
            for i in range(10):
                client.call(request(f"rpc-{n}-{i}", "models/shapes.pt", [{"data": images[i]}]))
            client.collect(timeout=120, linger=1.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for client in clients:
        client.close()
    assert not errors, errors
    by_image: dict[int, dict[str, Any]] = {}
    for client in clients:
        assert len(client.got) == 10, "each request answered exactly once"
        assert sorted(c or "" for c, _ in client.got) == sorted(client.sent), "to the caller that sent it"
        for correlation_id, body in client.got:
            assert correlation_id is not None
            assert body["job_id"] == client.sent[correlation_id]
            assert body["type"] == "inference_completed"
            index = int(body["job_id"].rsplit("-", 1)[1])
            if index in by_image:  # the same image gives the same answer whoever asks
                same_detections(by_image[index], body)
            by_image[index] = body
    assert be.drain(be.settings.infer_result_queue) == [], "RPC answers go only to reply_to"
    assert be.count(be.settings.infer_request_queue) == 0
    assert "Batch of" in worker.log(), "50 requests in flight were batched"


def test_answers_are_the_same_with_batching_on_and_off(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any],
) -> None:
    put_model(LocalStorage(Path(worker_env["STORAGE_DIR"])), models, "pt", "models/shapes.pt")
    samples = [shapes(i) for i in range(12)]
    odd = Image.open(io.BytesIO(samples[0][0])).crop((0, 0, 128, 96))  # another shape in the same batch
    bodies = [request(f"b{i}", "models/shapes.pt", [{"data": b64(raw)}]) for i, (raw, _) in enumerate(samples)]
    bodies.append(request("multi", "models/shapes.pt", [{"data": b64(raw)} for raw, _ in samples[:3]]
                          + [{"data": b64(encode(odd))}]))
    job_ids = [b["job_id"] for b in bodies]
    runs: dict[str, dict[str, Received]] = {}
    for mode, env in (("on", {"MAX_BATCH": "8", "BATCH_WINDOW_MS": "50"}), ("off", {"MAX_BATCH": "1"})):
        worker = start_worker("infer", env={**BASE_ENV, "INFER_PREFETCH": "16", **env}, name=f"batch-{mode}")
        be.send(be.settings.infer_request_queue, request("warm", "models/shapes.pt", [{"data": b64(samples[0][0])}]))
        answers(be, ["warm"])
        for body in bodies:
            be.send(be.settings.infer_request_queue, body)
        runs[mode] = answers(be, job_ids)
        batched = "Batch of" in worker.new_log()
        assert batched == (mode == "on"), worker.new_log()[-3000:]
        worker.stop()
    for job_id in job_ids:
        same_detections(runs["on"][job_id].body, runs["off"][job_id].body)
    multi = runs["on"]["multi"].body["results"]
    assert [(r["width"], r["height"]) for r in multi] == [(128, 128)] * 3 + [(128, 96)]


def test_each_bad_input_fails_alone_and_the_worker_stays_small(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Any], tmp_path: Path,
) -> None:
    root = Path(worker_env["STORAGE_DIR"])
    storage = LocalStorage(root)
    put_model(storage, models, "pt", "models/shapes.pt")
    storage.write_bytes("images/bomb.png", png_bomb())
    storage.write_bytes("models/shapes.tflite", b"not really")
    storage.write_bytes("models/broken.onnx", b"\x08\x07garbage" * 100)
    marker = tmp_path / "marker"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # a pickle that runs a shell command
    storage.write_bytes("models/evil.pt", evil)
    worker = start_worker("infer", env={**BASE_ENV, "INFER_PREFETCH": "16", "MAX_IMAGES_PER_REQUEST": "4",
                                        "MAX_INLINE_IMAGE_BYTES": "100000", "BATCH_WINDOW_MS": "50"})
    good, _ = shapes(0)
    be.send(be.settings.infer_request_queue, request("warm", "models/shapes.pt", [{"data": b64(good)}]))
    warm = answers(be, ["warm"])["warm"].body
    rss_before = worker_pid_rss_mb(worker.proc.pid) if worker.proc else 0.0
    image = {"data": b64(good)}
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        ("good1", request("good1", "models/shapes.pt", [image]), None),
        ("garbage", request("garbage", "models/shapes.pt", [image, {"data": b64(b"not an image" * 20)}]),
         "invalid_request"),
        ("truncated", request("truncated", "models/shapes.pt", [{"data": b64(good[: len(good) // 2])}]),
         "invalid_request"),
        ("good2", request("good2", "models/shapes.pt", [image, image]), None),
        ("bombhdr", request("bombhdr", "models/shapes.pt", [{"data": b64(png_claiming(30000, 30000))}]),
         "invalid_request"),
        ("bomb", request("bomb", "models/shapes.pt", [{"path": "images/bomb.png"}]), "invalid_request"),
        ("toomany", request("toomany", "models/shapes.pt", [image] * 5), "invalid_request"),
        ("toobig", request("toobig", "models/shapes.pt", [{"data": b64(b"\0" * 150_000)}]), "invalid_request"),
        ("nomodel", request("nomodel", "models/absent.pt", [image]), "model_not_found"),
        ("noimage", request("noimage", "models/shapes.pt", [{"path": "images/absent.png"}]), "invalid_request"),
        ("tflite", request("tflite", "models/shapes.tflite", [image]), "unsupported_format"),
        ("broken", request("broken", "models/broken.onnx", [image]), "invalid_request"),
        ("evil", request("evil", "models/evil.pt", [image]), "invalid_request"),
        ("good3", request("good3", "models/shapes.pt", [image]), None),
    ]
    for _, body, _ in cases:
        be.send(be.settings.infer_request_queue, body)
    got = answers(be, [job_id for job_id, _, _ in cases])
    for job_id, _, code in cases:
        body = got[job_id].body
        if code is None:
            assert body["type"] == "inference_completed", body
            # the warm-up's detections, up to float rounding (a predict of 1 image vs a batch)
            same_detections(body, {"results": [{**r, "detections": warm["results"][0]["detections"]}
                                               for r in body["results"]]})
        else:
            assert body["type"] == "inference_failed", body
            assert body["status"] == "failed", body
            assert body["error_code"] == code, body
            assert body["error_message"]
            assert "Traceback" not in body["error_message"]
    messages = {job_id: got[job_id].body.get("error_message", "") for job_id, _, _ in cases}
    assert "images[1]" in messages["garbage"]
    assert "truncated" in messages["truncated"]
    for bomb in ("bombhdr", "bomb"):
        assert "900000000 pixels" in messages[bomb]
        assert "MAX_IMAGE_PIXELS" in messages[bomb]
    assert "MAX_IMAGES_PER_REQUEST" in messages["toomany"]
    assert "MAX_INLINE_IMAGE_BYTES" in messages["toobig"]
    assert "images/absent.png" in messages["noimage"]
    assert "models/absent.pt" in messages["nomodel"]
    assert not marker.exists(), "the malicious pickle ran"
    assert worker.alive
    assert worker.proc is not None
    rss = worker_pid_rss_mb(worker.proc.pid)
    assert rss < 2500, (rss_before, rss)
    assert rss < rss_before + 600, (rss_before, rss)
    # Invalid requests are dead-lettered; the worker goes on.
    assert be.wait_count(f"{be.settings.infer_request_queue}.dlq", 1) >= 1
    be.send(be.settings.infer_request_queue, request("after", "models/shapes.pt", [image]))
    assert answers(be, ["after"])["after"].body["type"] == "inference_completed"


def test_the_http_route_finds_the_inference_state_by_its_type_and_is_not_ready_before_setup(tmp_path: Path) -> None:
    from ai_service.http.infer import InferEndpoint
    from ai_service.messages import InferenceCompleted, InferenceRequest
    from ai_service.operation import JobContext, Resources
    from workers.conversion.formats import ConversionState
    from workers.inference.service import InferenceState

    class Service:
        """Stands in for InferenceService: answers every request with no detections."""

        def __init__(self) -> None:
            self.seen: list[str] = []

        def handle(self, request: InferenceRequest, ctx: JobContext) -> None:
            self.seen.append(request.job_id)
            ctx.result(InferenceCompleted(job_id=request.job_id, model_path=request.model.path, results=[],
                                          inference_time_ms=1.0))

    settings = Settings.from_env({"WORK_DIR": str(tmp_path)})
    resources = Resources(settings=settings)
    endpoint = InferEndpoint(settings, resources)
    body = json.dumps({"job_id": "typed-1", "model": {"path": "models/m.pt"},
                       "images": [{"path": "images/a.png"}]}).encode()
    status, raw = endpoint.run(body)
    assert (status, json.loads(raw)["type"]) == (503, "inference_failed")  # NotReady: no state yet
    resources.state = ConversionState(formats={})  # another operation's state answers nothing
    assert endpoint.run(body)[0] == 503
    assert resources.answerer() is None
    service = Service()
    resources.state = InferenceState(service)  # type: ignore[arg-type]
    status, raw = endpoint.run(body)
    assert (status, json.loads(raw)["type"], service.seen) == (200, "inference_completed", ["typed-1"])
    assert resources.state_as(InferenceState) is resources.state
    assert resources.state_as(ConversionState) is None
