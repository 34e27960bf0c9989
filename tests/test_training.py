"""Training end to end: real broker, real worker process, real Ultralytics on the CPU,
real SeaweedFS S3 server (and the local backend)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from ai_service.storage import LocalStorage, S3Storage, Storage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, Received
from tests.support.s3 import S3Server

TRAIN_WORKER = "tests.support.training_worker"
SHORT_S3_TRAIN_WORKER = "tests.support.short_s3_training_worker"
EPOCH_FIELDS = {"type", "job_id", "status", "current_epoch", "total_epochs", "progress", "metrics", "timestamp"}
METRIC_FIELDS = {"train_loss", "mAP50", "box_loss", "cls_loss", "dfl_loss"}


def train_request(job_id: str, *, prefix: str = "datasets/shapes/", model: str = "yolov8n", epochs: int = 2,
                  imgsz: int = 64, **extra: Any) -> dict[str, Any]:
    """A request in the specification's exact format."""
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": prefix, "name": "shapes"},
        "output": {"prefix": "models/yolov8n", "model_name": f"{job_id}.pt"},
        "hyperparams": {"model": model, "epochs": epochs, "batch": 8, "imgsz": imgsz, **extra},
    }


def follow(be: BE, job_id: str, timeout: float = 240) -> tuple[list[Received], Received]:
    """Every update of one job, then its terminal message."""
    result = be.terminal(be.settings.train_result_queue, job_id, timeout=timeout)
    updates = [m for m in be.drain(be.settings.train_update_queue) if m.body["job_id"] == job_id]
    return updates, result


def assert_progress(updates: list[Received], epochs: int) -> None:
    assert updates[0].type == "training_started"
    started = updates[0].body
    assert started["total_epochs"] == epochs
    assert started["resumed_from_epoch"] == 0
    assert started["worker"]
    epoch_updates = [u.body for u in updates if u.type == "epoch_update"]
    assert [u["current_epoch"] for u in epoch_updates] == list(range(1, epochs + 1))
    progress = [u["progress"] for u in epoch_updates]
    assert progress == sorted(set(progress))
    assert progress[-1] == 100.0
    for u in epoch_updates:
        assert set(u) >= EPOCH_FIELDS, u
        assert set(u["metrics"]) >= METRIC_FIELDS, u
        m = u["metrics"]
        assert m["train_loss"] == pytest.approx(m["box_loss"] + m["cls_loss"] + m["dfl_loss"], abs=1e-4)
        assert u["status"] == "running"
        assert u["total_epochs"] == epochs
        assert u["timestamp"].endswith("+00:00")


def load_model(path: Path, work: Path) -> Any:
    from workers import yolo

    yolo.prepare_ultralytics(work)
    return yolo.safe_load_model(path)


@pytest.fixture
def s3_storage(s3_server: S3Server, s3_bucket: str) -> Storage:
    return S3Storage(s3_bucket, client=s3_server.client())


def test_a_spec_format_request_trains_end_to_end_from_s3(
    be: BE, start_worker: WorkerFactory, s3_server: S3Server, s3_bucket: str, s3_storage: Storage,
    shapes_dir: Path, tmp_path: Path,
) -> None:
    s3_storage.upload_dir(shapes_dir, "datasets/shapes")
    start_worker(module=TRAIN_WORKER, env={**s3_server.env(), "STORAGE_BACKEND": "s3", "S3_BUCKET": s3_bucket})
    be.send_train(train_request("s3job1", epochs=3))
    updates, result = follow(be, "s3job1")
    assert_progress(updates, 3)
    done = result.body
    assert done["type"] == "training_completed"
    assert done["status"] == "completed"
    assert done["progress"] == 100.0
    assert done["model_path"] == "models/yolov8n/s3job1.pt"
    assert {"final_mAP50", "final_loss", "training_epochs"} <= set(done["final_metrics"])
    assert done["final_metrics"]["training_epochs"] == 3
    assert done["training_time"] > 0
    local = tmp_path / "downloaded" / "model.pt"
    s3_storage.download_file(done["model_path"], local)
    assert load_model(local, tmp_path / "yolo").names == {0: "circle", 1: "square"}


def test_a_spec_format_request_trains_end_to_end_on_local_storage(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, tmp_path: Path,
) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    probe = tmp_path / "probe.txt"
    start_worker(module=TRAIN_WORKER, env={"CUDA_VISIBLE_DEVICES": "3", "TEST_ENV_PROBE": str(probe)})
    be.send_train(train_request("localjob1", epochs=2))
    updates, result = follow(be, "localjob1")
    assert_progress(updates, 2)
    assert result.type == "training_completed"
    path = Path(worker_env["STORAGE_DIR"]) / result.body["model_path"]
    assert load_model(path, tmp_path / "yolo").names == {0: "circle", 1: "square"}
    # The GPU pin supervisord sets is untouched by a job.
    assert probe.read_text().split() == ["localjob1", "3"]
    # Partial run files are cleaned up; the dataset cache stays for the next job.
    runs = Path(worker_env["WORK_DIR"]) / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


