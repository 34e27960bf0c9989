"""Conversion end to end: real broker, real worker process, real Ultralytics export on the
CPU, real SeaweedFS S3 server (and the local backend); plus the verification maths.

The worker runs with an audit hook (``tests/support/audit_site/sitecustomize.py``) that
records any network access beyond loopback and every process it starts, so the tests
can show an export reaches no network and runs no pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ai_service.errors import InvalidInput
from ai_service.messages import ConversionRequest
from ai_service.storage import LocalStorage, S3Storage, Storage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.support.s3 import S3Server
from workers import conversion
from workers.conversion import formats as conversion_formats
from workers.conversion import job as conversion_job

AUDIT_SITE = Path(__file__).parent / "support" / "audit_site"
HOOKED_WORKER = "tests.support.conversion_worker"
IMGSZ = 128
ARTIFACT_FIELDS = {"format", "path", "size_bytes", "sha256", "verified"}


# --- helpers ---------------------------------------------------------------------------


def convert_request(job_id: str, formats: list[str], *, model: str = "models/shapes.pt",
                    dataset: str | None = None, **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": job_id,
        "model": {"path": model},
        "formats": formats,
        "options": {"imgsz": IMGSZ, "half": False, "int8": False, "dynamic": False, "simplify": True,
                    "opset": None, "batch": 1, **options},
        "output": {"prefix": "models/exports"},
    }
    if dataset is not None:
        body["dataset"] = {"s3_prefix": dataset, "name": "shapes"}
    return body


def send(be: BE, body: dict[str, Any]) -> None:
    be.send(be.settings.convert_request_queue, body)


def follow(be: BE, job_id: str, timeout: float = 180) -> tuple[list[Received], Received]:
    """Every update of one job, then its terminal message."""
    result = be.terminal(be.settings.convert_result_queue, job_id, timeout=timeout)
    updates = [m for m in be.drain(be.settings.convert_update_queue) if m.body["job_id"] == job_id]
    return updates, result


def audited(tmp_path: Path, extra: dict[str, str] | None = None) -> tuple[dict[str, str], Path]:
    """Worker environment with the audit hook on; returns it and the audit log path."""
    log = tmp_path / "audit.log"
    pythonpath = os.pathsep.join(p for p in (str(AUDIT_SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pythonpath, "AUDIT_LOG": str(log), **(extra or {})}, log


def assert_no_network_and_no_pip(log: Path) -> None:
    lines = log.read_text().splitlines()
    assert any("hook installed" in line for line in lines), "the audit hook did not run in the worker"
    network = [line for line in lines if " connect " in line or " getaddrinfo " in line]
    assert network == [], network
    pip = [line for line in lines if " spawn " in line and ("pip" in line or "'uv'" in line)]
    assert pip == [], pip


def object_digest(storage: Storage, path: str) -> tuple[int, str]:
    """``(size, sha256)`` of an artifact as stored, by the contract's folder rule for ``.../``."""
    if not path.endswith("/"):
        data = storage.read_bytes(path)
        return len(data), hashlib.sha256(data).hexdigest()
    objects = storage.list(path)
    assert objects, f"no objects under {path}"
    pairs = [(o.key[len(path):], hashlib.sha256(storage.read_bytes(o.key)).hexdigest()) for o in objects]
    size = sum(o.size for o in objects)
    return size, conversion.folder_digest(pairs)


def download_artifact(storage: Storage, path: str, dest: Path) -> Path:
    if path.endswith("/"):
        target = dest / Path(path.rstrip("/")).name
        storage.download_prefix(path, target)
        return target
    target = dest / Path(path).name
    storage.download_file(path, target)
    return target


def predicted(model: Any, images: list[np.ndarray]) -> list[list[tuple[int, float]]]:
    """``(class, confidence)`` of each image's detections at Ultralytics' default conf."""
    results = model.predict(images, imgsz=IMGSZ, conf=0.25, device="cpu", verbose=False)
    return [list(zip(r.boxes.cls.int().tolist(), r.boxes.conf.tolist(), strict=True)) for r in results]


def assert_same_objects(source: list[list[tuple[int, float]]], exported: list[list[tuple[int, float]]]) -> None:
    """What one side finds confidently (>= 0.35), the other finds too (>= 0.25): a detection
    near the threshold may fall on either side of it through rounding alone."""
    for ours, theirs in ((source, exported), (exported, source)):
        for confident, found in zip(ours, theirs, strict=True):
            wanted = Counter(c for c, p in confident if p >= 0.35)
            assert not wanted - Counter(c for c, _ in found), (source, exported)


