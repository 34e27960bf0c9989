"""HTTP-only mode (ENABLE_RABBITMQ=false, HTTP_PORT set): real worker processes run the
jobs they are given over HTTP, through the same handlers, and stream their messages."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.procs import WorkerProcess
from tests.support.sse import SseEvent, events, free_port, wait_http
from tests.test_training import train_request

TERMINAL = {"training_completed", "training_failed", "training_cancelled"}


def http_only_worker(start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
                     **env: str) -> tuple[str, dict[str, str], WorkerProcess]:
    LocalStorage(Path(worker_env["STORAGE_DIR"])).upload_dir(shapes_dir, "datasets/shapes")
    port = free_port()
    full = {"ENABLE_RABBITMQ": "false", "HTTP_PORT": str(port), "RABBITMQ_HOST": "127.0.0.1:1", **env}
    worker = start_worker("train", env=full, wait_started=False, name="http-only")
    worker.wait_log("HTTP-only train worker on", timeout=120)
    base = f"http://127.0.0.1:{port}"
    wait_http(base)
    return base, full, worker


def test_an_http_only_worker_trains_a_posted_job_and_streams_every_message_then_refuses_its_job_id(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path) -> None:
    base, _, _ = http_only_worker(start_worker, worker_env, shapes_dir)
    answer = httpx.post(f"{base}/v1/train", json=train_request("http-only-1"), timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"job_id": "http-only-1", "events": "/v1/jobs/http-only-1/events"}

    seen = list(events(base + answer.json()["events"]))
    assert [e.type for e in seen] == ["training_started", "epoch_update", "epoch_update", "training_completed"]
    assert [e.data["current_epoch"] for e in seen if e.type == "epoch_update"] == [1, 2]
    assert len({e.id for e in seen}) == 4
    assert all(e.data["job_id"] == "http-only-1" for e in seen)
    assert (Path(worker_env["STORAGE_DIR"]) / seen[-1].data["model_path"]).is_file()

    job = httpx.get(f"{base}/v1/jobs/http-only-1", timeout=10).json()
    assert job["op"] == "train"
    assert job["state"] == "completed"
    assert job["progress"] == 100.0
    assert job["terminal"] == seen[-1].data
    assert job["last_update"] == seen[2].data

    # The same bodies and message_ids as the queues would carry, in the event log on disk.
    log_file = Path(worker_env["WORK_DIR"]) / "events" / "train" / "http-only-1.jsonl"
    assert [json.loads(line)["id"] for line in log_file.read_text().splitlines()] == [e.id for e in seen]

    again = httpx.post(f"{base}/v1/train", json=train_request("http-only-1"), timeout=30)
    assert again.status_code == 409, again.text
    resumed = list(events(f"{base}/v1/jobs/http-only-1/events", last_event_id=seen[1].id))
    assert [e.id for e in resumed] == [e.id for e in seen[2:]]


def test_an_http_only_worker_answers_400_404_429_and_cancels_a_running_job(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path) -> None:
    base, _, _ = http_only_worker(start_worker, worker_env, shapes_dir)
    bad = train_request("http-bad", epochs=0)
    del bad["hyperparams"]["imgsz"]
    answer = httpx.post(f"{base}/v1/train", json=bad, timeout=30)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["type"] == "training_failed"
    assert body["job_id"] == "http-bad"
    assert body["error_code"] == "invalid_request"
    assert "hyperparams.epochs" in body["error_message"]
    assert "hyperparams.imgsz" in body["error_message"]
    assert httpx.get(f"{base}/v1/jobs/http-bad", timeout=10).status_code == 404
    assert httpx.get(f"{base}/v1/jobs/nobody/events", timeout=10).status_code == 404

    long = httpx.post(f"{base}/v1/train", json=train_request("http-long", epochs=300), timeout=30)
    assert long.status_code == 202, long.text
    busy = httpx.post(f"{base}/v1/train", json=train_request("http-next"), timeout=30)
    assert busy.status_code == 429, busy.text
    assert int(busy.headers["Retry-After"]) > 0
    assert httpx.get(f"{base}/v1/jobs/http-next", timeout=10).status_code == 404  # not taken

    seen: list[SseEvent] = []
    for event in events(f"{base}/v1/jobs/http-long/events"):
        seen.append(event)
        if event.type == "epoch_update":
            running = httpx.get(f"{base}/v1/jobs/http-long", timeout=10).json()
            assert running["state"] == "running"
            assert running["terminal"] is None
            assert httpx.post(f"{base}/v1/jobs/http-long/cancel", timeout=10).status_code == 202
    assert seen[-1].type == "training_cancelled", [e.type for e in seen]
    assert sum(e.type in TERMINAL for e in seen) == 1
    assert seen[-1].data["current_epoch"] < 300
    assert httpx.get(f"{base}/v1/jobs/http-long", timeout=10).json()["state"] == "cancelled"
    # Not busy any more.
    assert httpx.post(f"{base}/v1/train", json=train_request("http-next"), timeout=30).status_code == 202


def test_an_http_only_job_killed_mid_training_resumes_on_restart_and_its_stream_continues_without_gap_or_repeat(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path) -> None:
    epochs = 6
    base, env, worker = http_only_worker(start_worker, worker_env, shapes_dir, LEASE_SECONDS="3")
    answer = httpx.post(f"{base}/v1/train", json=train_request("http-kill", epochs=epochs), timeout=30)
    assert answer.status_code == 202, answer.text
    url = base + answer.json()["events"]

    before: list[SseEvent] = []
    for event in events(url):
        before.append(event)
        if event.type == "epoch_update" and event.data["current_epoch"] == 2:
            break
    worker.kill()  # SIGKILL: no hand-back, the lease runs out

    restarted = start_worker("train", env=env, wait_started=False, name="http-only")
    restarted.wait_log("HTTP-only train worker on", timeout=120)
    wait_http(base)
    after = list(events(url, last_event_id=before[-1].id, timeout=150))
    restarted.wait_log("Resuming after the restart")

    seen = before + after
    assert len({e.id for e in seen}) == len(seen), "a message came twice"
    assert [e.data["current_epoch"] for e in seen if e.type == "epoch_update"] == list(range(1, epochs + 1))
    assert [e.type for e in seen if e.type in TERMINAL] == ["training_completed"]
    assert seen[-1].type in TERMINAL
    starts = [e.data for e in seen if e.type == "training_started"]
    assert starts[0]["resumed_from_epoch"] == 0
    assert starts[-1]["resumed_from_epoch"] >= 1
    # The whole stream, read again from the start, is the same messages.
    assert [e.id for e in events(url)] == [e.id for e in seen]



def test_submit_and_demo_with_http_follow_an_http_only_worker_with_the_bearer_token_from_the_environment(
        start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path, tmp_path: Path) -> None:
    from tests.test_cli import REPO, cli_args, cli_env

    poison = tmp_path / "poison"  # the BE-side commands never import torch / Ultralytics
    for name in ("torch", "ultralytics"):
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} imported by a BE-side command')\n")
    base, _, _ = http_only_worker(start_worker, worker_env, shapes_dir, HTTP_TOKEN="tok-1")
    env = {**worker_env, "ENABLE_RABBITMQ": "false", "HTTP_TOKEN": "tok-1"}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_args(*args), cwd=REPO, env=cli_env({**env, **extra}, poison), capture_output=True,
                              text=True, timeout=300)

    train = ("submit", "train", "--http", base, "--dataset", "datasets/shapes/", "--epochs", "2", "--imgsz", "64",
             "--batch", "8")
    refused = cli(*train, "--job-id", "cli-refused", "--follow", HTTP_TOKEN="wrong")
    assert refused.returncode == 2, refused.stderr
    assert "HTTP 401" in refused.stderr, refused.stderr
    done = cli(*train, "--job-id", "cli-http", "--follow")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["type"] == "training_completed"
    assert "training started on test/http-only (2 epochs)" in done.stderr
    assert "epoch 2/2" in done.stderr
    again = cli(*train, "--job-id", "cli-http")
    assert again.returncode == 2, again.stderr
    assert "HTTP 409" in again.stderr, again.stderr

    demo = cli("demo", "--http", base, "--epochs", "1", "--imgsz", "64", "--images", "16", "--job-id", "demo-http")
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout)["model_path"] == "models/demo/shapes-demo-http.pt"


def test_an_event_log_keeps_each_message_once_in_order_and_reloads_from_disk(tmp_path: Path) -> None:
    from ai_service.http.outbox import EventLog

    path = tmp_path / "events" / "train" / "job.jsonl"
    log = EventLog(path)
    log.append("update", "training_started", {"type": "training_started"}, "m1")
    log.append("update", "epoch_update", {"type": "epoch_update", "current_epoch": 1, "progress": 50.0}, "m2")
    log.append("update", "epoch_update", {"type": "epoch_update", "current_epoch": 1, "progress": 50.0}, "m2b")
    log.append("update", "training_started", {"type": "training_started"}, "m1")
    log.append("result", "training_completed", {"type": "training_completed", "progress": 100.0}, "m3")
    log.append("result", "training_failed", {"type": "training_failed"}, "m4")
    assert [e.id for e in log.entries] == ["m1", "m2", "m3"]
    again = EventLog(path)
    assert [e.id for e in again.entries] == ["m1", "m2", "m3"]
    assert again.terminal is not None
    assert again.index_after("m2") == 2
    assert again.index_after("unknown") == 0
    assert again.progress == 100.0
    with open(path, "ab") as torn:
        torn.write(b'{"id": "m5", "kind"')  # a line cut by a crash is skipped
    assert [e.id for e in EventLog(path).entries] == ["m1", "m2", "m3"]