def test_a_model_trained_long_enough_finds_the_shapes(trained_model: dict[str, Any], shapes_dir: Path,
                                                      tmp_path: Path) -> None:
    final = trained_model["completed"]["final_metrics"]
    assert final["final_mAP50"] > 0.5, final
    model = load_model(Path(trained_model["model"]), tmp_path / "yolo")
    data = tmp_path / "data.yaml"
    data.write_text((shapes_dir / "data.yaml").read_text() + f"\npath: {shapes_dir}\n")
    metrics = model.val(data=str(data), imgsz=128, batch=8, plots=False, verbose=False, device="cpu",
                        project=str(tmp_path / "val"))
    assert metrics.box.map50 > 0.5


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "pwned"))


def test_failures_each_end_with_one_training_failed_and_the_worker_goes_on(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, tmp_path: Path,
) -> None:
    root = Path(worker_env["STORAGE_DIR"])
    storage = LocalStorage(root)
    storage.upload_dir(shapes_dir, "datasets/shapes")
    # a dataset whose data.yaml points outside its prefix
    shutil.copytree(shapes_dir, root / "datasets/escape")
    (root / "datasets/escape/data.yaml").write_text("train: ../shapes/images/train\nval: images/val\nnames: [a, b]\n")
    # a dataset without names
    shutil.copytree(shapes_dir, root / "datasets/nonames")
    (root / "datasets/nonames/data.yaml").write_text("train: images/train\nval: images/val\n")
    # a .pt whose pickle would write a marker file
    marker = tmp_path / "marker"
    (root / "models").mkdir(parents=True, exist_ok=True)
    with open(root / "models/evil.pt", "wb") as fh:
        pickle.dump({"model": _Evil(marker)}, fh)
    start_worker(module=TRAIN_WORKER, env={"TEST_FAULT": "oom@2"})
    cases = [
        ("missing", train_request("missing", prefix="datasets/nope/"), "dataset_not_found"),
        ("escape", train_request("escape", prefix="datasets/escape/"), "dataset_invalid"),
        ("nonames", train_request("nonames", prefix="datasets/nonames/"), "dataset_invalid"),
        ("badmodel", train_request("badmodel", model="resnet50"), "invalid_request"),
        ("segmodel", train_request("segmodel", model="yolov8n-seg"), "invalid_request"),
        ("evil", train_request("evil", pretrained="models/evil.pt"), "invalid_request"),
        ("nopre", train_request("nopre", pretrained="models/absent.pt"), "model_not_found"),
        ("oom", train_request("oom", epochs=3), "out_of_memory"),
    ]
    for _, body, _ in cases:
        be.send_train(body)
    for job_id, _, code in cases:
        failed = be.terminal(be.settings.train_result_queue, job_id, timeout=180).body
        assert failed["type"] == "training_failed", failed
        assert failed["error_code"] == code, (job_id, failed)
        assert failed["error_message"]
        assert "Traceback" not in failed["error_message"]
    oom = [m for m in be.drain(be.settings.train_result_queue)]
    assert oom == [], "one terminal message per job"
    assert not marker.exists(), "the malicious pickle ran"
    # The worker takes the next job (OOM only hits epoch 2; this job has 1 epoch).
    be.send_train(train_request("after", epochs=1))
    assert be.terminal(be.settings.train_result_queue, "after", timeout=120).type == "training_completed"


