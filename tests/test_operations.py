"""Operations: supervisord from the repository's config (a bare shell, GPU pinning, its own death),
parent-death handling, metrics and health, JSON logs."""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ai_service.config import Settings
from ai_service.spool import Envelope, Spool
from ai_service.worker import EXIT_CONFIG, adopt_legacy_spool, spool_dir
from tests.conftest import WorkerFactory
from tests.support.amqp import BE, BrokerNames
from tests.support.procs import REPO, STARTED
from tests.support.proxy import CuttableProxy
from tests.test_runtime import SLEEPY, request
from tests.test_spool import legacy_file
from tests.test_supervisor import TWO_GPUS, fake_nvidia_smi

BIN = Path(sys.executable).parent


#: A bare shell: nothing exported but PATH and HOME (`env -i PATH=/usr/bin:/bin HOME=$HOME`).
BARE = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}


class Supervisor:
    """supervisord running the repository's supervisord.conf from a scratch deployment
    directory (the config, ``.venv`` linked, ``logs/``), in a bare environment.

    ``env`` is all that supervisord -- and so every worker -- gets besides :data:`BARE`:
    the tests pass only the per-test queue and exchange names (a test concern: a real
    deployment uses the default names). WORK_DIR and STORAGE_DIR are the defaults,
    ``.work`` and ``data`` under the deployment directory.
    """

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        (root / "logs").mkdir(parents=True)
        shutil.copy(REPO / "supervisord.conf", root / "supervisord.conf")
        (root / ".venv").symlink_to(REPO / ".venv")
        self.env = {**BARE, **env}
        self.conf = str(root / "supervisord.conf")
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, *flags: str, path: Path | None = None) -> set[str]:
        """Run `ai-service supervisor-config` as `make install` would (default output, from the
        deployment directory, bare environment; ``path`` first on PATH); returns the process names."""
        env = {**BARE, "PATH": f"{path}:{BARE['PATH']}" if path else BARE["PATH"]}
        done = subprocess.run([str(self.root / ".venv" / "bin" / "ai-service"), "supervisor-config", *flags],
                              cwd=self.root, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        include = (self.root / "supervisor.d" / "workers.conf").read_text()
        programs = next(line for line in include.splitlines() if line.startswith("programs="))
        return {f"ai:{name}" for name in programs.split("=", 1)[1].split(",")}

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.root / ".venv" / "bin" / "supervisord"), "-n", "-c", self.conf],
                                     cwd=self.root, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

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

    def wait_log_count(self, text: str, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.logs(tail=None).count(text) < count:
            time.sleep(0.5)
        assert self.logs(tail=None).count(text) == count, self.logs()

    def logs(self, tail: int | None = 1500) -> str:
        files = sorted((self.root / "logs").glob("*.log")) + sorted((self.root / ".work" / "orphaned").glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail if tail else 0:]}" for p in files)

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.fixture
def supervisor(tmp_path: Path, names: BrokerNames) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path / "deploy", names.env())
    yield sup
    sup.shutdown()
    # Whatever a failed test left running under it (or orphaned) must not outlive the test.
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if f"TRAIN_REQUEST_QUEUE={names.env()['TRAIN_REQUEST_QUEUE']}".encode() in environ.split(b"\0"):
            with contextlib.suppress(OSError):
                os.kill(int(proc_dir.name), signal.SIGKILL)


