"""Inference end to end: real broker, real SeaweedFS S3 (and local storage), the real
``ai-service worker infer`` process, a model trained on the generated shapes, on the CPU."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
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


def request(job_id: str, model: str, images: list[dict[str, str]], **params: Any) -> dict[str, Any]:
    return {"job_id": job_id, "model": {"path": model}, "images": images,
            "params": {"conf": 0.25, "iou": 0.7, "imgsz": IMGSZ, "max_det": 300, "classes": None, **params}}


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A real, complete 1-bit PNG of ``width x height`` blank pixels (~100 KB, 900 MP)."""
    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


# --- checking answers --------------------------------------------------------------------


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(result: dict[str, Any], truth: list[Box], names: dict[int, str]) -> tuple[int, int]:
    """(drawn shapes found with the right class and IoU >= 0.6, confident detections of nothing)."""
    found, used = 0, set()
    dets = result["detections"]
    for cls, box in truth:
        for i, det in enumerate(dets):
            b = det["box"]
            overlap = iou(box, (b["x1"], b["y1"], b["x2"], b["y2"]))
            if i not in used and det["class_name"] == names[cls] and overlap >= 0.6:
                used.add(i)
                found += 1
                break
    false = sum(1 for i, det in enumerate(dets) if i not in used and det["confidence"] >= 0.5)
    return found, false


def assert_finds_shapes(done: dict[str, Any], truths: list[list[Box]], names: dict[int, str]) -> None:
    assert done["type"] == "inference_completed" and done["status"] == "completed", done
    assert len(done["results"]) == len(truths)
    found = false = total = 0
    for result, truth in zip(done["results"], truths, strict=True):
        assert (result["width"], result["height"]) == (IMGSZ, IMGSZ)
        for det in result["detections"]:
            assert set(det) == {"class_id", "class_name", "confidence", "box"}
            assert names[det["class_id"]] == det["class_name"] and 0 < det["confidence"] <= 1
            b = det["box"]
            assert 0 <= b["x1"] < b["x2"] <= IMGSZ and 0 <= b["y1"] < b["y2"] <= IMGSZ
        f, x = score(result, truth, names)
        found, false, total = found + f, false + x, total + len(truth)
    assert found >= 0.85 * total and false <= 1, (found, total, false, done["results"])


def same_detections(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two answers for the same images agree within float tolerance."""
    assert len(a["results"]) == len(b["results"])
    for ra, rb in zip(a["results"], b["results"], strict=True):
        assert (ra["image"], ra["width"], ra["height"]) == (rb["image"], rb["width"], rb["height"])
        da = sorted(ra["detections"], key=lambda d: -d["confidence"])
        db = sorted(rb["detections"], key=lambda d: -d["confidence"])
        # detections right at the confidence threshold may flip; compare the confident ones
        da, db = ([d for d in ds if d["confidence"] >= 0.3] for ds in (da, db))
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
import importlib.util, shutil, sys
from pathlib import Path
from workers import yolo

src, out = Path(sys.argv[1]), Path(sys.argv[2])
yolo.prepare_ultralytics(out / "work")
shutil.copy(src, out / "shapes.pt")
model = yolo.safe_load_model(out / "shapes.pt")
model.export(format="onnx", imgsz=128)
model = yolo.safe_load_model(out / "shapes.pt")
model.export(format="torchscript", imgsz=128)
if importlib.util.find_spec("openvino") is not None:
    yolo.safe_load_model(out / "shapes.pt").export(format="openvino", imgsz=128)
import torch
ckpt = torch.load(out / "shapes.pt", map_location="cpu", weights_only=False)  # our own file
ckpt["model"].names = {0: "ring", 1: "box"}
torch.save(ckpt, out / "renamed.pt")
"""


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, trained_model: dict[str, Any]) -> dict[str, Path]:
    """The trained model as .pt, .onnx, .torchscript (and OpenVINO when installed), and a
    copy whose classes are named differently; exported once per session, in a subprocess."""

    def build(target: Path) -> dict[str, Any]:
        subprocess.run([sys.executable, "-c", _EXPORT, trained_model["model"], str(target)], cwd=REPO,
                       check=True, timeout=600, capture_output=True)
        found = {"pt": target / "shapes.pt", "onnx": target / "shapes.onnx",
                 "torchscript": target / "shapes.torchscript", "renamed": target / "renamed.pt",
                 "openvino": target / "shapes_openvino_model"}
        return {k: str(v) for k, v in found.items() if v.exists()}

    return {k: Path(v) for k, v in build_once(tmp_path_factory, "inference-models", build).items()}


