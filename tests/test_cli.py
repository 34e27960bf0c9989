"""The BE-side ``ai-service`` commands, run as real subprocesses against the real broker
(and a real training worker where it says so).

Every CLI subprocess runs with ``torch`` and ``ultralytics`` poisoned on its
``PYTHONPATH``: a BE-side command that imported either would fail loudly.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

from ai_service.asyncapi import render
from ai_service.cancels import cancel_stream_name
from ai_service.storage import LocalStorage
from tests.conftest import WorkerFactory
from tests.support.amqp import BE
from tests.test_training import train_request

REPO = Path(__file__).resolve().parents[1]
ASYNCAPI = REPO / "docs" / "asyncapi.yaml"
POISON = "raise ImportError('the BE-side ai-service commands must not import {name}')\n"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def poison_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("poison")
    for name in ("torch", "ultralytics"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(POISON.format(name=name))
    return root


def cli_env(env: dict[str, str], poison_dir: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(poison_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "ai_service.cli", *args]


@pytest.fixture
def cli(worker_env: dict[str, str], poison_dir: Path, be: BE) -> Run:
    """Run ``ai-service ARGS`` with this test's broker names and storage (``be`` cleans up)."""

    def run(*args: str, input: str | None = None, timeout: float = 120, **extra: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_args(*args), cwd=REPO, env=cli_env(worker_env, poison_dir, **extra),
                              input=input, capture_output=True, text=True, timeout=timeout)

    return run


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def upload_shapes(worker_env: dict[str, str], shapes_dir: Path) -> LocalStorage:
    storage = LocalStorage(Path(worker_env["STORAGE_DIR"]))
    storage.upload_dir(shapes_dir, "datasets/shapes")
    return storage


# --- no broker needed ------------------------------------------------------------------


HELPS = [
    [], ["submit"], ["submit", "train"], ["submit", "convert"], ["submit", "infer"], ["cancel"], ["status"],
    ["dlq"], ["dlq", "list"], ["dlq", "replay"], ["demo"], ["asyncapi"], ["worker"],
]

NO_TORCH_SCRIPT = """
import sys, contextlib, io, time
t0 = time.monotonic()
from ai_service import cli
helps = {helps!r}
for argv in helps:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([*argv, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert "usage: ai-service" in out.getvalue(), argv
with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["asyncapi"]) == 0
    assert cli.main(["status", "no-such-job"]) == 6
    assert cli.main(["submit", "train", "--dataset", "d/", "--epochs", "0"]) == 2
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ultralytics", "torchvision"))
assert not heavy, heavy
print(f"ok {{time.monotonic() - t0:.2f}}")
"""