def test_the_oom_failure_carries_the_last_finished_epoch_and_its_metrics(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    start_worker(module=TRAIN_WORKER, env={"TEST_FAULT": "oom@3"})
    be.send_train(train_request("oom2", epochs=4))
    failed = be.terminal(be.settings.train_result_queue, "oom2", timeout=180).body
    assert failed["error_code"] == "out_of_memory"
    assert failed["current_epoch"] == 2
    assert set(failed["partial_metrics"]) == {"last_loss", "last_mAP50"}
    assert "batch" in failed["error_message"]


def test_s3_paused_for_30_s_mid_training_resumes_from_its_checkpoint_and_completes_once(
    be: BE, start_worker: WorkerFactory, s3_server: S3Server, s3_bucket: str, s3_storage: Storage,
    shapes_dir: Path,
) -> None:
    """A retryable StorageError of a recorded job hands it back through RabbitMQ (the
    holding queue) with a backoff: it resumes from its checkpoint, never training_failed."""
    s3_storage.upload_dir(shapes_dir, "datasets/shapes")
    env = {**s3_server.env(), "STORAGE_BACKEND": "s3", "S3_BUCKET": s3_bucket, "TEST_S3_TIMEOUT": "5",
           "LEASE_SECONDS": "4", "RETRY_BACKOFF_SECONDS": "1", "RETRY_BACKOFF_MAX_SECONDS": "4",
           "RABBITMQ_DELIVERY_LIMIT": "10"}
    worker = start_worker(module=SHORT_S3_TRAIN_WORKER, env=env)
    be.send_train(train_request("s3pause", epochs=3))
    seen: list[Received] = []
    be.wait_for(be.settings.train_update_queue,
                lambda m: m.body["job_id"] == "s3pause" and m.body.get("current_epoch") == 1, timeout=120,
                collected=seen)
    with s3_server.paused():  # SIGSTOP: connections are accepted, nothing answers
        be.connection.sleep(30)
    updates, result = follow(be, "s3pause", timeout=240)
    updates = [m for m in seen if m.body["job_id"] == "s3pause"] + updates
    assert result.type == "training_completed", result.body
    log = worker.log()
    assert "Retryable failure" in log, "the pause never reached the job"
    starts = [u.body for u in updates if u.type == "training_started"]
    assert len(starts) >= 2, starts
    assert starts[-1]["resumed_from_epoch"] >= 1, starts
    assert {u.body["current_epoch"] for u in updates if u.type == "epoch_update"} == {1, 2, 3}
    be.connection.sleep(2)  # a second terminal message would be right behind the first
    assert be.drain(be.settings.train_result_queue) == [], "exactly one terminal message, no training_failed"
    be.send_train(train_request("s3back", epochs=1))
    assert be.terminal(be.settings.train_result_queue, "s3back", timeout=120).type == "training_completed"
    assert worker.alive
    assert s3_server.secret_key not in worker.log()


# --- checkpoint uploads in the background ------------------------------------------------


def test_checkpoints_are_staged_so_the_next_epoch_cannot_overwrite_what_is_uploading(tmp_path: Path) -> None:
    import threading

    from workers.training.uploads import CheckpointUploads

    release = threading.Event()
    stored: list[bytes] = []

    def store(staged: dict[str, Path], best_is_last: bool) -> None:
        release.wait(5)
        stored.append(staged["last"].read_bytes())

    src = tmp_path / "last.pt"
    src.write_bytes(b"epoch 1")
    uploads = CheckpointUploads(tmp_path / "staging", store)
    uploads.submit(src)
    src.write_bytes(b"epoch 2")  # Ultralytics saves the next epoch over it
    release.set()
    uploads.flush()
    assert stored == [b"epoch 1"]
    assert src.read_bytes() == b"epoch 2", "the newer save was replaced by the uploaded one"


def test_at_most_one_checkpoint_upload_is_pending_and_its_failure_reaches_the_training_thread(
    tmp_path: Path,
) -> None:
    import threading

    from ai_service.errors import StorageError
    from workers.training.uploads import CheckpointUploads

    running = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def store(staged: dict[str, Path], best_is_last: bool) -> None:
        calls.append(len(calls))
        running.set()
        release.wait(5)
        raise StorageError("S3 went away")

    src = tmp_path / "last.pt"
    src.write_bytes(b"w")
    uploads = CheckpointUploads(tmp_path / "staging", store)
    uploads.submit(src)
    assert running.wait(5)
    raised: list[BaseException] = []

    def next_epoch() -> None:
        try:
            uploads.submit(src)
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    waiter = threading.Thread(target=next_epoch)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "a second epoch's upload did not wait for the first"
    release.set()
    waiter.join(5)
    assert [type(e) for e in raised] == [StorageError]
    assert calls == [0], "the second upload started although the first one failed"
    uploads.settle()  # nothing pending any more, nothing raised


def test_a_stored_checkpoint_tells_how_far_training_got_and_each_epochs_metrics() -> None:
    from types import SimpleNamespace

    from workers.training.metrics import checkpoint_progress

    table = {"epoch": [1, 2], "train/box_loss": [1.5, 1.25], "train/cls_loss": [2.0, 1.5],
             "train/dfl_loss": [1.0, 1.0], "metrics/mAP50(B)": [0.1, 0.25], "val/box_loss": [1.75, 1.5]}
    model = SimpleNamespace(ckpt={"epoch": 1, "train_args": {"epochs": 2}, "train_results": table})
    finished, total, rows = checkpoint_progress(model)
    assert (finished, total) == (2, 2)
    assert rows[2]["train_loss"] == 3.75
    assert rows[2]["mAP50"] == 0.25
    assert rows[2]["val_box_loss"] == 1.5
    assert rows[1]["mAP50"] == 0.1
    assert checkpoint_progress(SimpleNamespace(ckpt=None)) == (0, 0, {})


def test_staging_a_checkpoint_copies_nothing_and_puts_last_pt_back_once_uploaded(tmp_path: Path) -> None:
    import os

    from workers.training.uploads import CheckpointUploads

    seen: dict[str, tuple[int, bytes]] = {}
    flags: list[bool] = []

    def store(staged: dict[str, Path], best_is_last: bool) -> None:
        flags.append(best_is_last)
        for name, path in staged.items():
            seen[name] = (path.stat().st_ino, path.read_bytes())

    last = tmp_path / "weights" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"epoch 1")
    inode = last.stat().st_ino
    uploads = CheckpointUploads(tmp_path / "staging", store)
    uploads.submit(last, best_is_last=True)
    uploads.flush()
    assert seen == {"last": (inode, b"epoch 1")}, "staged by rename; best.pt, equal to it, is not uploaded again"
    assert flags == [True]
    assert last.read_bytes() == b"epoch 1", "last.pt is back for NaN recovery"
    assert last.stat().st_ino == inode, "last.pt is back for NaN recovery"
    assert os.listdir(tmp_path / "staging") == []
    last.write_bytes(b"epoch 2")  # the next save (in place) ...
    uploads.submit(last)
    uploads.flush()
    assert seen["last"][1] == b"epoch 2"
    assert flags == [True, False]
    assert last.read_bytes() == b"epoch 2"