def put_model(storage: Storage, path: Path, key: str) -> None:
    if path.is_dir():
        storage.upload_dir(path, key)
    else:
        storage.upload_file(path, key)


# --- tests -------------------------------------------------------------------------------

NAMES = {0: "circle", 1: "square"}


def test_from_s3_every_format_finds_the_shapes_and_models_are_cached(
    be: BE, start_worker: WorkerFactory, s3_server: S3Server, s3_bucket: str, models: dict[str, Path],
) -> None:
    storage = S3Storage(s3_bucket, client=s3_server.client())
    formats = {"pt": "models/shapes.pt", "onnx": "models/exports/shapes.onnx",
               "torchscript": "models/exports/shapes.torchscript"}
    if "openvino" in models:
        formats["openvino"] = "models/exports/shapes_openvino_model/"
    for fmt, key in formats.items():
        put_model(storage, models[fmt], key)
    images, truths = [], []
    for i in range(6):
        raw, truth = shapes(i)
        truths.append(truth)
        if i < 3:
            storage.write_bytes(f"images/{i}.png", raw)
            images.append({"path": f"images/{i}.png"})
        else:  # inline, one of them as JPEG
            image = Image.open(io.BytesIO(raw))
            images.append({"data": b64(encode(image, "JPEG") if i == 5 else raw)})
    worker = start_worker("infer", env={**BASE_ENV, **s3_server.env(), "STORAGE_BACKEND": "s3",
                                        "S3_BUCKET": s3_bucket, "MODEL_CACHE_SIZE": "8"})
    for fmt, key in formats.items():
        be.send(be.settings.infer_request_queue, request(f"shapes-{fmt}", key, images))
    got = answers(be, [f"shapes-{fmt}" for fmt in formats])
    for fmt, key in formats.items():
        msg = got[f"shapes-{fmt}"]
        done = msg.body
        assert_finds_shapes(done, truths, NAMES)
        assert done["model_path"] == key and done["inference_time_ms"] > 0
        assert [r["image"] for r in done["results"]] == ["images/0.png", "images/1.png", "images/2.png", "3", "4", "5"]
        assert msg.routing_key == f"infer.result.shapes-{fmt}"
        props = msg.properties
        assert (props.correlation_id, props.type) == (f"shapes-{fmt}", "inference_completed")
        assert props.app_id == "ai-service"
        assert props.delivery_mode == 2 and props.message_id and props.content_type == "application/json"
    same_detections(got["shapes-pt"].body, got["shapes-onnx"].body)
    downloads = worker.log().count("Downloading model")
    assert downloads == len(formats)

    # Cache: the same model again is not downloaded again.
    be.send(be.settings.infer_request_queue, request("again", formats["pt"], images[:1]))
    again = answers(be, ["again"])["again"].body
    assert again["results"][0] == got["shapes-pt"].body["results"][0]
    assert worker.log().count("Downloading model") == downloads
    assert "[again] Model models/shapes.pt (version" in worker.log()

    # Replacing the object in storage: the next request uses the new model, once.
    put_model(storage, models["renamed"], formats["pt"])
    for job_id in ("renamed1", "renamed2"):
        be.send(be.settings.infer_request_queue, request(job_id, formats["pt"], images[:3]))
        done = answers(be, [job_id])[job_id].body
        assert_finds_shapes(done, truths[:3], {0: "ring", 1: "box"})
    assert worker.log().count("Downloading model") == downloads + 1
    assert "Evicted model models/shapes.pt" in worker.log()


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
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Path],
) -> None:
    put_model(LocalStorage(Path(worker_env["STORAGE_DIR"])), models["pt"], "models/shapes.pt")
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
            assert correlation_id is not None and body["job_id"] == client.sent[correlation_id]
            assert body["type"] == "inference_completed"
            index = int(body["job_id"].rsplit("-", 1)[1])
            if index in by_image:  # the same image gives the same answer whoever asks
                same_detections(by_image[index], body)
            by_image[index] = body
    assert be.drain(be.settings.infer_result_queue) == [], "RPC answers go only to reply_to"
    assert be.count(be.settings.infer_request_queue) == 0
    assert "Batch of" in worker.log(), "50 requests in flight were batched"


