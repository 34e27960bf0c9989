"""Worker heartbeats (``worker.<state>.<name>`` on EVENTS_EXCHANGE) and ``ai-service workers``,
through real worker processes on the real broker, with ``HEARTBEAT_SECONDS=1``.

Run as a module (``python -m tests.test_heartbeats``) this file is also a stub worker:
the real runtime with a handler that publishes one ``epoch_update`` (progress 25.0),
then runs for ``hyperparams.epochs`` tenths of a second (or until asked to stop) and
answers ``training_completed``.  It never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ai_service.config import Settings
from ai_service.errors import AIServiceError
from ai_service.messages import EpochUpdate, TrainingCompleted, TrainingFailed, TrainingRequest
from ai_service.operation import JobContext, Operation

if TYPE_CHECKING:
    from tests.conftest import WorkerFactory
    from tests.support.amqp import BE, Received

REPO = Path(__file__).resolve().parents[1]
STUB = "tests.test_heartbeats"
FAST = {"HEARTBEAT_SECONDS": "1", "DEVICE": "cpu"}
FIELDS = {"type", "worker", "name", "operation", "state", "device", "gpu", "job_id", "progress", "jobs_running",
          "versions", "pid", "host", "started_at", "interval_seconds", "timestamp"}


# --- the stub worker -------------------------------------------------------------------


def _stub_handle(request: TrainingRequest, ctx: JobContext) -> None:
    started = time.monotonic()
    ctx.update(EpochUpdate(job_id=request.job_id, current_epoch=1, total_epochs=4, progress=25.0, metrics={}))
    deadline = started + request.hyperparams.epochs / 10
    while time.monotonic() < deadline and not (ctx.shutdown.is_set() or ctx.cancelled.is_set()):
        time.sleep(0.05)
    ctx.result(TrainingCompleted(job_id=request.job_id, model_path=request.output.model_key, final_metrics={},
                                 training_time=round(time.monotonic() - started, 3)))


def _stub_failure(job_id: str, error: AIServiceError) -> TrainingFailed:
    return TrainingFailed(job_id=job_id, error_code=error.error_code, error_message=error.message)


def _stub_main() -> int:
    from ai_service.cli import exit_now_if_forced
    from ai_service.logs import setup_logging
    from ai_service.worker import run_worker

    settings = Settings.from_env().for_program("heartbeat-stub")
    setup_logging(settings, op="train")
    op = Operation(name="train", request_model=TrainingRequest, handler=_stub_handle, failure=_stub_failure)
    return exit_now_if_forced(run_worker(settings, "train", lambda _: op))


# --- helpers ---------------------------------------------------------------------------


def request(job_id: str, tenths: int) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": "sleep", "epochs": tenths, "batch": 16, "imgsz": 640},
    }


def listen(be: BE) -> str:
    """An exclusive queue of the test's own, bound to every heartbeat."""
    queue = str(be.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue)
    be.channel.queue_bind(queue, be.settings.events_exchange, routing_key="worker.#")
    return queue


def beat(be: BE, queue: str, name: str, timeout: float = 30.0, **want: Any) -> Received:
    """The next heartbeat of worker ``name`` (routing name) whose body has ``want``."""
    return be.wait_for(queue, lambda m: m.type == "worker_heartbeat" and m.body.get("name") == name
                       and all(m.body.get(k) == v for k, v in want.items()), timeout)


def parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    assert ts.utcoffset() == timedelta(0), value
    return ts


def poisoned_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment, with torch and ultralytics unimportable (BE side)."""
    root = tmp_path / "poison"
    for name in ("torch", "ultralytics"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('the BE side must not import {name}')\n")
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **env, **FAST, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class WorkersCommand:
    """``ai-service workers ARGS`` as a subprocess; stderr says when it listens."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ai_service.cli", "workers", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = ""

    def wait_listening(self) -> float:
        assert self.proc.stderr is not None
        while "listening" not in self.stderr:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"`ai-service workers` ended before listening:\n{self.finish()}")
            self.stderr += line
        return time.monotonic()

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        out, rest = self.proc.communicate(timeout=timeout)
        self.stderr += rest
        return self.proc.returncode, out, self.stderr


def by_worker(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["worker"]: row for row in rows}


# --- tests -----------------------------------------------------------------------------


def test_a_worker_publishes_an_ephemeral_heartbeat_every_interval_with_every_field(
    be: BE, start_worker: WorkerFactory
) -> None:
    queue = listen(be)
    worker = start_worker(module=STUB, name="beat.1#a*b", env=FAST)  # WORKER_NAME test/beat.1#a*b
    assert worker.proc is not None
    name = "test/beat_1_a_b/train"  # dots, # and * replaced; the operation appended
    beats = [beat(be, queue, name, state="idle") for _ in range(4)]

    first = beats[0]
    assert first.routing_key == f"worker.idle.{name}"
    assert set(first.body) == FIELDS
    versions = {p: importlib.metadata.version(p) for p in ("ai-service", "ultralytics", "torch")}
    assert {k: v for k, v in first.body.items() if k not in ("started_at", "timestamp")} == {
        "type": "worker_heartbeat", "worker": "test/beat.1#a*b", "name": name, "operation": "train",
        "state": "idle", "device": "cpu", "gpu": None, "job_id": None, "progress": None, "jobs_running": 0,
        "versions": versions, "pid": worker.proc.pid, "host": socket.gethostname(), "interval_seconds": 1.0,
    }
    assert parse_ts(first.body["started_at"]) <= parse_ts(first.body["timestamp"])
    props = first.properties
    assert (props.delivery_mode, props.expiration, props.type, props.app_id, props.content_type) == (
        1, "3000", "worker_heartbeat", "ai-service", "application/json")
    assert props.message_id
    assert props.timestamp

    stamps = [parse_ts(b.body["timestamp"]) for b in beats]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert all(0.7 <= gap <= 1.6 for gap in gaps), gaps
    assert len({b.properties.message_id for b in beats}) == len(beats)
    assert {b.body["started_at"] for b in beats} == {first.body["started_at"]}

    # mandatory=False: with nobody bound, beats are dropped by the broker, not returned
    be.channel.queue_unbind(queue, be.settings.events_exchange, routing_key="worker.#")
    time.sleep(2.5)
    assert worker.alive
    assert "unroutable" not in worker.log(), worker.log()[-2000:]


