"""Operations: supervisord from the repository's config, metrics and health, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.support.procs import REPO
from tests.support.proxy import CuttableProxy
from tests.test_runtime import SLEEPY, request

BIN = Path(sys.executable).parent


class Supervisor:
    """supervisord running the repository's supervisord.conf from a scratch directory."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        (root / "logs").mkdir(parents=True)
        shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
        (root / ".venv").symlink_to(REPO / ".venv")
        self.env = {**os.environ, **env}
        self.conf = str(root / "supervisord.conf")
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", self.conf], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def ctl(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "supervisorctl"), "-c", self.conf, *args], env=self.env,
                             capture_output=True, text=True, timeout=120)
        return out.stdout

    def status(self) -> dict[str, tuple[str, int | None]]:
        states: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 2 and ":" in parts[0]:
                pid = int(parts[3].rstrip(",")) if len(parts) > 3 and parts[2] == "pid" else None
                states[parts[0]] = (parts[1], pid)
        return states

    def wait_running(self, names: set[str], timeout: float = 120) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        states: dict[str, tuple[str, int | None]] = {}
        while time.monotonic() < deadline:
            states = self.status()
            if names <= set(states) and all(states[n][0] == "RUNNING" for n in names):
                return {n: int(states[n][1] or 0) for n in names}
            time.sleep(0.5)
        raise AssertionError(f"not all RUNNING: {states}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.root / "logs").glob("*.log")))

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture
def supervisor(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[Supervisor]:
    env = {
        **worker_env,
        "AI_TRAIN_GPUS": "2", "AI_TRAIN_FIRST_GPU": "0",
        "AI_CONVERT_GPUS": "1", "AI_CONVERT_FIRST_GPU": "2",
        "AI_INFER_GPUS": "1", "AI_INFER_FIRST_GPU": "3",
    }
    env.pop("WORKER_NAME", None)
    sup = Supervisor(tmp_path / "deploy", env)
    yield sup
    sup.shutdown()


@pytest.mark.xdist_group("supervisord")
def test_supervisord_runs_every_worker_pinned_to_its_own_gpu_and_restarts_one_alone(
    supervisor: Supervisor,
) -> None:
    names = {"ai:train-gpu0", "ai:train-gpu1", "ai:convert-gpu2", "ai:infer-gpu3"}
    pids = supervisor.wait_running(names, timeout=300)
    for name, pid in pids.items():
        environ = environ_of(pid)
        assert environ["CUDA_VISIBLE_DEVICES"] == name[-1], name
        assert environ["WORKER_NAME"].endswith("/" + name.split(":")[1]), environ["WORKER_NAME"]
    # Each one really started consuming (the contract's start-up line).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and supervisor.logs().count("✅ RabbitMQ consumer started") < 4:
        time.sleep(1)
    assert supervisor.logs().count("✅ RabbitMQ consumer started") == 4, supervisor.logs()

    # Restarting one worker leaves the others alone.
    supervisor.ctl("restart", "ai:train-gpu0")
    after = supervisor.wait_running(names, timeout=300)
    assert after["ai:train-gpu0"] != pids["ai:train-gpu0"]
    assert {n: p for n, p in after.items() if n != "ai:train-gpu0"} == {
        n: p for n, p in pids.items() if n != "ai:train-gpu0"
    }

    # Stop is warm: the worker logs its warm shutdown and exits cleanly.
    supervisor.ctl("stop", "ai:infer-gpu3")
    assert supervisor.status()["ai:infer-gpu3"][0] == "STOPPED"
    log = (supervisor.root / "logs" / "infer-gpu3.log").read_text()
    assert "warm shutdown" in log and "Worker stopped cleanly" in log

    # A worker killed with SIGKILL is restarted.
    os.kill(after["ai:train-gpu1"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state, pid = supervisor.status().get("ai:train-gpu1", ("?", None))
        if state == "RUNNING" and pid not in (None, after["ai:train-gpu1"]):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"killed worker not restarted: {supervisor.status()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_status(url: str, code: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = get(url)
        except OSError:
            last = (0, "")
        if last[0] == code:
            return last[1]
        time.sleep(0.2)
    raise AssertionError(f"{url}: wanted {code}, last {last}")


def test_readyz_follows_the_broker_connection_and_metrics_count_a_finished_job(
    be: BE, start_worker: WorkerFactory
) -> None:
    proxy = CuttableProxy(5672)
    port = free_port()
    try:
        start_worker(module=SLEEPY, env={"RABBITMQ_PORT": str(proxy.port), "METRICS_PORT": str(port),
                                         "RECONNECT_MAX_DELAY": "1"})
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/healthz")[0] == 200
        wait_status(f"{base}/readyz", 200)
        proxy.cut()
        wait_status(f"{base}/readyz", 503)
        assert get(f"{base}/healthz")[0] == 200
        proxy.restore()
        wait_status(f"{base}/readyz", 200)
        be.send_train(request("metrics1"))
        be.terminal(be.settings.train_result_queue, "metrics1")
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = get(f"{base}/metrics")[1]
            if 'ai_jobs_total{op="train",status="completed"} 1.0' in text:
                break
            time.sleep(0.2)
        assert 'ai_jobs_total{op="train",status="completed"} 1.0' in text, text
        assert 'ai_broker_reconnects_total{component="consumer"}' in text
        assert "ai_publisher_spool_messages 0.0" in text
        assert "ai_consumer_state 2.0" in text
    finally:
        proxy.close()


def test_json_logs_parse_line_by_line_with_job_worker_and_op_and_no_password(
    be: BE, start_worker: WorkerFactory
) -> None:
    worker = start_worker(module=SLEEPY, env={"LOG_FORMAT": "json", "RABBITMQ_PASSWORD": "guest"},
                          wait_started=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "RabbitMQ consumer started" not in worker.log():
        time.sleep(0.2)
    be.send_train(request("jsonlog1"))
    be.terminal(be.settings.train_result_queue, "jsonlog1")
    worker.stop()
    entries = [json.loads(line) for line in worker.log().splitlines() if line.strip()]
    assert entries and all({"ts", "level", "message", "worker", "op", "job_id"} <= set(e) for e in entries)
    job_lines = [e for e in entries if e["job_id"] == "jsonlog1"]
    assert job_lines and all(e["message"].startswith("[Handler]") for e in job_lines)
    assert {e["op"] for e in entries} == {"train"}
    assert all(e["worker"] == "test/train-0" for e in entries)
    assert all("guest" not in e["message"].replace("guest@", "") for e in entries)
