"""Containment: hostile datasets, keys and models never run code, reach outside, or touch
another job's state.  Units of the dataset view and the key rules, then the same
boundaries through the real training worker on the real broker.

Every test that plants a payload asserts that the payload did not run (a marker file it
would have written) or that the bytes it targeted are unchanged, not only the error code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ai_service.errors import EscapesRoot, PermanentError
from ai_service.jobs import JobRecord, Ledger
from ai_service.limits import Limits
from ai_service.messages import ConversionRequest, InferenceRequest, InvalidRequest, TrainingRequest, parse_request
from ai_service.storage import LocalStorage, cache_dir_name
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.pngs import png_claiming
from workers.datasets import DatasetError, DatasetLimits, materialise

TRAIN_WORKER = "tests.support.training_worker"


class _Evil:
    """Unpickling this writes ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.marker, "pwned"))


def plant_cache(path: Path, marker: Path) -> None:
    """A numpy file holding a pickle, where Ultralytics looks for its label cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, np.array(_Evil(marker), dtype=object), allow_pickle=True)


def copy_dataset(shapes_dir: Path, dest: Path) -> Path:
    shutil.copytree(shapes_dir, dest)
    return dest


def view_files(view: Path) -> set[str]:
    return {p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file()}


# --- the dataset view ---------------------------------------------------------------------


def test_the_view_holds_only_checked_images_their_labels_and_a_data_yaml_of_our_own(
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    (ds / "data.yaml").write_text(
        "path: /etc\ntrain: images/train\nval: images/val\ntest: /etc/passwd\nnames: [circle, square]\n"
        "download: |\n  open('/tmp/never', 'w').write('x')\n")
    plant_cache(ds / "labels/train.cache", tmp_path / "marker")
    (ds / "images/train/notes.txt").write_text("not an image")
    done = materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run")
    data = yaml.safe_load(done.data_yaml.read_text())
    view = done.data_yaml.parent
    assert data == {"path": str(view.resolve()), "train": "images/train", "val": "images/val",
                    "names": ["circle", "square"], "nc": 2}
    files = view_files(view)
    assert not [f for f in files if f.endswith(".cache")]
    assert done.images == {"train": 64, "val": 8}
    assert len([f for f in files if f.startswith("labels/train/")]) == 64
    # each image keeps its own label
    for image in (view / "images/train").iterdir():
        label = view / "labels/train" / (image.stem + ".txt")
        original = ds / "labels/train" / (image.stem.split("_", 1)[1] + ".txt")
        assert label.read_bytes() == original.read_bytes()
    assert not (tmp_path / "marker").exists()


def test_a_list_file_naming_images_outside_the_dataset_is_refused_and_leaves_nothing_behind(
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = tmp_path / "storage"
    outside = copy_dataset(shapes_dir, tmp_path / "outside")
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    lines = [str(p) for p in sorted((outside / "images/train").iterdir())]
    (ds / "train.txt").write_text("./images/train/000000.png\n" + "\n".join(lines) + "\n")
    (ds / "data.yaml").write_text("train: train.txt\nval: images/val\nnames: [circle, square]\n")
    storage = LocalStorage(root)
    with pytest.raises(DatasetError) as caught:
        materialise(storage, "datasets/d/", tmp_path / "work", tmp_path / "run")
    assert "train.txt line 2" in caught.value.message
    assert "relative" in caught.value.message
    assert caught.value.error_code == "dataset_invalid"
    assert not (tmp_path / "run" / "dataset").exists()
    assert not (tmp_path / "work" / "datasets" / cache_dir_name(storage, "datasets/d/")).exists()


@pytest.mark.parametrize("line", ["../outside/images/train/000000.png", "./../../outside/a.png",
                                  "images/../../../outside/a.png"])
def test_a_list_line_escaping_with_dot_dot_is_refused(shapes_dir: Path, tmp_path: Path, line: str) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    (ds / "val.txt").write_text(line + "\n")
    (ds / "data.yaml").write_text("train: images/train\nval: val.txt\nnames: [circle, square]\n")
    with pytest.raises(DatasetError, match="outside the dataset"):
        materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run")


def test_list_files_resolve_inside_the_dataset_and_pair_their_labels(shapes_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    (ds / "lists").mkdir()
    (ds / "lists/train.txt").write_text("images/train/000001.png\n./../images/train/000002.png\n\n")
    (ds / "data.yaml").write_text("train: lists/train.txt\nval: [images/val]\nnames: {0: circle, 1: square}\n")
    done = materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run")
    view = done.data_yaml.parent
    assert done.images["train"] == 2
    labels = sorted((view / "labels/train").iterdir())
    assert [p.read_bytes() for p in labels] == [(ds / "labels/train/000001.txt").read_bytes(),
                                                (ds / "labels/train/000002.txt").read_bytes()]


def test_a_dataset_image_whose_header_claims_a_bomb_is_refused_before_decoding(
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    (ds / "images/val/bomb.png").write_bytes(png_claiming(30000, 30000))
    with pytest.raises(DatasetError, match="MAX_DATASET_IMAGE_PIXELS") as caught:
        materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run",
                    DatasetLimits(max_image_pixels=10_000_000))
    assert "images/val/bomb.png" in caught.value.message


def test_a_missing_val_with_a_download_script_is_dataset_invalid_and_the_script_never_runs(
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    marker = tmp_path / "download-ran"
    (ds / "data.yaml").write_text(f"train: images/train\nval: images/absent\nnames: [a, b]\n"
                                  f"download: \"open('{marker}', 'w').write('x')\"\n")
    with pytest.raises(DatasetError, match="does not exist"):
        materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run")
    assert not marker.exists()


# --- the local backend never leaves its root ----------------------------------------------


def test_the_local_backend_refuses_symlinks_that_leave_its_root(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    (root / "d/sub").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET")
    (root / "d/inside.txt").write_bytes(b"ok")
    os.symlink(root / "d/inside.txt", root / "d/alias.txt")
    storage = LocalStorage(root)
    assert storage.read_bytes("d/alias.txt") == b"ok"  # a link that stays inside is fine
    os.symlink(secret, root / "d/leak.txt")
    for call in (lambda: storage.read_bytes("d/leak.txt"), lambda: storage.stat("d/leak.txt"),
                 lambda: storage.list("d/"), lambda: storage.download_file("d/leak.txt", tmp_path / "x")):
        with pytest.raises(EscapesRoot):
            call()
    os.unlink(root / "d/leak.txt")
    os.symlink(tmp_path, root / "d/sub/up")  # a folder link to outside
    with pytest.raises(EscapesRoot):
        storage.list("d/")
    with pytest.raises(EscapesRoot):
        storage.write_bytes("d/sub/up/planted.txt", b"x")
    assert not (tmp_path / "planted.txt").exists()


def test_a_dataset_with_a_symlink_out_of_storage_is_invalid_and_nothing_of_it_is_cached(
    shapes_dir: Path, tmp_path: Path,
) -> None:
    root = tmp_path / "storage"
    ds = copy_dataset(shapes_dir, root / "datasets/d")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG-SECRET-CONTENT")
    os.symlink(secret, ds / "images/train/leak.png")
    with pytest.raises(PermanentError) as caught:
        materialise(LocalStorage(root), "datasets/d/", tmp_path / "work", tmp_path / "run")
    assert caught.value.error_code == "dataset_invalid"
    assert "leak.png" in caught.value.message
    cached = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert not [p for p in cached if b"SECRET-CONTENT" in p.read_bytes()]


# --- keys never reach the service's own area; bounds at validation -------------------------


def _train(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "j1",
        "dataset": {"s3_prefix": "datasets/d/", "name": "d"},
        "output": {"prefix": "models", "model_name": "m.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": 2, "batch": 8, "imgsz": 64},
    }
    for path, value in over.items():
        target = body
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return body


def _parse(model: type[Any], body: dict[str, Any], limits: Limits | None = None) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(model, json.dumps(body).encode(), 10**8, limits)
    assert caught.value.job_id == body.get("job_id")
    return caught.value.message


@pytest.mark.parametrize(("field", "value"), [
    ("dataset.s3_prefix", "jobs/"), ("dataset.s3_prefix", "jobs"), ("output.prefix", "jobs"),
    ("output.prefix", "jobs/train"), ("hyperparams.pretrained", "jobs/train/x/last.pt"),
])
def test_no_training_key_may_name_the_services_own_area(field: str, value: str) -> None:
    message = _parse(TrainingRequest, _train(**{field: value}))
    assert field in message
    assert "JOBS_PREFIX" in message


def test_conversion_and_inference_keys_may_not_name_the_services_own_area_either() -> None:
    conv = {"job_id": "c1", "model": {"path": "jobs/train/x/best.pt"}, "formats": ["onnx"],
            "output": {"prefix": "jobs/artifacts"}}
    message = _parse(ConversionRequest, conv)
    assert "model.path" in message
    assert "output.prefix" in message
    inf = {"job_id": "i1", "model": {"path": "m.pt"}, "images": [{"path": "jobs/convert/c1.json"}]}
    assert "images.0" in _parse(InferenceRequest, inf)


def test_jobs_prefix_is_the_configured_one() -> None:
    limits = Limits(jobs_prefix="svc/state/")
    assert "JOBS_PREFIX" in _parse(TrainingRequest, _train(**{"output.prefix": "svc/state"}), limits)
    parse_request(TrainingRequest, json.dumps(_train(**{"output.prefix": "jobs"})).encode(), 10**8, limits)


@pytest.mark.parametrize(("field", "value", "setting"), [
    ("hyperparams.batch", 257, "MAX_TRAIN_BATCH"), ("hyperparams.epochs", 10001, "MAX_EPOCHS"),
    ("hyperparams.imgsz", 4100, "MAX_IMGSZ"), ("hyperparams.workers", 17, "MAX_DATALOADER_WORKERS"),
    ("hyperparams.cache", "ram", "ALLOW_RAM_CACHE"), ("hyperparams.cache", True, "ALLOW_RAM_CACHE"),
])
def test_training_bounds_are_enforced_at_validation(field: str, value: Any, setting: str) -> None:
    assert setting in _parse(TrainingRequest, _train(**{field: value}))


def test_an_inference_request_with_too_many_images_is_refused_by_counting_alone() -> None:
    body = {"job_id": "i1", "model": {"path": "m.pt"}, "images": [{"data": "!!not base64!!"}] * 5000,
            "params": {"max_det": 1001}}
    message = _parse(InferenceRequest, body)
    assert "MAX_IMAGES_PER_REQUEST" in message
    assert "MAX_DET" in message
    assert "base64" not in message, "the items were never validated one by one"


# --- records are per operation --------------------------------------------------------------


def test_training_and_conversion_records_of_one_job_id_are_separate(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    train = Ledger(storage, op="train", worker="w", lease_seconds=10)
    convert = Ledger(storage, op="convert", worker="w", lease_seconds=10)
    train.finish(JobRecord(job_id="same", op="train"), "completed", {"type": "training_completed"}, "m1")
    assert convert.load("same") is None
    assert storage.stat("jobs/train/same.json") is not None
    # a record an older release wrote is read by its own operation only
    storage.write_bytes("jobs/old.json", JobRecord(job_id="old", op="train").to_json())
    loaded = train.load("old")
    assert loaded is not None
    assert loaded.op == "train"
    assert convert.load("old") is None


# --- through the real worker ----------------------------------------------------------------


def _request(job_id: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": prefix, "name": "x"},
        "output": {"prefix": "models/yolov8n", "model_name": f"{job_id}.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": 1, "batch": 8, "imgsz": 64},
        **extra,
    }


def test_hostile_datasets_and_keys_through_the_real_worker_run_nothing_and_touch_nothing(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, tmp_path: Path,
) -> None:
    root = Path(worker_env["STORAGE_DIR"])
    marker = tmp_path / "payload-ran"
    # 1. a list file naming images outside the dataset, with a pickled cache beside them
    outside = copy_dataset(shapes_dir, tmp_path / "outside")
    plant_cache(outside / "labels/train.cache", marker)
    plant_cache(outside / "labels/val.cache", marker)
    escape = copy_dataset(shapes_dir, root / "datasets/escape")
    (escape / "train.txt").write_text("\n".join(str(p) for p in sorted((outside / "images/train").iterdir())))
    (escape / "data.yaml").write_text("train: train.txt\nval: images/val\nnames: [circle, square]\n")
    # 2. a good dataset that carries planted label caches of its own
    planted = copy_dataset(shapes_dir, root / "datasets/planted")
    plant_cache(planted / "labels/train.cache", marker)
    plant_cache(planted / "labels/val.cache", marker)
    (planted / "data.yaml").write_text(f"train: images/train\nval: images/val\nnames: [circle, square]\n"
                                       f"download: \"open('{marker}', 'w').write('x')\"\n")
    # 3. a missing val with a download script
    dl = copy_dataset(shapes_dir, root / "datasets/download")
    (dl / "data.yaml").write_text(f"train: images/train\nval: images/nothing\nnames: [a, b]\n"
                                  f"download: \"open('{marker}', 'w').write('x')\"\n")
    # 4. a symlink out of STORAGE_DIR
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET-BYTES" * 10)
    link = copy_dataset(shapes_dir, root / "datasets/link")
    os.symlink(secret, link / "images/train/leak.png")

    worker = start_worker(module=TRAIN_WORKER)
    be.send_train(_request("victim", "datasets/planted/"))
    victim = be.terminal(be.settings.train_result_queue, "victim", timeout=240)
    assert victim.type == "training_completed", victim.body
    record = root / "jobs/train/victim.json"
    # The worker marks the terminal message sent just after the BE got it: wait for that last write.
    deadline = time.monotonic() + 30
    while not json.loads(record.read_bytes()).get("terminal_sent") and time.monotonic() < deadline:
        time.sleep(0.1)
    before = record.read_bytes()
    assert json.loads(before)["terminal_sent"] is True

    cases = {
        "escape": (_request("escape", "datasets/escape/"), "dataset_invalid"),
        "download": (_request("download", "datasets/download/"), "dataset_invalid"),
        "link": (_request("link", "datasets/link/"), "dataset_invalid"),
        "overwrite": ({**_request("overwrite", "datasets/planted/"),
                       "output": {"prefix": "jobs", "model_name": "train/victim.json"}}, "invalid_request"),
        "syncjobs": (_request("syncjobs", "jobs/"), "invalid_request"),
    }
    for body, _ in cases.values():
        be.send_train(body)
    for job_id, (_, code) in cases.items():
        failed = be.terminal(be.settings.train_result_queue, job_id, timeout=180).body
        assert failed["type"] == "training_failed", (job_id, failed)
        assert failed["error_code"] == code, (job_id, failed)
    assert not marker.exists(), "a planted payload ran"
    assert record.read_bytes() == before, "the victim's record was touched"
    work = Path(worker_env["WORK_DIR"])
    cached = [p for p in work.rglob("*") if p.is_file() and p.stat().st_size < 10**6]
    assert not [p for p in cached if b"SECRET-BYTES" in p.read_bytes()]
    assert not (work / "datasets" / cache_dir_name(LocalStorage(root), "jobs/")).exists(), "jobs/ was synced"
    assert worker.alive
    log = worker.log()
    assert "Ignoring the 'download' key" in log