def test_a_worker_running_a_job_reports_busy_with_its_job_id_and_progress(
    be: BE, start_worker: WorkerFactory
) -> None:
    queue = listen(be)
    start_worker(module=STUB, name="busy", env=FAST)
    name = "test/busy/train"
    beat(be, queue, name, state="idle", job_id=None)

    be.send_train(request("beat-job", tenths=40))
    busy = beat(be, queue, name, timeout=10, state="busy", job_id="beat-job", progress=25.0)
    assert busy.routing_key == f"worker.busy.{name}"
    assert busy.body["jobs_running"] == 1

    done = be.terminal(be.settings.train_result_queue, "beat-job", timeout=30)
    assert done.type == "training_completed"
    idle = beat(be, queue, name, timeout=10, state="idle")
    assert (idle.body["job_id"], idle.body["progress"], idle.body["jobs_running"]) == (None, None, 0)


def test_ai_service_workers_lists_two_live_workers_and_exits_6_when_there_is_none(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], tmp_path: Path
) -> None:
    env = poisoned_env(tmp_path, worker_env)
    nobody = WorkersCommand(env, "--wait", "1.5")
    rc, out, err = nobody.finish()
    assert rc == 6, (rc, out, err)
    assert out == "", (rc, out, err)
    assert "no worker heartbeat" in err, (rc, out, err)

    import torch

    cuda = torch.cuda.is_available()
    start_worker("convert", name="conv", env={"HEARTBEAT_SECONDS": "1"})  # the real `ai-service worker convert`
    start_worker(module=STUB, name="stub", env=FAST)

    rc, out, err = WorkersCommand(env).finish()  # 1.5 intervals by default
    assert rc == 0, (rc, out, err)
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["WORKER", "OP", "STATE", "DEVICE"], out
    assert len(lines) == 3, out
    conv, stub = lines[1].split(), lines[2].split()
    assert conv[:4] == ["test/conv", "convert", "idle", "cuda:0" if cuda else "cpu"], out
    assert stub[:6] == ["test/stub", "train", "idle", "cpu", "-", "-"], out
    version = importlib.metadata.version("ai-service")
    assert all(f"ai-service {version}" in line and "s ago" in line for line in lines[1:]), out
    assert "2 worker(s) heard" in err

    rc, out, err = WorkersCommand(env, "--json").finish()
    assert rc == 0, (rc, out, err)
    rows = by_worker(json.loads(out))
    assert set(rows) == {"test/conv", "test/stub"}
    assert rows["test/conv"]["operation"] == "convert"
    assert rows["test/conv"]["status"] == "idle"
    assert rows["test/conv"]["device"] == ("cuda:0" if cuda else "cpu")
    assert (rows["test/conv"]["gpu"] is not None) == cuda
    assert rows["test/conv"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert all(row["age_seconds"] < 3 for row in rows.values()), rows


def test_a_sigkilled_worker_is_shown_as_lost_within_three_intervals(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], tmp_path: Path
) -> None:
    doomed = start_worker(module=STUB, name="doomed", env=FAST)
    start_worker(module=STUB, name="alive", env=FAST)
    command = WorkersCommand(poisoned_env(tmp_path, worker_env), "--wait", "6", "--json")
    listening = command.wait_listening()
    time.sleep(1.5)  # both beat at least once into the command's queue
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    killed = time.monotonic() - listening
    rc, out, err = command.finish()
    assert rc == 0, (rc, out, err)
    rows = by_worker(json.loads(out))
    assert rows["test/alive"]["status"] == "idle", rows
    assert rows["test/doomed"]["status"] == "lost", rows
    assert rows["test/doomed"]["state"] == "idle"  # its last word; the listener calls it lost
    assert 3 < rows["test/doomed"]["age_seconds"] <= 6 - killed + 1.5, (killed, rows)


def test_a_sigtermed_worker_is_shown_as_stopped(
    be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], tmp_path: Path
) -> None:
    queue = listen(be)
    leaving = start_worker(module=STUB, name="leaving", env=FAST)
    start_worker(module=STUB, name="staying", env=FAST)
    command = WorkersCommand(poisoned_env(tmp_path, worker_env), "--wait", "4", "--json")
    command.wait_listening()
    time.sleep(1.5)
    leaving.signal(signal.SIGTERM)
    assert leaving.wait(20) == 0
    rc, out, err = command.finish()
    assert rc == 0, (rc, out, err)
    rows = by_worker(json.loads(out))
    assert rows["test/staying"]["status"] == "idle", rows
    assert (rows["test/leaving"]["status"], rows["test/leaving"]["state"]) == ("stopped", "stopped"), rows

    last = beat(be, queue, "test/leaving/train", state="stopped", timeout=5)
    assert last.routing_key == "worker.stopped.test/leaving/train"
    time.sleep(1.5)
    after = [m.routing_key for m in be.drain(queue) if m.body.get("name") == "test/leaving/train"]
    assert after == [], after  # stopped was its last word


if __name__ == "__main__":
    sys.exit(_stub_main())
