"""What the benchmark and the soak share: statistics, processes, a BE stand-in, the machine.

Everything talks to services on loopback only: the shared RabbitMQ (through unique queue
names), a private RabbitMQ node, a SeaweedFS server started for the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

REPO = Path(__file__).resolve().parents[1]
STARTED = "✅ RabbitMQ consumer started"


# --- statistics ------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Figure:
    """One measured quantity: the values of the repeated runs and how to show them."""

    key: str
    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""
    #: name of the figure this one is compared with (same section), if any
    baseline: str | None = None
    #: "lower" when a smaller value is better (times), "higher" for rates
    better: str = "lower"

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def min(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def max(self) -> float:
        return max(self.values) if self.values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "unit": self.unit, "values": [round(v, 6) for v in self.values],
                "median": _round(self.median), "min": _round(self.min), "max": _round(self.max),
                "baseline": self.baseline, "note": self.note}


def _round(value: float) -> float | None:
    return None if value != value else round(value, 6)  # NaN -> null


def fmt(value: float, unit: str = "") -> str:
    """A number for a table: three significant digits or so."""
    if value != value:
        return "-"
    a = abs(value)
    if a >= 1000:
        text = f"{value:,.0f}"
    elif a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    elif a >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return text


# --- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_total_gib(), 1),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "gpu": gpu(),
    }


def gpu() -> str:
    """What GPU the workers could see (they use DEVICE=auto: the first visible CUDA device)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no GPU (everything ran on the CPU)"
    name = _run_quiet([smi, "--query-gpu=name", "--format=csv,noheader"])
    return f"GPU {name or 'present'} (workers use DEVICE=auto)"


def _run_quiet(args: list[str], timeout: float = 30.0) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(aws: str | None = None) -> dict[str, str]:
    """Versions of what the figures depend on (without importing torch here)."""
    out = {
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "ultralytics": package_version("ultralytics"),
        "pika": package_version("pika"),
        "boto3": package_version("boto3"),
        "onnxruntime": package_version("onnxruntime"),
        "rabbitmq": _run_quiet(["rabbitmqctl", "version"]) or "unknown",
    }
    weed = Path(sys.executable).parent / "weed"
    if weed.exists():
        out["seaweedfs"] = _run_quiet([str(weed), "version"]).replace("version ", "") or "unknown"
    if aws:
        out["awscli"] = _run_quiet([aws, "--version"]).split(" ")[0]
    return out


class LoadSampler:
    """Samples the 1-minute load average every few seconds (how busy the machine was)."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = [loadavg()[0]]
        self.at_start = loadavg()
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append(loadavg()[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(1)
        return {"at_start_1_5_15": [round(x, 2) for x in self.at_start],
                "during_median": round(statistics.median(self.samples), 2),
                "during_max": round(max(self.samples), 2)}


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- processes -----------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (VmRSS), NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class Proc:
    """A worker (or any module) in a subprocess, logging JSON lines to a file.

    ``spawned`` is the wall-clock time just before the process was created, so that
    ``line_time(text) - spawned`` is the cold start up to that log line.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self._offset = 0
        self.starts = 0

    def start(self, wait: bool = True, timeout: float = 180.0) -> Proc:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_FORMAT": "json", **self.env}
        with open(self.log_path, "ab") as log:
            self.spawned = time.time()
            self.proc = subprocess.Popen([sys.executable, *self.args], cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        if wait:
            self.wait_log(STARTED, timeout=timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self, since_start: bool = True) -> str:
        try:
            raw = self.log_path.read_bytes()
        except OSError:
            return ""
        return raw[self._offset:].decode(errors="replace") if since_start else raw.decode(errors="replace")

    def lines(self, since_start: bool = True) -> Iterator[dict[str, Any]]:
        """The JSON log records (other output lines come back as ``{"message": line}``)."""
        for line in self.text(since_start).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line}
            yield record if isinstance(record, dict) else {"message": line}

    def line_time(self, text: str, since_start: bool = True) -> float | None:
        for record in self.lines(since_start):
            if text in str(record.get("message", "")) and "ts" in record:
                return parse_ts(str(record["ts"]))
        return None

    def wait_log(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.args} exited ({self.proc.returncode}) before logging {text!r}; "
                                   f"log {self.log_path}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.args} did not log {text!r} within {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (warm stop), SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        return self.proc.returncode


#: Runs the module named by ``AIS_ENTRY`` as ``python -m`` would.  Our helper processes
#: are started this way so that their command lines do not name them: a broad
#: ``pkill -f bench`` meant for something else took a whole run down twice (seen).
LAUNCH = "import os, runpy; runpy.run_module(os.environ.pop('AIS_ENTRY'), run_name='__main__', alter_sys=True)"


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """``python -m module args...`` as (interpreter arguments, extra environment)."""
    return ["-c", LAUNCH, *args], {"AIS_ENTRY": module}


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    argv, extra = module_command(module, *args)
    return subprocess.run([sys.executable, *argv], cwd=REPO, env={**(env or os.environ), **extra},
                          capture_output=True, text=True, timeout=timeout, check=False)


def worker_command(op: str, *, instrumented: bool = False) -> tuple[list[str], dict[str, str]]:
    """``ai-service worker <op>`` (or :mod:`bench.instrumented`): arguments and extra environment."""
    if instrumented:
        return module_command("bench.instrumented", op)
    return module_command("ai_service.cli", "worker", op)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The instrumented workers' event journal (one JSON object a line)."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by SIGKILL
    return out


# --- a BE stand-in -------------------------------------------------------------------------


@dataclass
class Got:
    """One message a BE received."""

    t: float  # wall clock at receipt
    queue: str
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    redelivered: bool
    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))

    @property
    def job_id(self) -> str:
        return str(self.body.get("job_id", ""))