@pytest.fixture
def s3_storage(s3_server: S3Server, s3_bucket: str) -> Storage:
    return S3Storage(s3_bucket, client=s3_server.client())


@pytest.fixture
def yolo_ready(tmp_path: Path) -> Iterator[None]:
    from workers import yolo

    yolo.prepare_ultralytics(tmp_path / "yolo")
    return


# --- end to end ------------------------------------------------------------------------


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
def test_torchscript_onnx_and_openvino_from_s3_are_verified_and_load_and_engine_fails_alone(
    be: BE, start_worker: WorkerFactory, s3_server: S3Server, s3_bucket: str, s3_storage: Storage,
    trained_model: dict[str, Any], shapes_dir: Path, tmp_path: Path, yolo_ready: None,
) -> None:
    s3_storage.upload_file(Path(trained_model["model"]), "models/shapes.pt")
    s3_storage.upload_dir(shapes_dir, "datasets/shapes")
    env, audit = audited(tmp_path, {**s3_server.env(), "STORAGE_BACKEND": "s3", "S3_BUCKET": s3_bucket,
                                    "DEVICE": "cpu"})
    worker = start_worker("convert", env=env)
    # A finished training job with the same id: a job_id names one job per operation.
    from ai_service.jobs import JobRecord

    s3_storage.write_bytes("jobs/train/conv3.json", JobRecord(
        job_id="conv3", op="train", status="completed", terminal={"type": "training_completed", "job_id": "conv3"},
        terminal_message_id="t1", terminal_sent=True).to_json())

    send(be, convert_request("conv3", ["torchscript", "onnx", "openvino"], dataset="datasets/shapes/"))
    updates, result = follow(be, "conv3")
    done = result.body
    assert done["type"] == "conversion_completed", done
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["conversion_time"] > 0
    assert result.routing_key == "convert.result.conv3"

    assert [u.type for u in updates] == ["conversion_started"] + ["conversion_update"] * 3
    started = updates[0].body
    assert started["formats"] == ["torchscript", "onnx", "openvino"]
    assert started["worker"] == "test/convert-0"
    steps = [u.body for u in updates[1:]]
    assert [s["current_format"] for s in steps] == ["torchscript", "onnx", "openvino"]
    assert [s["progress"] for s in steps] == [33.33, 66.67, 100.0]

    artifacts = {a["format"]: a for a in done["artifacts"]}
    assert list(artifacts) == ["torchscript", "onnx", "openvino"]
    assert artifacts["torchscript"]["path"] == "models/exports/shapes.torchscript"
    assert artifacts["onnx"]["path"] == "models/exports/shapes.onnx"
    assert artifacts["openvino"]["path"] == "models/exports/shapes_openvino_model/"
    assert [s["artifact"] for s in steps] == done["artifacts"]

    from ultralytics import YOLO

    from ai_service.shapes import draw_shapes_image
    from tests.test_training import load_model

    source = load_model(Path(trained_model["model"]), tmp_path / "yolo")
    images = [np.asarray(draw_shapes_image(IMGSZ, seed)[0])[:, :, ::-1].copy() for seed in (0, 2, 8)]
    expected = predicted(source, images)
    assert any(p >= 0.35 for found in expected for _, p in found), "the trained model should find shapes"
    for fmt, artifact in artifacts.items():
        assert set(artifact) == ARTIFACT_FIELDS, artifact  # verified: no note
        assert artifact["verified"] is True, artifact
        assert object_digest(s3_storage, artifact["path"]) == (artifact["size_bytes"], artifact["sha256"]), fmt
        local = download_artifact(s3_storage, artifact["path"], tmp_path / "downloads" / fmt)
        exported = YOLO(str(local), task="detect")
        assert_same_objects(expected, predicted(exported, images))
        assert exported.names == {0: "circle", 1: "square"}
        # Provenance: what inference will check before loading this artifact.
        record = json.loads(s3_storage.read_bytes(f"jobs/artifacts/{artifact['sha256']}.json"))
        assert (record["format"], record["path"], record["source_model"], record["job_id"]) == (
            fmt, artifact["path"], "models/shapes.pt", "conv3")
        assert record["source_sha256"] == hashlib.sha256(Path(trained_model["model"]).read_bytes()).hexdigest()

    # engine (TensorRT) needs a GPU: that format fails alone, the others are still done and listed.
    send(be, convert_request("conv-engine", ["torchscript", "engine", "onnx"]))
    updates, result = follow(be, "conv-engine")
    failed = result.body
    assert failed["type"] == "conversion_failed", failed
    assert failed["status"] == "failed", failed
    assert failed["error_code"] == "unsupported_format"
    assert failed["failed_format"] == "engine"
    assert "GPU" in failed["error_message"]
    assert "Traceback" not in failed["error_message"]
    assert [a["format"] for a in failed["artifacts"]] == ["torchscript", "onnx"]
    assert all(a["verified"] for a in failed["artifacts"]), failed["artifacts"]
    assert [u.body.get("current_format") for u in updates[1:]] == ["torchscript", "onnx"]
    assert [u.body["progress"] for u in updates[1:]] == [33.33, 100.0]

    assert be.drain(be.settings.convert_result_queue) == [], "one terminal message per job"
    assert_no_network_and_no_pip(audit)
    work_runs = Path(worker.env["WORK_DIR"]) / "runs"
    # The folder goes right after the terminal message is handed to the publisher: allow it a moment.
    deadline = time.monotonic() + 15
    while work_runs.exists() and list(work_runs.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not work_runs.exists() or list(work_runs.iterdir()) == [], "per-job export folders are cleaned up"
    assert s3_server.secret_key not in worker.log()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "pwned"))


