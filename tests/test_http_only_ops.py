"""HTTP-only mode (ENABLE_RABBITMQ=false, HTTP_PORT set) for conversion and inference, and
under supervisord: `ENABLE_RABBITMQ=false make run` serves training, conversion and
inference over HTTP."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.procs import WorkerProcess
from tests.support.sse import events, free_port, wait_http
from tests.test_conversion import convert_request
from tests.test_inference import BASE_ENV, b64, put_model, request, shapes
from tests.test_operations import Supervisor, supervisor  # noqa: F401 - supervisor is a fixture

MODEL = "models/shapes.pt"
NO_BROKER = {"ENABLE_RABBITMQ": "false", "RABBITMQ_HOST": "127.0.0.1:1"}


def http_only(start_worker: WorkerFactory, op: str, **env: str) -> tuple[str, WorkerProcess]:
    port = free_port()
    worker = start_worker(op, env={**NO_BROKER, "HTTP_PORT": str(port), **env}, wait_started=False,
                          name=f"http-only-{op}")
    worker.wait_log(f"HTTP-only {op} worker on", timeout=180)
    base = f"http://127.0.0.1:{port}"
    wait_http(base)
    return base, worker


def test_an_http_only_conversion_worker_converts_a_posted_job_and_streams_its_messages_with_the_artifact(
        start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any]) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_file(Path(trained_model["model"]), MODEL)
    base, worker = http_only(start_worker, "convert", DEVICE="cpu")

    answer = httpx.post(f"{base}/v1/convert", json=convert_request("http-conv", ["onnx"]), timeout=30)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"job_id": "http-conv", "events": "/v1/jobs/http-conv/events"}

    seen = list(events(base + answer.json()["events"], timeout=300))
    assert [e.type for e in seen] == ["conversion_started", "conversion_update", "conversion_completed"], \
        [(e.type, e.data) for e in seen]
    assert all(e.data["job_id"] == "http-conv" for e in seen)
    assert len({e.id for e in seen}) == 3
    assert seen[0].data["formats"] == ["onnx"]
    done = seen[-1].data
    assert done["status"] == "completed", done
    assert done["progress"] == 100.0, done
    (artifact,) = done["artifacts"]
    assert artifact["format"] == "onnx"
    assert artifact["path"] == "models/exports/shapes.onnx"
    assert artifact["verified"] is True, artifact
    assert seen[1].data["current_format"] == "onnx"
    assert seen[1].data["artifact"] == artifact
    exported = Path(worker_env["STORAGE_DIR"]) / artifact["path"]
    assert exported.is_file()
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == artifact["sha256"]

    # Provenance: the record inference checks before it loads the artifact.
    record = json.loads(storage.read_bytes(f"jobs/artifacts/{artifact['sha256']}.json"))
    assert (record["format"], record["path"], record["source_model"], record["job_id"]) == (
        "onnx", artifact["path"], MODEL, "http-conv")

    job = httpx.get(f"{base}/v1/jobs/http-conv", timeout=10).json()
    assert job["op"] == "convert"
    assert job["state"] == "completed"
    assert job["terminal"] == done
    log_file = Path(worker_env["WORK_DIR"]) / "events" / "convert" / "http-conv.jsonl"
    assert [json.loads(line)["id"] for line in log_file.read_text().splitlines()] == [e.id for e in seen]
    assert "RabbitMQ consumer started" not in worker.log()


def test_an_http_only_inference_worker_answers_a_posted_request_with_detections(
        start_worker: WorkerFactory, worker_env: dict[str, str], trained_model: dict[str, Any]) -> None:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    put_model(storage, {"files": {"pt": trained_model["model"]}}, "pt", MODEL)
    raw, _ = shapes(3)
    storage.write_bytes("images/three.png", raw)
    base, worker = http_only(start_worker, "infer", **BASE_ENV)

    body = request("http-only-infer", MODEL, [{"path": "images/three.png"}, {"data": b64(shapes(4)[0])}])
    answer = httpx.post(f"{base}/v1/infer", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    done = answer.json()
    assert done["type"] == "inference_completed", done
    assert done["job_id"] == "http-only-infer", done
    assert done["model_path"] == MODEL
    assert [r["image"] for r in done["results"]] == ["images/three.png", "1"]
    assert sum(len(r["detections"]) for r in done["results"]) > 0, done
    for result in done["results"]:
        for det in result["detections"]:
            assert det["class_name"] in ("circle", "square"), det
            assert 0 < det["confidence"] <= 1, det

    missing = httpx.post(f"{base}/v1/infer", json=request("http-only-404", "models/nope.pt", body["images"]),
                         timeout=60)
    assert missing.status_code == 404, missing.text
    assert "RabbitMQ consumer started" not in worker.log()


def _ports(include: str) -> dict[str, dict[str, int]]:
    """Each program's HTTP_PORT and METRICS_PORT, as the include sets them."""
    out: dict[str, dict[str, int]] = {}
    program = None
    for line in include.splitlines():
        if match := re.match(r"\[program:(.+)\]", line):
            program = match.group(1)
        elif line.startswith("environment=") and program is not None:
            out[program] = {key: int(value) for key, value in re.findall(r'(HTTP_PORT|METRICS_PORT)="(\d+)"', line)}
    return out


@pytest.mark.xdist_group("supervisord")
def test_supervisord_with_rabbitmq_disabled_keeps_every_program_running_and_each_serves_http(
        supervisor: Supervisor, tmp_path: Path) -> None:  # noqa: F811
    names = supervisor.configure("--train-gpus", "cpu", "--convert-gpus", "cpu", "--infer-gpus", "cpu")
    assert names == {"ai:train-cpu0", "ai:convert-cpu0", "ai:infer-cpu0"}
    include_path = supervisor.root / "supervisor.d" / "workers.conf"
    include = include_path.read_text()
    generated = _ports(include)
    assert set(generated) == {n.split(":")[1] for n in names}
    assert all(set(p) == {"HTTP_PORT", "METRICS_PORT"} for p in generated.values()), generated
    # The fixed 81nn/91nn... ports could be taken by a parallel test: move each to a free one.
    for ports in generated.values():
        for key, port in ports.items():
            include = include.replace(f'{key}="{port}"', f'{key}="{free_port()}"', 1)
    include_path.write_text(include)
    http_ports = {name: ports["HTTP_PORT"] for name, ports in _ports(include).items()}
    assert len(set(http_ports.values())) == 3

    supervisor.env.update({**NO_BROKER, "WORK_DIR": str(tmp_path / "work"), "STORAGE_DIR": str(tmp_path / "storage")})
    supervisor.start()
    pids = supervisor.wait_running(names, timeout=300)
    for process, port in http_ports.items():
        wait_http(f"http://127.0.0.1:{port}", timeout=240)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, (process, ready.text)
        assert "HTTP-only" in ready.text, (process, ready.text)
    # They stay up: same processes, still RUNNING, a while after all of them serve.
    time.sleep(6)
    states = supervisor.status()
    assert {n: states[n] for n in names} == {n: ("RUNNING", pid) for n, pid in pids.items()}, supervisor.logs()
    for process in http_ports:
        log = (supervisor.root / "logs" / f"{process}.log").read_text()
        op = process.split("-")[0]
        assert f"HTTP-only {op} worker on" in log, log
        assert "has nothing to do" not in log, log
    # The job routes are there (a bad request is answered 400 by the worker, not 404).
    bad = httpx.post(f"http://127.0.0.1:{http_ports['convert-cpu0']}/v1/convert", json={"job_id": "x"}, timeout=30)
    assert bad.status_code == 400, bad.text