class Listener:
    """Consumes queues on its own thread and connection, recording every message.

    Acks each message after recording it.  Reconnects when the broker goes away (a
    message redelivered to us after that has ``redelivered`` set: a duplicate of our own
    making, not the service's).
    """

    def __init__(self, host: str, port: int, queues: list[str]) -> None:
        self.host = host
        self.port = port
        self.queues = list(queues)
        self.messages: list[Got] = []
        self.cond = threading.Condition()
        self.ready = threading.Event()
        self.reconnects = 0
        self._tags: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="be-listener", daemon=True)
        self._thread.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"the BE listener could not consume {queues} on {host}:{port}")

    def _run(self) -> None:
        while not self._stop.is_set():
            connection = None
            try:
                connection = pika.BlockingConnection(cast(Any, broker_parameters(
                    self.host, self.port, heartbeat=30,
                    client_properties={"connection_name": "bench BE listener"})))
                channel = connection.channel()
                channel.basic_qos(prefetch_count=500)
                for queue in self.queues:
                    self._tags[channel.basic_consume(queue, self._on_message)] = queue
                if self.ready.is_set():
                    self.reconnects += 1
                self.ready.set()
                while not self._stop.is_set():
                    connection.process_data_events(time_limit=1)
            except (pika.exceptions.AMQPError, OSError):
                time.sleep(0.3)
            finally:
                if connection is not None and connection.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                        connection.close()

    def _on_message(self, channel: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        t = time.time()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"_raw": body[:200].decode(errors="replace")}
        got = Got(t, self._tags.get(str(method.consumer_tag), ""), str(method.routing_key), props.message_id,
                  props.correlation_id, bool(method.redelivered),
                  parsed if isinstance(parsed, dict) else {"_raw": parsed})
        with self.cond:
            self.messages.append(got)
            self.cond.notify_all()
        channel.basic_ack(method.delivery_tag)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def snapshot(self) -> list[Got]:
        with self.cond:
            return list(self.messages)

    def wait(self, predicate: Callable[[list[Got]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
            return True

    def of(self, job_id: str, type_: str | None = None) -> list[Got]:
        with self.cond:
            return [m for m in self.messages if m.job_id == job_id and (type_ is None or m.type == type_)]


TERMINAL_SUFFIXES = ("_completed", "_failed", "_cancelled")


def is_terminal(got: Got) -> bool:
    return got.type.endswith(TERMINAL_SUFFIXES)


def broker_parameters(host: str, port: int, **options: Any) -> list[pika.ConnectionParameters]:
    """One parameter set per node of ``host`` (one host, or a cluster's ``RABBITMQ_HOST``
    node list): pika tries them in turn, so a BE stand-in rides out a lost node too."""
    from ai_service.config import parse_nodes

    return [pika.ConnectionParameters(node.host, node.port, **options) for node in parse_nodes(host, port)]


class Sender:
    """Publishes requests (persistent, with publisher confirms) from the calling thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.connection: pika.BlockingConnection | None = None
        self.channel: BlockingChannel | None = None
        self.connect()

    def connect(self) -> None:
        self.connection = pika.BlockingConnection(cast(Any, broker_parameters(
            self.host, self.port, heartbeat=0, client_properties={"connection_name": "bench BE sender"})))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def send(self, queue: str, body: bytes | dict[str, Any], *, exchange: str = "", **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        assert self.channel is not None
        properties = pika.BasicProperties(delivery_mode=2, content_type=props.pop("content_type", "application/json"),
                                          **props)
        self.channel.basic_publish(exchange, queue, raw, properties=properties)

    def send_retrying(self, queue: str, body: bytes | dict[str, Any], timeout: float = 60.0, **props: Any) -> bool:
        """Like :meth:`send`, reconnecting while the broker is away; False if it never came back."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.connection is None or not self.connection.is_open:
                    self.connect()
                self.send(queue, body, **props)
                return True
            except (pika.exceptions.AMQPError, OSError):
                self.connection = None
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.2)

    def pump(self) -> None:
        if self.connection is not None and self.connection.is_open:
            self.connection.process_data_events(0)

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                self.connection.close()


def delete_topology(host: str, port: int, env: dict[str, str]) -> None:
    """Delete the queues and exchanges a run declared under its unique names."""
    try:
        connection = pika.BlockingConnection(cast(Any, broker_parameters(host, port, heartbeat=0)))
    except (pika.exceptions.AMQPError, OSError):
        return
    try:
        channel = connection.channel()
        for var, name in env.items():
            if var.endswith("_QUEUE"):
                for queue in (name, f"{name}.dlq", f"{name}.lease"):
                    channel.queue_delete(queue)
        for var in ("EVENTS_EXCHANGE", "CONTROL_EXCHANGE", "DEAD_LETTER_EXCHANGE"):
            if var in env:
                channel.exchange_delete(env[var])
        connection.close()
    except (pika.exceptions.AMQPError, OSError):
        pass


# --- a model to serve ----------------------------------------------------------------------


def build_model(target: Path, work: Path) -> Path:
    """Save a yolov8n built from its yaml (random weights, classes circle and square) to ``target``.

    Runs in a subprocess so that this process never imports torch.  Its speed is that of
    a trained yolov8n; its detections are noise.
    """
    code = (
        "import sys; from pathlib import Path; from workers import yolo; "
        "yolo.prepare_ultralytics(Path(sys.argv[1])); from ultralytics import YOLO; "
        "m = YOLO('yolov8n.yaml'); m.model.names = {0: 'circle', 1: 'square'}; m.save(sys.argv[2])"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(work), str(target)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    return target