def test_bad_requests_each_end_with_one_conversion_failed_and_the_worker_goes_on(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any],
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = Path(worker_env["STORAGE_DIR"])
    storage = LocalStorage(root)
    storage.upload_file(Path(trained_model["model"]), "models/shapes.pt")
    storage.upload_dir(shapes_dir, "datasets/shapes")
    storage.write_bytes("models/notes.pt", b"these are not the weights you are looking for\n" * 10)
    marker = tmp_path / "marker"
    storage.write_bytes("models/evil.pt", pickle.dumps({"model": _Evil(marker)}))
    env, audit = audited(tmp_path)
    worker = start_worker("convert", env=env)
    cases = [
        ("unknown", convert_request("unknown", ["onnx", "tensorflow_js"]), "invalid_request", "tensorflow_js"),
        ("int8ts", convert_request("int8ts", ["torchscript"], int8=True, dataset="datasets/shapes/"),
         "invalid_request", "int8"),
        ("nomodel", convert_request("nomodel", ["onnx"], model="models/absent.pt"), "model_not_found", "absent"),
        ("notmodel", convert_request("notmodel", ["onnx"], model="models/notes.pt"), "invalid_request", "notes"),
        ("pickle", convert_request("pickle", ["onnx"], model="models/evil.pt"), "invalid_request", "evil"),
    ]
    for _, body, _, _ in cases:
        send(be, body)
    for job_id, _, code, mentioned in cases:
        failed = be.terminal(be.settings.convert_result_queue, job_id, timeout=120).body
        assert failed["type"] == "conversion_failed", failed
        assert failed["error_code"] == code, (job_id, failed)
        message = failed["error_message"]
        assert mentioned in message, (job_id, message)
        assert "Traceback" not in message, (job_id, message)
        assert failed["artifacts"] == []
    assert be.drain(be.settings.convert_result_queue) == [], "one terminal message per job"
    assert not marker.exists(), "the malicious pickle ran"
    # The worker takes the next job.
    send(be, convert_request("after", ["torchscript"]))
    _, result = follow(be, "after", timeout=120)
    assert result.type == "conversion_completed", result.body
    assert result.body["artifacts"][0]["verified"] is True
    assert (root / "models/exports/shapes.torchscript").is_file()
    assert worker.alive
    assert_no_network_and_no_pip(audit)


