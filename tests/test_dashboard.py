"""The dashboard: its state (unit), and the real page in headless Chromium driven by
Playwright against a real dashboard process, a real training worker and the broker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ai_service.dashboard.state import DashboardState, load_records
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.dashboard import ARTIFACTS, Dashboard, chromium, points_seen, watch_points


def epoch(job_id: str, n: int, total: int = 3, **metrics: float) -> dict[str, Any]:
    return {"type": "epoch_update", "job_id": job_id, "status": "running", "current_epoch": n,
            "total_epochs": total, "progress": 100.0 * n / total, "eta_seconds": 4.0 * (total - n),
            "metrics": {"train_loss": 3.0 - n, "mAP50": 0.2 * n, **metrics}}


# --- state (unit) ----------------------------------------------------------------------


def test_state_follows_a_job_from_its_messages_and_its_terminal_message_is_final() -> None:
    state = DashboardState()
    state.apply("train.update.j1", {"type": "training_started", "job_id": "j1", "status": "running",
                                    "total_epochs": 3, "worker": "host/train"})
    for n in (1, 2):
        state.apply("train.update.j1", epoch("j1", n))
    state.apply("train.result.j1", {"type": "training_failed", "job_id": "j1", "status": "failed",
                                    "current_epoch": 2, "error_code": "out_of_memory", "error_message": "OOM"})
    state.apply("train.update.j1", epoch("j1", 3))  # late: changes nothing
    job = state.job("train", "j1")
    assert job is not None
    assert job["state"] == "failed"
    assert job["error_code"] == "out_of_memory"
    assert job["worker"] == "host/train"
    assert [p["epoch"] for p in job["history"]] == [1.0, 2.0]
    assert job["history"][1]["mAP50"] == 0.4
    assert job["progress"] == pytest.approx(200 / 3)
    assert job["eta_seconds"] is None
    kinds = [c.kind for c in state.changes_after(0) or []]
    assert kinds == ["job"] * 5


def test_a_resumed_job_replaces_the_epochs_it_repeats_and_progress_never_goes_back() -> None:
    state = DashboardState()
    for n in (1, 2, 3, 2, 3):
        state.apply("train.update.j", epoch("j", n))
    job = state.job("train", "j")
    assert job is not None
    assert [p["epoch"] for p in job["history"]] == [1.0, 2.0, 3.0]
    assert job["progress"] == 100.0


def test_state_is_bounded_and_a_reader_left_behind_gets_none_for_a_fresh_snapshot() -> None:
    state = DashboardState(max_jobs=3, max_points=4, max_changes=5)
    for n in range(1, 10):
        state.apply("train.update.long", epoch("long", n, total=9))
    state.apply("convert.result.c0", {"type": "conversion_completed", "job_id": "c0", "status": "completed",
                                      "artifacts": [{"format": "onnx", "path": "m.onnx"}]})
    for i in range(1, 4):
        state.apply(f"infer.result.i{i}", {"type": "inference_completed", "job_id": f"i{i}", "status": "completed",
                                           "results": [{"image": "0", "detections": [{"class_id": 0}] * i}]})
    snapshot = state.snapshot()
    assert {j["job_id"] for j in snapshot["jobs"]} == {"long", "i2", "i3"}  # finished ones went first
    long = state.job("train", "long")
    assert long is not None
    assert [p["epoch"] for p in long["history"]] == [6.0, 7.0, 8.0, 9.0]
    infer = state.job("infer", "i3")
    assert infer is not None
    assert infer["terminal"]["detections"] == 3
    assert "results" not in infer["terminal"]
    assert state.changes_after(0) is None  # the log no longer reaches back: take a snapshot
    assert [c.seq for c in state.changes_after(snapshot["seq"] - 2) or []] == [snapshot["seq"] - 1, snapshot["seq"]]


def test_heartbeats_make_worker_rows(tmp_path: Path) -> None:
    state = DashboardState(max_workers=2)
    for name in ("a/train", "b/convert", "c/infer"):
        state.apply(f"worker.idle.{name}", {"type": "worker_heartbeat", "name": name, "worker": name.split("/")[0],
                                           "operation": name.split("/")[1], "state": "idle", "device": "cpu",
                                           "interval_seconds": 5.0})
    assert [w["name"] for w in state.snapshot()["workers"]] == ["b/convert", "c/infer"]


def test_records_in_storage_rebuild_jobs_with_their_last_epoch(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    running = {"job_id": "r", "op": "train", "status": "running", "owner": "w/train", "last_epoch": 4,
               "last_metrics": {"mAP50": 0.3, "train_loss": 1.5}, "updated": 2.0}
    done = {"job_id": "d", "op": "convert", "status": "completed", "updated": 1.0,
            "terminal": {"type": "conversion_completed", "job_id": "d", "status": "completed",
                         "artifacts": [{"format": "onnx", "path": "x.onnx"}]}}
    storage.write_bytes("jobs/train/r.json", json.dumps(running).encode())
    storage.write_bytes("jobs/convert/d.json", json.dumps(done).encode())
    storage.write_bytes("jobs/train/r/last.pt", b"not a record")
    storage.write_bytes("jobs/train/broken.json", b"{")
    state = DashboardState()
    assert load_records(state, storage, "jobs/") == 2
    job = state.job("train", "r")
    assert job is not None
    assert job["state"] == "running"
    assert job["current_epoch"] == 4
    assert job["history"] == [{"epoch": 4.0, "mAP50": 0.3, "train_loss": 1.5}]
    assert job["worker"] == "w/train"
    converted = state.job("convert", "d")
    assert converted is not None
    assert converted["state"] == "completed"
    assert converted["artifacts"][0]["format"] == "onnx"
    state.apply("train.update.r", epoch("r", 5, total=10))
    job = state.job("train", "r")
    assert job is not None
    assert [p["epoch"] for p in job["history"]] == [4.0, 5.0]
    assert job["total_epochs"] == 10


# --- the real page ---------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def dashboards(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    started: list[Dashboard] = []

    def start(**kwargs: Any) -> Dashboard:
        started.append(Dashboard(worker_env, tmp_path / f"dashboard-{len(started)}.log", **kwargs))
        return started[-1]

    yield start
    for dashboard in started:
        dashboard.stop()


def upload_shapes(worker_env: dict[str, str], shapes_dir: Path) -> None:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")


def train(job_id: str, epochs: int) -> dict[str, Any]:
    return {"job_id": job_id, "dataset": {"s3_prefix": "datasets/shapes/", "name": "shapes"},
            "output": {"prefix": "models", "model_name": f"{job_id}.pt"},
            "hyperparams": {"model": "yolov8n", "epochs": epochs, "batch": 16, "imgsz": 64}}


def test_the_page_shows_a_training_job_live_and_a_dashboard_started_mid_job_cancels_it_from_its_button(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, browser: Any,
    dashboards: Any,
) -> None:
    upload_shapes(worker_env, shapes_dir)
    first = dashboards()
    start_worker("train")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(first.url + "/")
    page.wait_for_selector('tr[data-worker="test/train-0/train"]', timeout=30_000)
    watch_points(page)

    be.send_train({**train("bad1", 3), "hyperparams": {"model": "yolov8n", "epochs": 0, "batch": 16, "imgsz": 64}})
    results = be.settings.train_result_queue
    assert be.terminal(results, "bad1", timeout=60).body["error_code"] == "invalid_request"
    page.click(f'tr[data-queue="{be.settings.train_request_queue}.dlq"] button[data-dlq="train"]', timeout=30_000)
    page.click('button[data-replay="train"]', timeout=30_000)  # back to the request queue: the worker answers again
    again = be.terminal(results, "bad1", timeout=60)
    assert again.type == "training_failed"
    assert again.body["error_code"] == "invalid_request"
    first.wait_for_log("Replayed 1 dead letter(s)")  # logged once the replay's connection closes

    be.send_train(train("dash1", 3))
    page.wait_for_selector('tr[data-job="train/dash1"]', timeout=60_000)
    page.wait_for_selector('tr[data-job="train/dash1"][data-state="completed"]', timeout=240_000)
    done = be.terminal(results, "dash1", timeout=60)
    assert done.type == "training_completed", done.body
    assert page.get_attribute("#charts", "data-points") == "3"
    assert points_seen(page) == [1, 2, 3]  # one point per epoch_update, as each came
    assert page.inner_text("#job-state") == "completed"
    assert "training_completed" in (page.text_content("#job-terminal") or "")
    assert page.locator("#chart-map canvas").count() == 1
    assert page.locator("#chart-loss canvas").count() == 1

    be.send_train(train("dash2", 200))
    be.wait_for(be.settings.train_update_queue,  # the second job has stored an epoch in its record
                lambda m: m.body.get("job_id") == "dash2" and m.type == "epoch_update", timeout=240)
    late = dashboards()  # started in the middle of dash2: rebuilt from the records
    page2 = browser.new_page(viewport={"width": 1400, "height": 1100})
    page2.goto(late.url + "/")
    page2.wait_for_selector('tr[data-job="train/dash1"][data-state="completed"]', timeout=30_000)
    page2.wait_for_selector('tr[data-job="train/dash2"][data-state="running"]', timeout=30_000)
    page2.wait_for_function("Number(document.getElementById('charts').dataset.points) >= 1", timeout=30_000)
    assert page2.inner_text("#job-title") == "train/dash2"
    watch_points(page2)
    page2.wait_for_function("window.pointsSeen.length >= 1", timeout=120_000)  # a live epoch adds a point

    page2.click('button[data-cancel="train/dash2"]')
    cancelled = be.terminal(be.settings.train_result_queue, "dash2", timeout=120)
    assert cancelled.type == "training_cancelled", cancelled.body
    page2.wait_for_selector('tr[data-job="train/dash2"][data-state="cancelled"]', timeout=30_000)
    page.wait_for_selector('tr[data-job="train/dash2"][data-state="cancelled"]', timeout=30_000)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page2.screenshot(path=str(ARTIFACTS / "dashboard-cancelled.png"), full_page=True)
    late.wait_for_log("Cancel sent for dash2")
    queues = httpx.get(late.url + "/v1/dashboard/state", timeout=10).json()["queues"]
    request_q = next(q for q in queues if q["queue"] == be.settings.train_request_queue)
    assert request_q["messages"] == 0
    assert request_q["consumers"] is not None
    dlq = next(q for q in queues if q["queue"] == be.settings.train_request_queue + ".dlq")
    assert dlq["messages"] == 1  # bad1, replayed once and dead-lettered again


def test_with_http_token_the_data_and_the_buttons_need_it_and_the_page_asks_for_it(
    worker_env: dict[str, str], dashboards: Any, browser: Any, be: BE,
) -> None:
    dashboard = dashboards(token="s3cret-token")
    assert httpx.get(dashboard.url + "/v1/dashboard/state", timeout=10).status_code == 401
    assert httpx.post(dashboard.url + "/v1/dashboard/jobs/train/x/cancel", timeout=10).status_code == 401
    auth = {"Authorization": "Bearer s3cret-token"}
    assert httpx.get(dashboard.url + "/v1/dashboard/state", headers=auth, timeout=10).json()["connected"] is True
    assert httpx.get(dashboard.url + "/healthz", timeout=10).status_code == 200
    page = browser.new_page()
    page.goto(dashboard.url + "/")
    page.wait_for_selector("#token-form:not([hidden])", timeout=30_000)
    page.fill("#token", "s3cret-token")
    page.click("#token-form button")
    page.wait_for_selector("#broker.on", timeout=30_000)
    assert "s3cret-token" not in dashboard.log()