def test_answers_are_the_same_with_batching_on_and_off(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Path],
) -> None:
    put_model(LocalStorage(Path(worker_env["STORAGE_DIR"])), models["pt"], "models/shapes.pt")
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
    for i, (_, truth) in enumerate(samples):
        assert score(runs["on"][f"b{i}"].body["results"][0], truth, NAMES)[0] >= len(truth) - 1
    multi = runs["on"]["multi"].body["results"]
    assert [(r["width"], r["height"]) for r in multi] == [(128, 128)] * 3 + [(128, 96)]


def test_each_bad_input_fails_alone_and_the_worker_stays_small(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], models: dict[str, Path], tmp_path: Path,
) -> None:
    root = Path(worker_env["STORAGE_DIR"])
    storage = LocalStorage(root)
    put_model(storage, models["pt"], "models/shapes.pt")
    storage.write_bytes("images/bomb.png", png_bomb())
    storage.write_bytes("models/shapes.tflite", b"not really")
    storage.write_bytes("models/broken.onnx", b"\x08\x07garbage" * 100)
    marker = tmp_path / "marker"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # a pickle that runs a shell command
    storage.write_bytes("models/evil.pt", evil)
    worker = start_worker("infer", env={**BASE_ENV, "INFER_PREFETCH": "16", "MAX_IMAGES": "4",
                                        "MAX_INLINE_IMAGE_BYTES": "100000", "BATCH_WINDOW_MS": "50"})
    good, truth = shapes(0)
    be.send(be.settings.infer_request_queue, request("warm", "models/shapes.pt", [{"data": b64(good)}]))
    answers(be, ["warm"])
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
            for result in body["results"]:
                assert score(result, truth, NAMES)[0] == len(truth)
        else:
            assert body["type"] == "inference_failed" and body["status"] == "failed", body
            assert body["error_code"] == code, body
            assert body["error_message"] and "Traceback" not in body["error_message"]
    messages = {job_id: got[job_id].body.get("error_message", "") for job_id, _, _ in cases}
    assert "images[1]" in messages["garbage"] and "truncated" in messages["truncated"]
    assert "30000x30000" in messages["bombhdr"] and "30000x30000" in messages["bomb"]
    assert "MAX_IMAGES" in messages["toomany"] and "MAX_INLINE_IMAGE_BYTES" in messages["toobig"]
    assert "images/absent.png" in messages["noimage"] and "models/absent.pt" in messages["nomodel"]
    assert not marker.exists(), "the malicious pickle ran"
    assert worker.alive
    assert worker.proc is not None
    rss = worker_pid_rss_mb(worker.proc.pid)
    assert rss < 2500 and rss < rss_before + 600, (rss_before, rss)
    # Invalid requests are dead-lettered; the worker goes on.
    assert be.wait_count(f"{be.settings.infer_request_queue}.dlq", 1) >= 1
    be.send(be.settings.infer_request_queue, request("after", "models/shapes.pt", [image]))
    assert answers(be, ["after"])["after"].body["type"] == "inference_completed"