def test_the_previous_best_is_staged_as_a_copy_that_the_next_improving_save_cannot_change(tmp_path: Path) -> None:
    from tests.support.uploads import HeldStore
    from workers.training.uploads import CheckpointUploads

    store = HeldStore()

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "last.pt").write_bytes(b"epoch 3, worse")
    (weights / "best.pt").write_bytes(b"epoch 2, best")
    uploads = CheckpointUploads(tmp_path / "staging", store)
    uploads.submit(weights / "last.pt", previous_best=weights / "best.pt")
    assert store.uploading.wait(5)
    with open(weights / "best.pt", "wb") as f:  # epoch 4 improves: Ultralytics rewrites best.pt in place
        f.write(b"epoch 4, best")
    store.release.set()
    uploads.flush()
    assert store.seen == {"last": b"epoch 3, worse", "best": b"epoch 2, best"}
    assert (weights / "best.pt").read_bytes() == b"epoch 4, best"
    assert list((tmp_path / "staging").iterdir()) == []


def test_the_stored_best_checkpoint_holds_the_weights_the_job_delivered(trained_model: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """best.pt is uploaded only once it stops being last.pt; whichever key the record
    names as best holds the weights Ultralytics picked as the model."""
    import json

    import torch

    completed = trained_model["completed"]
    model_path = Path(trained_model["model"])
    root = model_path
    for _ in Path(completed["model_path"]).parts:
        root = root.parent
    record = json.loads((root / "jobs" / "train" / "trained-model.json").read_text())
    checkpoints = record["checkpoints"]
    assert set(checkpoints) == {"last", "best"}, checkpoints
    delivered = load_model(model_path, tmp_path / "yolo").model.state_dict()
    stored = load_model(root / checkpoints["best"], tmp_path / "yolo").model.state_dict()
    assert delivered.keys() == stored.keys()
    assert all(torch.equal(delivered[k], stored[k]) for k in delivered), "the record names other weights as best"
    if checkpoints["best"] != checkpoints["last"]:
        last = load_model(root / checkpoints["last"], tmp_path / "yolo").model.state_dict()
        assert not all(torch.equal(last[k], stored[k]) for k in last), "best.pt stored though equal to last.pt"


def test_the_checkpoint_upload_runs_nicer_than_training(tmp_path: Path) -> None:
    import os
    import threading

    from workers.training.uploads import UPLOAD_NICENESS, CheckpointUploads

    niceness: list[int] = []
    uploads = CheckpointUploads(tmp_path / "staging", lambda staged, best_is_last: niceness.append(
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    src = tmp_path / "last.pt"
    src.write_bytes(b"w")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    uploads.submit(src)
    uploads.flush()
    assert niceness == [min(19, mine + UPLOAD_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine, "training kept its priority"


def test_without_hard_links_the_checkpoint_is_staged_as_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from workers.training import uploads as uploads_module

    def no_links(src: Any, dst: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(uploads_module.os, "link", no_links)
    seen: dict[str, bytes] = {}
    last = tmp_path / "last.pt"
    last.write_bytes(b"epoch 1")
    best = tmp_path / "best.pt"
    best.write_bytes(b"epoch 0")
    uploads = uploads_module.CheckpointUploads(tmp_path / "staging", lambda staged, best_is_last: seen.update(
        {name: path.read_bytes() for name, path in staged.items()}))
    uploads.submit(last, previous_best=best)
    uploads.flush()
    assert seen == {"last": b"epoch 1", "best": b"epoch 0"}
    assert last.read_bytes() == b"epoch 1"
    assert os.listdir(tmp_path / "staging") == []