def test_help_works_everywhere_and_the_be_side_commands_never_import_torch(tmp_path: Path) -> None:
    # No poison here: the real torch is importable, and still must not be imported.
    env = {**os.environ, "STORAGE_DIR": str(tmp_path / "storage")}
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT.format(helps=HELPS)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith("ok"), output(result)

    started = time.monotonic()
    top = subprocess.run(cli_args("--help"), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert top.returncode == 0, output(top)
    assert elapsed < 5, f"`ai-service --help` took {elapsed:.1f} s"
    for command in ("worker", "submit", "cancel", "status", "dlq", "demo", "asyncapi"):
        assert command in top.stdout
    # the exit codes a script relies on are documented
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ", "8 ", "130"):
        assert f"\n  {code}" in top.stdout, code


def test_docs_asyncapi_yaml_is_generated_and_up_to_date(poison_dir: Path) -> None:
    assert ASYNCAPI.read_text(encoding="utf-8") == render(), (
        "docs/asyncapi.yaml is stale: regenerate it with `.venv/bin/ai-service asyncapi -o docs/asyncapi.yaml`"
    )
    result = subprocess.run(cli_args("asyncapi"), cwd=REPO, env=cli_env({}, poison_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, output(result)
    assert result.stdout == ASYNCAPI.read_text(encoding="utf-8"), output(result)
    check = subprocess.run(cli_args("asyncapi", "--check", str(ASYNCAPI)), cwd=REPO, env=cli_env({}, poison_dir),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, output(check)


def test_the_asyncapi_document_covers_every_channel_and_message_of_the_contract() -> None:
    doc = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    assert doc["asyncapi"] == "3.0.0"
    channels = doc["channels"]
    addresses = {c["address"] for c in channels.values()}
    for op in ("train", "convert", "infer"):
        assert {f"{op}_request_q", f"{op}_request_q.dlq", f"{op}_result_q", f"{op}.result.{{job_id}}"} <= addresses
    assert {"train_update_q", "convert_update_q", "train.update.{job_id}", "convert.update.{job_id}"} <= addresses
    exchanges = {(c["bindings"]["amqp"]["exchange"]["name"], c["bindings"]["amqp"]["exchange"]["type"])
                 for c in channels.values() if c.get("bindings", {}).get("amqp", {}).get("is") == "routingKey"}
    assert exchanges == {("ai.events", "topic"), ("ai.control", "fanout")}
    assert channels["inferReplies"]["address"] is None
    assert doc["operations"]["receiveInferenceRequest"]["reply"]["channel"] == {"$ref": "#/channels/inferReplies"}
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert names == {
        "train_request", "training_started", "epoch_update", "training_completed", "training_failed",
        "training_cancelled", "convert_request", "conversion_started", "conversion_update",
        "conversion_completed", "conversion_failed", "conversion_cancelled", "infer_request",
        "inference_completed", "inference_failed", "cancel", "worker_heartbeat",
    }
    schemas = doc["components"]["schemas"]
    assert schemas["TrainingRequest"]["required"] == ["job_id", "dataset", "output", "hyperparams"]
    assert schemas["Hyperparams"]["additionalProperties"] is False  # unknown hyperparams are invalid
    assert "eta_seconds" not in schemas["EpochUpdate"]["required"]  # sent only when known
    assert "timestamp" in schemas["EpochUpdate"]["required"]

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in target, f"dangling $ref {ref}"
            target = target[part]


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_otherwise() -> None:
    import io

    from ai_service.progress import ProgressView

    messages = [
        {"type": "training_started", "worker": "w1", "total_epochs": 2, "resumed_from_epoch": 0},
        {"type": "epoch_update", "current_epoch": 1, "total_epochs": 2, "progress": 50.0,
         "metrics": {"train_loss": 1.25, "mAP50": 0.5}, "eta_seconds": 75},
        {"type": "epoch_update", "current_epoch": 2, "total_epochs": 2, "progress": 100.0,
         "metrics": {"train_loss": 1.0, "mAP50": 0.75}, "eta_seconds": 0},
        {"type": "training_completed", "model_path": "models/m.pt", "training_time": 61.2,
         "final_metrics": {"final_mAP50": 0.75, "final_loss": 1.0, "training_epochs": 2}},
    ]
    plain, live = io.StringIO(), io.StringIO()
    for stream, is_live in ((plain, False), (live, True)):
        view = ProgressView(stream, live=is_live)
        for message in messages:
            view.show(message)
            view.tick()
        view.close()
    assert plain.getvalue().splitlines() == [
        "training started on w1 (2 epochs)",
        "epoch 1/2 [##########----------]  50%  loss 1.2500  mAP50 0.5000  ETA 0:01:15",
        "epoch 2/2 [####################] 100%  loss 1.0000  mAP50 0.7500  ETA 0:00:00",
        "training completed in 0:01:01: models/m.pt (mAP50 0.7500, loss 1.0000, 2 epochs)",
    ]
    text = live.getvalue()
    assert "\r" + "epoch 1/2 [##########----------]  50%" in text
    assert "\x1b[K" in text
    assert text.endswith("ETA 0:00:00\x1b[K\ntraining completed in 0:01:01: models/m.pt (mAP50 0.7500, loss 1.0000, "
                         "2 epochs)\n")


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["submit", "train", "--dataset", "datasets/x/", "--epochs", "0"], None, "hyperparams.epochs"),
        (["submit", "train", "--dataset", "../etc/", "--epochs", "1"], None, "dataset.s3_prefix"),
        (["submit", "train", "--dataset", "d/", "--param", "colour=red"], None, "hyperparams.colour: unknown field"),
        (["submit", "train", "--dataset", "d/", "--param", "nokey"], None, "--param takes KEY=VALUE"),
        (["submit", "train"], None, "needs --dataset"),
        (["submit", "train", "-f", "-"], "{not json", "not valid JSON"),
        (["submit", "train", "-f", "-"], json.dumps({"job_id": "j1", "dataset": {}}), "dataset.s3_prefix"),
        (["submit", "train", "-f", "-", "--epochs", "3"], "{}", "cannot be combined with --epochs"),
        (["submit", "convert", "--model-path", "m.pt", "--formats", "onnx,onnx"], None, "formats"),
        (["submit", "infer", "--model-path", "m.pt"], None, "at least one --image"),
        (["submit", "train", "--job-id", "bad id!", "--dataset", "d/"], None, "job_id"),
        (["cancel", "bad id!"], None, "invalid"),
        (["submit", "train", "--epochs", "many"], None, "invalid int value"),
    ],
)
def test_invalid_flags_or_json_exit_2_with_the_reason(
    args: list[str], stdin: str | None, expected: str, worker_env: dict[str, str], poison_dir: Path,
) -> None:
    # Validation happens before connecting: a broker that is not there does not matter.
    env = cli_env({**worker_env, "RABBITMQ_PORT": "1"}, poison_dir)
    result = subprocess.run(cli_args(*args), cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, output(result)
    assert expected in result.stderr, output(result)
    assert "Traceback" not in result.stderr


def test_an_unreachable_broker_exits_5(worker_env: dict[str, str], poison_dir: Path) -> None:
    env = cli_env({**worker_env, "RABBITMQ_PORT": "1"}, poison_dir)
    for args in (["submit", "train", "--dataset", "d/"], ["cancel", "j1"], ["dlq", "list", "train"]):
        result = subprocess.run(cli_args(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 5, output(result)
        assert "cannot reach RabbitMQ at amqp://guest@127.0.0.1:1/" in result.stderr
        assert "Traceback" not in result.stderr


# --- broker, no worker -----------------------------------------------------------------


def test_submit_publishes_a_persistent_validated_request_and_prints_the_job_id(
    cli: Run, be: BE, tmp_path: Path,
) -> None:
    result = cli("submit", "train", "--dataset", "datasets/shapes/", "--epochs", "3", "--imgsz", "64",
                 "--param", "seed=7", "--param", "optimizer=AdamW")
    assert result.returncode == 0, output(result)
    job_id = result.stdout.strip()
    msg = be.wait_for(be.settings.train_request_queue, timeout=10)
    assert msg.body == {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/shapes/", "name": "shapes"},
        "output": {"prefix": "models/yolov8n", "model_name": f"shapes-{job_id}.pt"},
        "hyperparams": {"model": "yolov8n", "epochs": 3, "batch": 16, "imgsz": 64, "seed": 7, "optimizer": "AdamW"},
    }
    props = msg.properties
    assert props.delivery_mode == 2
    assert props.content_type == "application/json"
    assert props.correlation_id == job_id
    assert props.message_id

    request = tmp_path / "request.json"
    request.write_text(json.dumps(train_request("from-file")))
    result = cli("submit", "train", "--file", str(request), "--job-id", "override1")
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "override1", output(result)
    assert be.wait_for(be.settings.train_request_queue, timeout=10).body == {**train_request("from-file"),
                                                                            "job_id": "override1"}
    result = cli("submit", "train", "-f", "-", input=json.dumps(train_request("stdin1")))
    assert result.returncode == 0, output(result)
    assert result.stdout.strip() == "stdin1", output(result)
    assert be.wait_for(be.settings.train_request_queue, timeout=10).body == train_request("stdin1")


def test_following_without_a_worker_says_so_and_times_out_with_4(cli: Run) -> None:
    result = cli("submit", "train", "--dataset", "datasets/shapes/", "--job-id", "lonely1", "--follow",
                 "--timeout", "1.5")
    assert result.returncode == 4, output(result)
    assert "no worker is consuming" in result.stderr
    assert "make run-train-worker" in result.stderr
    assert "did not end within 1.5 s" in result.stderr


def test_demo_without_a_worker_tells_how_to_start_one_and_no_wait_exits_8(
    cli: Run, be: BE, worker_env: dict[str, str],
) -> None:
    result = cli("demo", "--no-wait", "--epochs", "1")
    assert result.returncode == 8, output(result)
    assert "start one with `make run` or `make run-train-worker`" in result.stderr
    assert be.count(be.settings.train_request_queue) == 0


def test_cancel_publishes_the_contract_message_and_record_leaves_a_marker(
    cli: Run, be: BE, worker_env: dict[str, str],
) -> None:
    listener = be.channel.queue_declare("", exclusive=True).method.queue
    be.channel.queue_bind(listener, be.settings.control_exchange)
    result = cli("cancel", "job-42")
    assert result.returncode == 0, output(result)
    msg = be.wait_for(listener, timeout=10)
    assert msg.body == {"type": "cancel", "job_id": "job-42"}
    be.channel.queue_delete(listener)
    # nobody listening now: still 0, and the cancel stream keeps it for a worker that starts later;
    # --record also writes the marker every worker honours
    result = cli("cancel", "job-43", "--record")
    assert result.returncode == 0, output(result)
    assert "CANCEL_RETENTION" in result.stderr
    assert (Path(worker_env["STORAGE_DIR"]) / "jobs" / "job-43.cancel").is_file()
    assert "job-43" in _cancels_kept(be)


def _cancels_kept(be: BE) -> list[str]:
    """The job ids of the cancels in the cancel stream, read from its start (non-destructively)."""
    channel = be.connection.channel()
    channel.basic_qos(prefetch_count=100)
    seen: list[str] = []
    for method, _, body in channel.consume(cancel_stream_name(be.settings), arguments={"x-stream-offset": "first"},
                                           inactivity_timeout=2):
        if method is None:
            break
        seen.append(json.loads(body).get("job_id", ""))
        channel.basic_ack(method.delivery_tag)
    channel.close()
    return seen


def _dead_letter_by_reject(be: BE, body: bytes) -> None:
    """Put a message in the request queue and reject it: the broker dead-letters it."""
    queue = be.settings.train_request_queue
    be.send(queue, body)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, _, _ = be.channel.basic_get(queue, auto_ack=False)
        if method is not None:
            be.channel.basic_reject(method.delivery_tag, requeue=False)
            return
        be.connection.sleep(0.05)
    raise AssertionError("the message did not arrive")


def test_dlq_list_shows_dead_letters_without_losing_them_and_replay_republishes_them(cli: Run, be: BE) -> None:
    s = be.settings
    request_q, dlq = s.train_request_queue, f"{s.train_request_queue}.dlq"
    _dead_letter_by_reject(be, json.dumps(train_request("dead1")).encode())
    assert be.wait_count(dlq, 1) == 1  # dead-lettering is asynchronous: keep the order known
    # straight into the .dlq through the dead-letter exchange, as a rejected request would go
    be.channel.basic_publish(s.dead_letter_exchange, request_q, json.dumps(train_request("dead2")).encode(),
                             properties=pika.BasicProperties(delivery_mode=2, correlation_id="dead2",
                                                             content_type="application/json"))
    be.channel.basic_publish(s.dead_letter_exchange, request_q, b"\xffnot json",
                             properties=pika.BasicProperties(delivery_mode=2))
    assert be.wait_count(dlq, 3) == 3

    listed = cli("dlq", "list", "train")
    assert listed.returncode == 0, output(listed)
    lines = listed.stdout.splitlines()
    assert lines[0] == f"{dlq}: 3 message(s)"
    assert "dead1" in lines[2]
    assert "rejected" in lines[2]
    assert "dead2" in lines[3]
    assert "(unreadable)" in lines[4]
    # non-destructive: the same three, in the same order, still there
    again = cli("dlq", "list", request_q, "--json", "--body")
    assert again.returncode == 0, output(again)
    data = json.loads(again.stdout)
    assert data["count"] == 3
    assert [m["job_id"] for m in data["messages"]] == ["dead1", "dead2", None]
    assert data["messages"][0]["reason"] == "rejected"
    assert data["messages"][0]["count"] == 1
    assert data["messages"][0]["queue"] == request_q
    assert json.loads(data["messages"][1]["body"])["job_id"] == "dead2"
    assert be.count(dlq) == 3

    replay = cli("dlq", "replay", "train", "--job-id", "dead2")
    assert replay.returncode == 0, output(replay)
    assert replay.stdout.split() == ["dead2"], output(replay)
    assert be.count(dlq) == 2
    msg = be.wait_for(request_q, timeout=10)
    assert msg.body == train_request("dead2")
    assert msg.properties.delivery_mode == 2
    assert msg.properties.correlation_id == "dead2"
    # the broker's death headers were not replayed (a quorum queue adds its own x-delivery-count)
    assert not any(str(k).startswith(("x-death", "x-first-death", "x-last-death"))
                   for k in (msg.properties.headers or {})), msg.properties.headers

    assert cli("dlq", "replay", "train", "--job-id", "nobody").returncode == 6
    replay = cli("dlq", "replay", request_q, "--all")
    assert replay.returncode == 0, output(replay)
    assert be.count(dlq) == 0
    assert be.wait_count(request_q, 2) == 2
    first = be.wait_for(request_q, timeout=10)
    assert first.body == train_request("dead1")
    assert "x-death" not in (first.properties.headers or {})

    missing = cli("dlq", "list", "no_such_queue")
    assert missing.returncode == 6, output(missing)
    assert "does not exist" in missing.stderr, output(missing)


class StandIn:
    """A fake worker on its own connection and thread: answers one request queue."""

    def __init__(self, be: BE, queue: str, answer: Callable[[pika.BlockingConnection, Any, Any, dict[str, Any]],
                                                            None]) -> None:
        self.settings = be.settings
        self.queue = queue
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", heartbeat=0))
        channel = connection.channel()

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            request = json.loads(body)
            self.requests.append(request)
            self.answer(connection, ch, props, request)
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(self.queue, on_message)
        self.ready.set()
        while not self.stop.is_set():
            connection.process_data_events(time_limit=0.1)
        connection.close()


def test_submit_infer_is_rpc_and_submit_convert_follows_progress(cli: Run, be: BE, tmp_path: Path) -> None:
    s = be.settings
    image = tmp_path / "img.png"
    image.write_bytes(b"\x89PNG fake bytes")

    def answer_infer(connection: Any, ch: Any, props: Any, request: dict[str, Any]) -> None:
        failed = request["model"]["path"] == "models/missing.pt"
        body = ({"type": "inference_failed", "job_id": request["job_id"], "status": "failed",
                 "error_code": "model_not_found", "error_message": "no such model", "timestamp": "t"} if failed else
                {"type": "inference_completed", "job_id": request["job_id"], "status": "completed",
                 "model_path": request["model"]["path"], "results": [], "inference_time_ms": 1.5, "timestamp": "t"})
        ch.basic_publish("", props.reply_to, json.dumps(body).encode(),
                         properties=pika.BasicProperties(correlation_id=props.correlation_id))

    with StandIn(be, s.infer_request_queue, answer_infer) as worker:
        result = cli("submit", "infer", "--model-path", "models/m.pt", "--image", "images/a.jpg",
                     "--image-file", str(image), "--conf", "0.5", "--job-id", "inf1", "--timeout", "30")
        assert result.returncode == 0, output(result)
        assert json.loads(result.stdout)["type"] == "inference_completed"
        assert worker.requests[0] == {
            "job_id": "inf1", "model": {"path": "models/m.pt"},
            "images": [{"path": "images/a.jpg"}, {"data": base64.b64encode(image.read_bytes()).decode()}],
            "params": {"conf": 0.5},
        }
        failed = cli("submit", "infer", "--model-path", "models/missing.pt", "--image", "a.jpg", "--timeout", "30")
        assert failed.returncode == 1, output(failed)
        assert json.loads(failed.stdout)["error_code"] == "model_not_found"
    assert be.count(s.infer_result_queue) == 0  # the answers went to reply_to, not to the BE's queue

    def answer_convert(connection: Any, ch: Any, props: Any, request: dict[str, Any]) -> None:
        job = request["job_id"]
        art = {"format": "onnx", "path": "models/exports/m.onnx", "size_bytes": 2048, "sha256": "0" * 64,
               "verified": True}
        for kind, body in (
            ("update", {"type": "conversion_started", "job_id": job, "status": "running", "formats": ["onnx"],
                        "worker": "stand-in", "timestamp": "t"}),
            ("update", {"type": "conversion_update", "job_id": job, "status": "running", "current_format": "onnx",
                        "progress": 100.0, "artifact": art, "timestamp": "t"}),
            ("result", {"type": "conversion_completed", "job_id": job, "status": "completed", "progress": 100.0,
                        "artifacts": [art], "conversion_time": 2.0, "timestamp": "t"}),
        ):
            ch.basic_publish(s.events_exchange, f"convert.{kind}.{job}", json.dumps(body).encode())

    with StandIn(be, s.convert_request_queue, answer_convert):
        result = cli("submit", "convert", "--model-path", "models/m.pt", "--formats", "onnx", "--job-id", "conv1",
                     "--follow", "--timeout", "30")
    assert result.returncode == 0, output(result)
    assert "conversion started on stand-in: onnx" in result.stderr
    assert "format onnx done" in result.stderr
    assert "models/exports/m.onnx" in result.stderr
    assert json.loads(result.stdout)["type"] == "conversion_completed"
    # the BE's own queues still hold everything: following did not drain them
    assert be.count(s.convert_update_queue) == 2
    assert be.count(s.convert_result_queue) == 1


# --- a real training worker ------------------------------------------------------------


def test_submit_follow_trains_to_completion_then_status_and_a_failing_job_exits_1(
    cli: Run, be: BE, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
) -> None:
    storage = upload_shapes(worker_env, shapes_dir)
    start_worker("train")
    result = cli("submit", "train", "--dataset", "datasets/shapes/", "--epochs", "2", "--imgsz", "64",
                 "--batch", "8", "--job-id", "clijob1", "--follow", "--timeout", "500", timeout=600)
    assert result.returncode == 0, output(result)
    err = result.stderr
    assert "submitted training job clijob1" in err
    assert "training started on test/train-0 (2 epochs)" in err
    assert "epoch 1/2 [##########----------]  50%  loss " in err
    assert "mAP50 " in err
    assert "ETA " in err
    assert "epoch 2/2" in err
    assert "training completed in" in err
    done = json.loads(result.stdout)
    assert done["type"] == "training_completed"
    assert done["model_path"] == "models/yolov8n/shapes-clijob1.pt"
    assert storage.stat(done["model_path"]) is not None
    # the BE's result queue still has the job's result: the CLI followed through a queue of its own
    assert be.terminal(be.settings.train_result_queue, "clijob1", timeout=10).type == "training_completed"

    status = cli("status", "clijob1")
    assert status.returncode == 0, output(status)
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in status.stdout.splitlines())
    assert rows["status"].strip() == "completed"
    assert rows["attempt"].strip() == "1"
    assert "last epoch     2" in status.stdout
    assert "owner          test/train-0" in status.stdout
    assert "jobs/train/clijob1/last.pt" in status.stdout
    assert "training_completed (sent)" in status.stdout
    record = json.loads(cli("status", "clijob1", "--json").stdout)
    assert record["status"] == "completed"
    assert record["terminal_type"] == "training_completed"
    assert record["last_epoch"] == 2
    assert record["checkpoints"]["last"] == "jobs/train/clijob1/last.pt"
    missing = cli("status", "never-seen")
    assert missing.returncode == 6, output(missing)
    assert "no job record for never-seen" in missing.stderr, output(missing)

    failed = cli("submit", "train", "--dataset", "datasets/missing/", "--epochs", "1", "--imgsz", "64",
                 "--job-id", "clifail", "--follow", "--timeout", "300", timeout=400)
    assert failed.returncode == 1, output(failed)
    assert json.loads(failed.stdout)["error_code"] == "dataset_not_found"
    assert "training failed at epoch 0: [dataset_not_found]" in failed.stderr


def test_cancel_ends_a_followed_job_with_3(
    be: BE, cli: Run, start_worker: WorkerFactory, worker_env: dict[str, str], shapes_dir: Path,
    poison_dir: Path, tmp_path: Path,
) -> None:
    upload_shapes(worker_env, shapes_dir)
    start_worker("train")
    err_path = tmp_path / "follow.err"
    with open(err_path, "w") as err_file:
        follower = subprocess.Popen(
            cli_args("submit", "train", "--dataset", "datasets/shapes/", "--epochs", "30", "--imgsz", "64",
                     "--batch", "8", "--job-id", "clicancel", "--follow"),
            cwd=REPO, env=cli_env(worker_env, poison_dir), stdout=subprocess.PIPE, stderr=err_file, text=True,
        )
    try:
        deadline = time.monotonic() + 400
        while "epoch 1/30" not in err_path.read_text():
            assert follower.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, f"no epoch line:\n{err_path.read_text()}"
            time.sleep(0.2)
        cancel = cli("cancel", "clicancel")
        assert cancel.returncode == 0, output(cancel)
        assert "cancel requested for job clicancel" in cancel.stderr, output(cancel)
        stdout, _ = follower.communicate(timeout=300)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert follower.returncode == 3, err_path.read_text()
    cancelled = json.loads(stdout)
    assert cancelled["type"] == "training_cancelled"
    assert 1 <= cancelled["current_epoch"] < 30
    assert "training cancelled at epoch" in err_path.read_text()
