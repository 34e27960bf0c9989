"""A real worker process riding out a cut connection, a broker restart and a request
queue that already exists with other arguments.

The worker is ``tests/support/sleepy_worker.py`` (the real runtime with a scripted
handler).  Connection cuts go through a :class:`CuttableProxy` in front of the shared
broker; the restart uses a private node (``tests/support/rabbit.py``) so the shared
broker is never touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from ai_service.config import Settings
from ai_service.worker import spool_dir
from tests.conftest import WorkerFactory
from tests.support import rabbit
from tests.support.amqp import BE, Received
from tests.support.procs import WorkerProcess
from tests.support.proxy import CuttableProxy

SLEEPY = "tests.support.sleepy_worker"
FAST_RECONNECT = {"RECONNECT_MAX_DELAY": "1"}
CLASSIC: Any = {"x-queue-type": "classic"}  # pika-stubs mistype queue_declare(arguments=)


def request(job_id: str, tenths: int = 1) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "dataset": {"s3_prefix": "datasets/my-dataset/", "name": "my-dataset"},
        "output": {"prefix": "models/yolov8n", "model_name": "my-dataset.pt"},
        "hyperparams": {"model": "sleep", "epochs": tenths, "batch": 16, "imgsz": 640},
    }


@pytest.fixture
def proxy() -> Iterator[CuttableProxy]:
    p = CuttableProxy(5672)
    yield p
    p.close()


@pytest.fixture
def private_broker() -> Iterator[rabbit.PrivateBroker]:
    """A private node on port 5673, stopped and wiped after the test whatever happens."""
    if not rabbit.available():
        pytest.skip("rabbitmq-server is not installed")
    with rabbit.private_broker() as broker:
        yield broker


def wait_job(be: BE, job_id: str, results: list[Received], timeout: float = 30.0) -> Received:
    return be.wait_for(be.settings.train_result_queue, lambda m: m.body.get("job_id") == job_id, timeout, results)


def settle_results(be: BE, results: list[Received], quiet: float = 1.0) -> None:
    """Collect what else arrives on the result queue until it stays quiet."""
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        msg = be.get(be.settings.train_result_queue)
        if msg is None:
            be.connection.sleep(0.05)
            continue
        results.append(msg)
        last = time.monotonic()


def terminal_types(results: list[Received]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in results:
        out.setdefault(str(m.body["job_id"]), []).append(m.type)
    return out


def runs_of(worker: WorkerProcess, job_id: str) -> int:
    return worker.log().count(f"[{job_id}] sleeping")


def test_a_worker_cut_off_from_the_broker_reconnects_and_keeps_consuming(
    proxy: CuttableProxy, be: BE, start_worker: WorkerFactory, record_property: Any
) -> None:
    worker = start_worker(module=SLEEPY, env={"RABBITMQ_PORT": str(proxy.port), **FAST_RECONNECT})
    results: list[Received] = []
    be.send_train(request("cut-1"))
    wait_job(be, "cut-1", results)

    # Cut while idle: the worker notices, retries against the refusing proxy, reconnects.
    proxy.cut()
    worker.wait_log("Connection lost", timeout=10)
    worker.wait_log("❌ Failed to connect to RabbitMQ", timeout=10)
    proxy.restore()
    worker.wait_log("[RMQ] Reconnected to", timeout=15)
    be.send_train(request("cut-2"))
    wait_job(be, "cut-2", results)

    # Cut while a handler sleeps 3 s: the broker requeues the unacked delivery.
    be.send_train(request("cut-3", tenths=30))
    worker.wait_log("[cut-3] sleeping")
    proxy.cut()
    worker.wait_log("Connection lost", count=2, timeout=10)
    time.sleep(0.5)
    proxy.restore()
    worker.wait_log("[RMQ] Reconnected to", count=2, timeout=15)
    be.send_train(request("cut-4"))
    wait_job(be, "cut-4", results, timeout=40)
    settle_results(be, results)

    by_job = terminal_types(results)
    assert set(by_job) == {"cut-1", "cut-2", "cut-3", "cut-4"}, by_job
    for job_id, types in by_job.items():
        assert set(types) == {"training_completed"}, (job_id, types)
    for job_id in ("cut-1", "cut-2", "cut-4"):
        assert len(by_job[job_id]) == 1 and runs_of(worker, job_id) == 1, job_id
    # At the core level a cut mid-handler redelivers: the job ran again and answered again
    # (same type).  Jobs that must answer once use the job record (jobs.py) on top.
    runs, answers = runs_of(worker, "cut-3"), len(by_job["cut-3"])
    record_property("cut_mid_handler_runs", runs)
    record_property("cut_mid_handler_answers", answers)
    assert 1 <= answers <= runs <= 2, (runs, answers)
    if runs == 2:
        assert "belongs to a closed channel" in worker.log()
    assert be.count(be.settings.train_request_queue) == 0
    assert be.count(be.settings.train_request_queue + ".dlq") == 0
    assert "Publisher reconnected" in worker.log()
    assert worker.alive


@pytest.mark.xdist_group("private-broker")
def test_a_worker_rides_out_a_broker_restart_and_what_it_published_meanwhile_arrives(
    private_broker: rabbit.PrivateBroker, worker_env: dict[str, str], start_worker: WorkerFactory,
    record_property: Any,
) -> None:
    env = {"RABBITMQ_PORT": str(private_broker.port), **FAST_RECONNECT}
    settings = Settings.from_env({**worker_env, **env, "WORKER_NAME": "test/restart"})
    be = BE(settings)
    worker = start_worker(module=SLEEPY, env=env, name="restart")
    results: list[Received] = []
    be.send_train(request("rs-1"))
    wait_job(be, "rs-1", results)

    be.send_train(request("rs-2", tenths=50))
    worker.wait_log("[rs-2] sleeping")
    be.connection.close()
    private_broker.stop()
    assert "[rs-2] Done" not in worker.log(), "the job ended before the broker was down; make it longer"
    worker.wait_log("Connection lost", timeout=10)
    assert "CONNECTION_FORCED" in worker.log()
    # The job ends while the broker is away: its result waits in the publisher's spool.
    worker.wait_log("[Handler] [rs-2] Done", timeout=15)
    spooled = list(spool_dir(settings).glob("*.msg"))
    assert len(spooled) == 1 and b'"rs-2"' in spooled[0].read_bytes()

    private_broker.start()
    up = time.monotonic()
    worker.wait_log("[RMQ] Reconnected to", timeout=10)
    worker.wait_log("[RMQ] Publisher reconnected to", timeout=10)
    record_property("reconnect_after_restart_s", round(time.monotonic() - up, 2))
    be = BE(settings)
    wait_job(be, "rs-2", results, timeout=20)
    be.send_train(request("rs-3"))
    wait_job(be, "rs-3", results, timeout=30)
    settle_results(be, results)
    assert worker.stop(timeout=20) == 0

    by_job = terminal_types(results)
    assert set(by_job) == {"rs-1", "rs-2", "rs-3"}, by_job
    for job_id, types in by_job.items():
        assert set(types) == {"training_completed"}, (job_id, types)
    # The delivery of rs-2 was unacked when the broker went down: it comes back and runs
    # again (at the core level), answering again with the same type.
    record_property("restart_mid_handler_runs", runs_of(worker, "rs-2"))
    assert len(by_job["rs-2"]) == runs_of(worker, "rs-2") <= 2
    assert list(spool_dir(settings).glob("*.msg")) == []
    assert be.count(settings.train_request_queue) == 0
    be.connection.close()


def test_a_request_queue_that_exists_with_other_arguments_gets_one_warning_and_is_still_consumed(
    worker_env: dict[str, str], start_worker: WorkerFactory
) -> None:
    settings = Settings.from_env(worker_env)
    queue = settings.train_request_queue
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    connection.channel().queue_declare(queue, durable=True, arguments=CLASSIC)
    connection.close()
    be = BE(settings)  # declares the rest of the topology (and meets the same queue)
    try:
        worker = start_worker(module=SLEEPY, env=FAST_RECONNECT)
        be.send_train(request("odd-1"))
        assert be.terminal(settings.train_result_queue, "odd-1", timeout=20).type == "training_completed"
        be.send_train(request("odd-2"))
        assert be.terminal(settings.train_result_queue, "odd-2", timeout=20).type == "training_completed"
        log = worker.log()
        warnings = [line for line in log.splitlines() if "already exists with other arguments" in line]
        assert len(warnings) == 1, log
        assert repr(queue) in warnings[0] and "WARNING" in warnings[0]
        assert "Connection lost" not in log and "Failed to connect" not in log
        # The queue was used as it is, not replaced.
        probe = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        try:
            probe.channel().queue_declare(queue, durable=True, arguments=CLASSIC)
        finally:
            probe.close()
    finally:
        be.close()