def test_a_cancel_between_formats_ends_with_conversion_cancelled_and_the_artifacts_done(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any],
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_file(Path(trained_model["model"]), "models/shapes.pt")
    start_worker(module=HOOKED_WORKER, env={"TEST_PAUSE_AFTER_FORMAT": "4"})
    send(be, convert_request("conv-cancel", ["torchscript", "onnx", "openvino"]))
    first = be.wait_for(be.settings.convert_update_queue,
                        lambda m: m.body["job_id"] == "conv-cancel" and m.type == "conversion_update", timeout=120)
    assert first.body["current_format"] == "torchscript"
    be.cancel("conv-cancel")
    result = be.terminal(be.settings.convert_result_queue, "conv-cancel", timeout=60).body
    assert result["type"] == "conversion_cancelled", result
    assert result["status"] == "cancelled", result
    assert [a["format"] for a in result["artifacts"]] == ["torchscript"]
    assert storage.stat("models/exports/shapes.torchscript") is not None
    assert storage.stat("models/exports/shapes.onnx") is None
    # A redelivered or repeated request gets the same terminal message, not a second job.
    send(be, convert_request("conv-cancel", ["torchscript", "onnx", "openvino"]))
    again = be.terminal(be.settings.convert_result_queue, "conv-cancel", timeout=60)
    assert again.body == result
    # Cancelled before any worker took it: answered as soon as one does, nothing exported.
    be.cancel("conv-early")
    deadline = time.monotonic() + 10
    while storage.stat("jobs/conv-early.cancel") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    send(be, convert_request("conv-early", ["onnx"]))
    early = be.terminal(be.settings.convert_result_queue, "conv-early", timeout=60).body
    assert early["type"] == "conversion_cancelled", early
    assert early["artifacts"] == [], early
    assert storage.stat("models/exports/shapes.onnx") is None


# --- the pieces ------------------------------------------------------------------------


def _request(formats: list[str], dataset: bool = False, **options: Any) -> ConversionRequest:
    body = convert_request("unit", formats, dataset="datasets/shapes/" if dataset else None, **options)
    return ConversionRequest.model_validate(body)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, conversion.FormatSpec]:
    from workers import yolo

    yolo.prepare_ultralytics(tmp_path_factory.mktemp("yolo"))
    return conversion.export_table()


def test_formats_and_options_are_checked_against_the_installed_exporter(
    table: dict[str, conversion.FormatSpec],
) -> None:
    assert {"torchscript", "onnx", "openvino", "engine", "coreml", "saved_model", "ncnn"} <= set(table)
    plans = conversion.plan_formats(_request(["onnx", "tflite", "trt"]), table)
    assert [(p.requested, p.name) for p in plans] == [("onnx", "onnx"), ("tflite", "litert"), ("trt", "engine")]
    with pytest.raises(InvalidInput, match=r"tensorflow_js.*allowed: .*torchscript"):
        conversion.plan_formats(_request(["onnx", "tensorflow_js"]), table)
    with pytest.raises(InvalidInput, match="int8: not available for torchscript"):
        conversion.plan_formats(_request(["torchscript", "onnx"], dataset=True, int8=True), table)
    with pytest.raises(InvalidInput, match=r"needs dataset\.s3_prefix"):
        conversion.plan_formats(_request(["onnx"], int8=True), table)
    with pytest.raises(InvalidInput, match="half and int8"):
        conversion.plan_formats(_request(["onnx"], dataset=True, int8=True, half=True), table)
    with pytest.raises(InvalidInput, match="twice"):
        conversion.plan_formats(_request(["engine", "tensorrt"]), table)
    with pytest.raises(InvalidInput, match="half: not available for paddle"):
        conversion.plan_formats(_request(["paddle"], half=True), table)