@pytest.mark.xdist_group("supervisord")
def test_supervisord_from_a_bare_shell_runs_every_program_pinned_to_its_gpu_and_restarts_one_alone(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    # Two GPUs (an explicit fake nvidia-smi) for the training workers, one each for the others.
    smi = fake_nvidia_smi(tmp_path / "smi", TWO_GPUS)
    names = supervisor.configure("--convert-gpus", "1", "--infer-gpus", "0", path=smi)
    assert names == {"ai:train-gpu0", "ai:train-gpu1", "ai:convert-gpu1", "ai:infer-gpu0"}
    supervisor.start()
    pids = supervisor.wait_running(names, timeout=300)
    ports = {"train": 9100, "convert": 9200, "infer": 9300}
    for name, pid in pids.items():
        environ = environ_of(pid)
        process = name.split(":")[1]
        op, gpu = process.split("-gpu")
        assert environ["CUDA_VISIBLE_DEVICES"] == gpu, name
        assert environ["METRICS_PORT"] == str(ports[op] + int(gpu)), name
        assert environ["WORKER_NAME"] == f"{socket.gethostname()}/{process}", environ["WORKER_NAME"]
        assert environ["SUPERVISOR_ENABLED"] == "1"
        assert not [k for k in environ if k.startswith("AI_")], environ
    # Each one really started consuming (the contract's start-up line).
    supervisor.wait_log_count("✅ RabbitMQ consumer started", 4, timeout=300)

    # Restarting one worker leaves the others alone.
    supervisor.ctl("restart", "ai:train-gpu0")
    after = supervisor.wait_running(names, timeout=300)
    assert after["ai:train-gpu0"] != pids["ai:train-gpu0"]
    assert {n: p for n, p in after.items() if n != "ai:train-gpu0"} == {
        n: p for n, p in pids.items() if n != "ai:train-gpu0"
    }

    # Stop is warm: the worker logs its warm shutdown and exits cleanly.
    supervisor.ctl("stop", "ai:infer-gpu0")
    assert supervisor.status()["ai:infer-gpu0"][0] == "STOPPED"
    log = (supervisor.root / "logs" / "infer-gpu0.log").read_text()
    assert "warm shutdown" in log
    assert "Worker stopped cleanly" in log

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


@pytest.mark.xdist_group("supervisord")
def test_when_supervisord_is_killed_its_workers_stop_warmly_and_a_new_supervisord_starts_every_program(
    supervisor: Supervisor, record_property: Callable[[str, object], None]
) -> None:
    names = supervisor.configure()  # the default, as `make install` writes it on this machine
    supervisor.start()
    pids = supervisor.wait_running(names, timeout=300)
    supervisor.wait_log_count("✅ RabbitMQ consumer started", len(names), timeout=300)

    assert supervisor.proc is not None
    supervisor.proc.kill()  # as the OOM killer would
    supervisor.proc.wait(10)
    killed = time.monotonic()
    while time.monotonic() - killed < 30 and any(alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    gone_after = time.monotonic() - killed
    record_property("orphans_gone_s", round(gone_after, 2))
    assert not [n for n, pid in pids.items() if alive(pid)], f"orphans still running:\n{supervisor.logs()}"
    assert gone_after < 15, gone_after  # the lease period is 300 s
    # Each stopped warmly, on its own; its output went on in WORK_DIR/orphaned/.
    orphaned = supervisor.root / ".work" / "orphaned"
    for name in names:
        op = name.split(":")[1].split("-")[0]
        (path,) = orphaned.glob(f"*_{name.split(':')[1]}.{op}.log")
        log = path.read_text()
        assert "is gone" in log, log
        assert "warm shutdown" in log, log
        assert "Worker stopped cleanly" in log, log

    supervisor.start()
    again = supervisor.wait_running(names, timeout=300)
    assert not set(again.values()) & set(pids.values())
    supervisor.wait_log_count("✅ RabbitMQ consumer started", 2 * len(names), timeout=300)
    assert "is in use by another process" not in supervisor.logs(tail=None)


RELAY = """
import subprocess, sys
worker = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
with open(sys.argv[1] + ".pid", "w") as pid:
    pid.write(str(worker.pid))
with open(sys.argv[1], "ab", buffering=0) as log:
    for line in worker.stdout:
        log.write(line)
"""


def test_a_worker_whose_supervisor_dies_mid_job_finishes_it_warmly_and_exits_on_its_own(
    be: BE, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # A stand-in supervisor: runs the worker with SUPERVISOR_ENABLED and its output on a pipe.
    relay_log = tmp_path / "relay.log"
    env = {**os.environ, **worker_env, "WORKER_NAME": "test/orphan", "SUPERVISOR_ENABLED": "1",
           "PYTHONUNBUFFERED": "1"}
    relay = subprocess.Popen([sys.executable, "-c", RELAY, str(relay_log), sys.executable, "-m", SLEEPY],
                             cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and STARTED not in (relay_log.read_text() if relay_log.exists() else ""):
            time.sleep(0.1)
        assert STARTED in relay_log.read_text()
        worker_pid = int(Path(f"{relay_log}.pid").read_text())
        be.send_train(request("orphan-1", tenths=40))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "[orphan-1] sleeping" not in relay_log.read_text():
            time.sleep(0.1)
        assert "[orphan-1] sleeping" in relay_log.read_text()
        relay.kill()
        relay.wait(10)
        # The job is finished (warm), answered once, and the worker leaves by itself.
        done = be.terminal(be.settings.train_result_queue, "orphan-1", timeout=30)
        assert done.type == "training_completed", done.body
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and alive(worker_pid):
            time.sleep(0.1)
        assert not alive(worker_pid)
        log = (Path(worker_env["WORK_DIR"]) / "orphaned" / "test_orphan.train.log").read_text()
        assert "is gone" in log, log
        assert "warm shutdown" in log, log
        assert "Worker stopped cleanly" in log, log
        assert "Traceback" not in log, log
        assert "BrokenPipeError" not in log, log
    finally:
        relay.kill()
        with contextlib.suppress(NameError, OSError):
            os.kill(worker_pid, signal.SIGKILL)


def test_workers_of_different_operations_sharing_one_worker_name_and_work_dir_both_start(
    start_worker: WorkerFactory, worker_env: dict[str, str]
) -> None:
    shared = {"WORKER_NAME": "test/shared"}
    train = start_worker(module=SLEEPY, env=shared, name="shared-train")
    infer = start_worker("infer", env=shared, name="shared-infer")
    assert train.alive
    assert infer.alive
    spool = Path(worker_env["WORK_DIR"]) / "spool" / "test_shared"
    assert sorted(p.name for p in spool.iterdir() if p.is_dir()) == ["infer", "train"]
    # Two processes of one operation still may not share one.
    second = start_worker(module=SLEEPY, env=shared, name="shared-train-2", wait_started=False)
    assert second.wait(timeout=60) == EXIT_CONFIG
    assert "is in use by another process" in second.log()


def test_a_spool_left_in_the_old_layout_is_moved_into_its_operation_s_spool_once(tmp_path: Path) -> None:
    settings = Settings.from_env({"WORK_DIR": str(tmp_path / "work"), "WORKER_NAME": "gpu-01/train-gpu0"})
    old = tmp_path / "work" / "spool" / "gpu-01_train-gpu0"  # before the operation was part of the path
    for n in range(3):  # as that older version spooled them: one <seq>.msg file each
        legacy_file(old, n + 1, Envelope("ex", f"train.result.{n}", b'{"n": %d}' % n, {"message_id": f"m{n}"}))

    assert adopt_legacy_spool(settings, "train") == 3
    assert spool_dir(settings, "train") == old / "train"
    moved = Spool(spool_dir(settings, "train"), max_messages=10)
    left = moved.open()
    assert [e.message_id for e in left] == ["m0", "m1", "m2"]
    assert [e.body for e in left][2] == b'{"n": 2}'
    moved.close()
    assert list(old.glob("*.msg")) == []
    assert adopt_legacy_spool(settings, "convert") == 0  # nothing left for another operation


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
    assert entries
    assert all({"ts", "level", "message", "worker", "op", "job_id"} <= set(e) for e in entries)
    job_lines = [e for e in entries if e["job_id"] == "jsonlog1"]
    assert job_lines
    assert all(e["message"].startswith("[Handler]") for e in job_lines)
    assert {e["op"] for e in entries} == {"train"}
    assert all(e["worker"] == "test/train-0" for e in entries)
    assert all("guest" not in e["message"].replace("guest@", "") for e in entries)