def test_unsupported_formats_are_named_with_what_is_missing_before_any_export(
    table: dict[str, conversion.FormatSpec], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    cpu = torch.device("cpu")
    options = _request(["onnx"]).options

    def reason(name: str, **opts: Any) -> str | None:
        plan = conversion.Plan(name, table[name])
        return conversion.unsupported_reason(plan, options.model_copy(update=opts), cpu)

    assert "GPU" in (reason("engine") or "")
    assert "GPU" in (reason("torchscript", half=True) or "")
    assert reason("torchscript") is None
    assert reason("onnx") is None
    assert reason("openvino") is None
    assert "coremltools" in (reason("coreml") or "")
    assert "tensorflow" in (reason("saved_model") or "")
    assert "ncnn" in (reason("ncnn") or "")
    assert "nncf" in (reason("openvino", int8=True) or "")
    real = conversion_formats._module_available
    monkeypatch.setattr(conversion_formats, "_module_available", lambda m: m != "onnxslim" and real(m))
    assert "onnxslim" in (reason("onnx") or "")
    assert reason("onnx", simplify=False) is None
    args = conversion.export_arguments(conversion.Plan("torchscript", table["torchscript"]),
                                       _request(["torchscript"], opset=12), cpu, None)
    assert "opset" not in args
    assert "simplify" not in args
    assert args["imgsz"] == IMGSZ


def _dets(*rows: tuple[int, float, float, float, float, float]) -> conversion.Detections:
    arr = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return conversion.Detections(boxes=arr[:, 1:5], conf=arr[:, 5], cls=arr[:, 0].astype(np.int64))


def test_detections_match_within_tolerance_and_a_mismatch_is_reported() -> None:
    tol = conversion.TOLERANCES["fp32"]
    ref = [_dets((0, 10, 10, 50, 50, 0.90), (1, 60, 60, 100, 100, 0.80)), _dets()]
    same = [_dets((1, 60.2, 60, 100, 100.1, 0.79), (0, 10, 10, 50, 50.2, 0.91)), _dets()]
    assert conversion.compare_detections(ref, same, tol, 0.25).ok
    # borderline detections (within the tolerance of the threshold) may be on one side only
    assert conversion.compare_detections([_dets((0, 1, 1, 9, 9, 0.27))], [_dets()], tol, 0.25).ok
    names = {0: "circle", 1: "square"}
    moved = [_dets((0, 10, 10, 50, 50, 0.90), (1, 70, 70, 110, 110, 0.80)), _dets()]
    result = conversion.compare_detections(ref, moved, tol, 0.25, names)
    assert not result.ok
    assert "square" in result.problems[0]
    assert "no match" in result.problems[0]
    swapped = [_dets((1, 10, 10, 50, 50, 0.90), (1, 60, 60, 100, 100, 0.80)), _dets()]
    assert not conversion.compare_detections(ref, swapped, tol, 0.25).ok
    weaker = [_dets((0, 10, 10, 50, 50, 0.70), (1, 60, 60, 100, 100, 0.80)), _dets()]
    assert "became 0.700" in conversion.compare_detections(ref, weaker, tol, 0.25).problems[0]
    extra = [ref[0], _dets((0, 5, 5, 20, 20, 0.6))]
    assert "does not" in conversion.compare_detections(ref, extra, tol, 0.25).problems[0]
    # int8 is allowed to drift further
    drift = [_dets((0, 12, 12, 52, 52, 0.75), (1, 61, 61, 101, 101, 0.70)), _dets()]
    assert not conversion.compare_detections(ref, drift, tol, 0.25).ok
    assert conversion.compare_detections(ref, drift, conversion.TOLERANCES["int8"], 0.25).ok


def test_raw_outputs_are_compared_on_the_top_anchors() -> None:
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.uniform(20, 100, (4, 50)), rng.uniform(0, 0.1, (2, 50))]).astype(np.float32)
    tol = conversion.TOLERANCES["fp32"]
    assert conversion.compare_raw([ref], [ref + 1e-4], tol).ok
    broken = ref.copy()
    broken[4:] = broken[4:][::-1]  # classes swapped
    broken[4, 0] += 0.5
    assert not conversion.compare_raw([ref], [broken], tol).ok
    assert "shape" in conversion.compare_raw([ref], [ref[:, :10]], tol).problems[0]


def test_a_folder_digest_is_sha256sum_of_the_sorted_file_list(tmp_path: Path) -> None:
    folder = tmp_path / "m_openvino_model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.xml").write_text("<xml/>")
    (folder / "model.bin").write_bytes(b"\x00\x01" * 100)
    (folder / "sub" / "metadata.yaml").write_text("a: 1\n")
    size, sha = conversion.describe_local(folder)
    assert size == 6 + 200 + 5
    listing = "".join(
        f"{hashlib.sha256((folder / rel).read_bytes()).hexdigest()}  {rel}\n"
        for rel in sorted(["model.xml", "model.bin", "sub/metadata.yaml"])
    )
    assert sha == hashlib.sha256(listing.encode()).hexdigest()
    file_size, file_sha = conversion.describe_local(folder / "model.bin")
    assert (file_size, file_sha) == (200, hashlib.sha256(b"\x00\x01" * 100).hexdigest())
    assert conversion_job._artifact_name("models/a/my-data.pt", "model_openvino_model") == "my-data_openvino_model"
    assert conversion_job._artifact_name("models/a/my-data.pt", "model_int8.onnx") == "my-data_int8.onnx"
